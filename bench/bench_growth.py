#!/usr/bin/env python
"""How ``list``, ``stats`` and ``gc --dry-run`` grow with the number of
recorded cells, on an RSSD and on PostgreSQL (issues 24 and 25).

Stores of 1,000 / 20,000 / 100,000 cells are built **through the package**:
each cell's entry, its ``INITIAL → RUNNING`` (with its source) and its end
(``EXECUTED`` with a record naming a value, one in ten naming a 1 KB blob
by a pickle spec, one in twenty ``FAILED`` with an error) are written by the
store's own append path (``rows.entry``, the store's ``_append`` and
``_put_blobs``, ``rows.add_hits`` for a third of them) in transactions of
5,000 cells — the rows a kernel writes, without a kernel's claim and
heartbeat per cell.  A hundred blobs no record names are added, for gc to
find.

Each command runs in this process as ``rssd-magic`` runs it (click parses,
the store is opened read-only, the answer rendered into a sink), so Python's
start and imports are left out; the table shows the median of the rounds
and the ratio to the 1,000-cell store.  Targets: ``stats`` and
``gc --dry-run`` on 20,000 cells at most 2x their time on 1,000; ``stats``
on 100,000 cells within 1 s on an RSSD, 2 s on PostgreSQL.

What keeping the tally those reports read costs (store/tally.py) is
measured beside them: a new cell's claim and record (``claim`` +
``finish``, the two transactions of a first run) on an RSSD, with the
tally kept as it is and with its writes left out, in alternating batches of
one process (``--cost-rounds``).

Usage::

    python bench/bench_growth.py                  # both stores, 1k/20k/100k cells
    python bench/bench_growth.py --sizes 1000,20000 --rounds 3 --only sqlite
    python bench/bench_growth.py --url postgresql://…   # an existing server instead of pgserver

Not part of the pytest run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import NullWriter, loadavg, machine, machine_line  # noqa: E402

COMMANDS = {
    "list": ["list"],
    "list --all --json": ["list", "--all", "--json"],
    "stats": ["stats"],
    "gc --dry-run": ["gc", "--dry-run"],
}
TARGETS = {"stats": (2.0, {"sqlite": 1.0, "postgresql": 2.0}), "gc --dry-run": (2.0, None)}
BATCH = 5000


def build(location: str, n: int) -> float:
    """Write *n* cells into the store at *location*; seconds it took."""
    from rssd_magic.backends import open_backend
    from rssd_magic.store import rows
    from rssd_magic.records.canonical import dumps
    from rssd_magic.engine.keys import cell_key
    from rssd_magic.engine.lifecycle import EXECUTED, FAILED, INITIAL, RUNNING
    from rssd_magic.records.trust import stream_digest

    started = time.perf_counter()
    store = open_backend(location, session_args={"bench": "growth"})
    sid = store.session_id
    store.flush_hits()
    try:
        for first in range(0, n, BATCH):

            def fill(t, _retrying=False, first=first):
                hits, blobs = {}, []
                for i in range(first, min(n, first + BATCH)):
                    source = f"x{i} = {i}\nprint(x{i})\n"
                    key = cell_key(source, "bench")
                    entry = rows.entry(t, sid, key, source)
                    store._append(t, entry, INITIAL, RUNNING, None, "first run", {"source": source, "code_hash": key.code_hash})
                    if i % 20 == 7:
                        record = {"format": "rssd_magic.result.v1", "host": "bench", "duration_s": 0.01,
                                  "outputs": [], "names": {}, "error": {"ename": "ValueError", "evalue": f"bad {i}"}}  # fmt: skip
                        store._append(t, entry, RUNNING, FAILED, dumps(record), f"ValueError: bad {i}", None)
                        continue
                    names = {f"x{i}": {"kind": "json", "value": i}}
                    if i % 10 == 3:
                        data = hashlib.sha256(str(i).encode()).digest() * 32
                        digest = stream_digest(data)
                        blobs.append((digest, data))
                        names["arr"] = {"kind": "pickle", "type": "bytes", "size": len(data), "blob": digest}
                    record = {"format": "rssd_magic.result.v1", "host": "bench", "duration_s": 0.5 + i % 7,
                              "outputs": [{"output_type": "stream", "name": "stdout", "text": f"{i}\n"}], "names": names}  # fmt: skip
                    done = store._append(t, entry, RUNNING, EXECUTED, dumps(record), "completed", None)
                    if i % 3 == 0:
                        hits[done.state_id] = 1 + i % 5
                if first == 0:  # garbage for gc: blobs no record names
                    blobs += [(stream_digest(b"garbage %d" % g), b"garbage %d" % g) for g in range(100)]
                store._put_blobs(t, blobs, None)
                rows.add_hits(t, hits)

            store.write(fill)
    finally:
        store.close()
    return time.perf_counter() - started


def timed(location: str, args: list[str], rounds: int) -> float:
    """Median seconds of ``rssd-magic --db LOCATION ARGS`` run in this process."""
    from rssd_magic.adapters.commands import main

    samples = []
    for _ in range(rounds):
        sink = NullWriter()
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            t0 = time.perf_counter()
            main.main(["--db", location, *args], prog_name="rssd-magic", standalone_mode=False)
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def tally_cost(folder: Path, rounds: int, batch: int = 400) -> tuple[float, float]:
    """Median µs of a new cell's claim + finish on an RSSD, with the tally
    kept and with its writes left out, batches of each in turn."""
    from rssd_magic.backends import open_backend
    from rssd_magic.engine.claims import current_holder
    from rssd_magic.engine.keys import cell_key
    from rssd_magic.engine.lifecycle import EXECUTED
    from rssd_magic.store import tally
    from rssd_magic.store.base import ClaimRequest

    # One store each: a store whose appends skipped the tally would have the
    # other's next append find rows it did not count, and recount them all.
    stores = [open_backend(str(folder / f"cost{i}.sqlite.db"), session_args={"bench": "tally cost"}) for i in (0, 1)]
    record = '{"format":"rssd_magic.result.v1","host":"h","duration_s":0.1,"names":{"x":{"kind":"json","value":1}},"outputs":[]}'
    kept, skipped, counter = [], [], iter(range(10**9))
    real = tally.appended

    def cells(n: int, store) -> float:
        started = time.perf_counter()
        for _ in range(n):
            key = cell_key(f"x = {next(counter)}", "cost")
            mine = store.claim(ClaimRequest(key, "x", {"source": "x"}, current_holder(store.session_id or ""), 60.0))
            store.finish(mine.running, mine.claim.token, EXECUTED, record, "completed")
        return (time.perf_counter() - started) / n * 1e6

    try:
        for r in range(rounds + 1):  # the first round warms both
            tally.appended = real
            t_kept = cells(batch, stores[0])
            tally.appended = lambda *a: True  # noqa: E731 - the same writes but the tally's
            t_skipped = cells(batch, stores[1])
            if r:
                kept.append(t_kept)
                skipped.append(t_skipped)
    finally:
        tally.appended = real
        for store in stores:
            store.close()
    return statistics.median(kept), statistics.median(skipped)


def pg_base(url: str | None, folder: Path):
    if url:
        return url, None
    import pgserver

    server = pgserver.get_server(str(folder / "pgdata"), cleanup_mode="delete")
    return server.get_uri(), server


def pg_location(base: str, schema: str) -> str:
    import psycopg

    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return base + ("&" if "?" in base else "?") + "options=" + quote(f"-c search_path={schema}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,20000,100000", help="cells per store (default 1000,20000,100000)")
    ap.add_argument("--rounds", type=int, default=5, help="runs of each command (median; default 5)")
    ap.add_argument("--only", choices=["sqlite", "postgresql"], help="one store only")
    ap.add_argument("--url", help="an existing PostgreSQL server (default: start one with pgserver)")
    ap.add_argument("--cost-rounds", type=int, default=7, help="batches of first runs for the tally's cost (0: skip)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(machine_line(machine()), flush=True)
    folder = Path(tempfile.mkdtemp(prefix="rssd-growth-"))
    server = None
    results: dict[tuple[str, str, int], float] = {}
    cost = None
    try:
        if args.cost_rounds:
            cost = tally_cost(folder, args.cost_rounds)
        kinds = [args.only] if args.only else ["sqlite", "postgresql"]
        for kind in kinds:
            if kind == "postgresql":
                base, server = pg_base(args.url, folder)
            for n in sizes:
                location = str(folder / f"g{n}.sqlite.db") if kind == "sqlite" else pg_location(base, f"growth_{n}")
                took = build(location, n)
                print(f"{kind}: built {n:,} cells in {took:.1f} s; {loadavg()}", flush=True)
                for label, cmd in COMMANDS.items():
                    results[(kind, label, n)] = timed(location, cmd, args.rounds)
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)
    print()
    head = ["command", "store", *[f"{n:,} cells" for n in sizes], *[f"{n // 1000}k/{sizes[0] // 1000}k" for n in sizes[1:]], "target"]
    table = [head]
    missed = []
    for label in COMMANDS:
        for kind in kinds:
            ts = [results[(kind, label, n)] for n in sizes]
            ratios = [t / ts[0] for t in ts[1:]]
            target = ""
            if label in TARGETS:
                ratio_max, absolute = TARGETS[label]
                checks = []
                if 20000 in sizes:
                    r = results[(kind, label, 20000)] / ts[0]
                    checks.append(f"20k/1k {r:.2f} <= {ratio_max:g}: {'PASS' if r <= ratio_max else 'MISS'}")
                if absolute and 100000 in sizes:
                    t = results[(kind, label, 100000)]
                    checks.append(f"100k {t:.2f} s <= {absolute[kind]:g} s: {'PASS' if t <= absolute[kind] else 'MISS'}")
                target = "; ".join(checks)
                missed += [f"{label} ({kind})" for c in checks if c.endswith("MISS")]
            table.append([label, kind, *[f"{t * 1e3:.1f} ms" for t in ts], *[f"{r:.2f}x" for r in ratios], target])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if cost is not None:
        kept, skipped = cost
        print(f"\nkeeping the tally: a new cell's claim + record on an RSSD {kept:.0f} µs, "
              f"{skipped:.0f} µs with the tally's writes left out: +{kept - skipped:.0f} µs ({kept / skipped:.2f}x)")
    print(f"\n{loadavg()} at end; " + (f"MISSED: {', '.join(missed)}" if missed else "all targets met"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
