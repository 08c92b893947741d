#!/usr/bin/env python
"""Large values at the hardware's pace (issue 17): ``%%stateful`` next to
joblib.Memory on the same data, in one run.

Every figure times whole cells of one in-process IPython shell, the peers
in turn (A, B, A, B, ...), and reports medians and ranges:

e. replay of a 200 MB DataFrame of mixed dtypes (floats, ints, strings,
   categoricals): ``%%stateful --quiet`` ``df = make_frame(2, ROWS)`` vs
   ``df_j = cached_frame(2, ROWS)`` (a joblib.Memory hit), both warm (each
   file was written, then read once).  The 200 MB array is figure c of
   bench_replay.py, measured the same way.               target <= 1.1x
f. first recording of new 200 MB data, a new ``k`` each round: our cell,
   joblib's first call and a plain cell of the same code; the overheads are
   ``first - plain``.                                     target <= 1.2x
   Beside them, the floors of writing the same bytes to a plain file: once
   (what joblib does), and twice with an fsync each (what a WAL database
   does durably: the WAL, then the checkpoint into the file).
g. disk (RSSD + ``-wal``) sampled every 2 ms while recording 200 MB into a
   fresh RSSD, and right after, over the data size.       target <= 1.2x
h. a 1.5 GB array, in fresh processes (a new kernel each): it records,
   it replays (time vs joblib's load in its own fresh process; memory peak
   VmHWM of the replaying process over the value's size). targets: replay
   <= 1.2x joblib, VmHWM <= 1.3x value, disk peak <= 1.2x

Usage::

    python bench/bench_large.py               # all figures, a few minutes
    python bench/bench_large.py --quick       # 50 MB / 300 MB values, 2 rounds
    python bench/bench_large.py --only eh     # some figures only
    python bench/bench_large.py --json out.json

Needs numpy, pandas, pyarrow and joblib; ~4 GB of free disk for figure h.
Not part of the pytest run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    DiskSampler,
    NullWriter,
    Row,
    child_env,
    files_bytes,
    loadavg,
    machine,
    machine_line,
    report,
    verdict,
)

OUT = sys.__stdout__
HERE = Path(__file__).resolve()


def log(msg: str) -> None:
    print(msg, file=sys.__stderr__, flush=True)


# What the joblib peer caches.  Module-level so joblib can read their source,
# as it would from a module of the user's; the %%stateful cells call the same
# code.
def arange_plus(k, n):
    import numpy as np

    return np.arange(n, dtype="float64") + k


def make_frame(k, rows):
    """About 53 bytes a row: three float64 and two int64 columns, a string
    column (8-10 characters) and a categorical of 100 labels."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(k)
    return pd.DataFrame(
        {
            "x": rng.random(rows),
            "y": rng.random(rows),
            "z": rng.random(rows),
            "i": rng.integers(0, 1 << 40, rows),
            "j": np.arange(rows, dtype="int64") + k,
            "s": pd.array([f"id-{v:06d}" for v in rng.integers(0, 1_000_000, rows)], dtype="str"),
            "c": pd.Categorical.from_codes(rng.integers(0, 100, rows), [f"label {i}" for i in range(100)]),
        }
    )


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def ms(s: dict) -> str:
    return f"{s['median'] * 1e3:.1f} ms [{s['min'] * 1e3:.0f}-{s['max'] * 1e3:.0f}]"


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class Bench:
    def __init__(self, workdir: Path, quick: bool, rounds: int | None):
        import joblib
        from IPython.core.interactiveshell import InteractiveShell

        self.workdir = workdir
        self.quick = quick
        self.n = (50 if quick else 200) * 1_000_000 // 8
        self.rounds = rounds or (2 if quick else 5)
        self.db = workdir / "main.sqlite.db"
        self.shell = InteractiveShell.instance()
        self.shell.run_line_magic("load_ext", "rssd_magic")
        self.magics = self.shell.magics_manager.registry["StatefulMagics"]
        self.magics.rssd_path = str(self.db)
        self.memory = joblib.Memory(location=str(workdir / "joblib"), verbose=0)
        ns = self.shell.user_ns
        ns["cached_arange"] = self.memory.cache(arange_plus)
        ns["cached_frame"] = self.memory.cache(make_frame)
        ns["make_frame"] = make_frame
        self.run("import numpy as np")
        self.rows: list[Row] = []
        self.raw: dict = {}

    def run(self, code: str):
        result = self.shell.run_cell(code)
        if not result.success:
            raise RuntimeError(f"cell failed: {code!r}: {result.error_before_exec or result.error_in_exec!r}")
        return result

    def timed(self, code: str) -> float:
        t0 = time.perf_counter()
        self.run(code)
        return time.perf_counter() - t0

    def states(self, body: str, db: Path | None = None) -> list[str]:
        import sqlite3

        conn = sqlite3.connect(f"file:{db or self.db}?mode=ro", uri=True)
        try:
            return [
                s
                for (s,) in conn.execute(
                    """SELECT s.to_state FROM orchestration_session_state s
                       JOIN orchestration_session_entry e ON e.orchestration_session_entry_id = s.session_entry_id
                       WHERE rtrim(json_extract(e.elaboration, '$.source'), char(10, 13, 32)) = ?
                       ORDER BY s.rowid""",
                    (body.rstrip(),),
                )
            ]
        finally:
            conn.close()

    def interleave(self, cells: dict[str, str], rounds: int) -> dict[str, dict]:
        samples: dict[str, list[float]] = {k: [] for k in cells}
        gc.collect()
        for _ in range(rounds):
            for name, code in cells.items():
                samples[name].append(self.timed(code))
        return {k: stats(v) for k, v in samples.items()}

    # -- e, f: replays ---------------------------------------------------------------

    def replay(self, letter: str, what, body: str, peer: str, check: str) -> None:
        """Figure *letter*: replay of ``%%stateful --quiet`` *body* vs the
        joblib cell *peer*; *check* compares the two values (``a``, ``b``);
        *what(value)* names the value in the table."""
        ours = f"%%stateful --quiet\n{body}"
        self.run(ours)  # records
        self.run(peer)  # joblib's first call
        name, peer_name = body.split("=")[0].strip(), peer.split("=")[0].strip()
        ns = self.shell.user_ns
        ns.pop(name), ns.pop(peer_name)
        self.run(ours)  # one warm replay each, and proof that it restores the value
        self.run(peer)
        if name not in ns or not eval(check, {"a": ns[name], "b": ns[peer_name]}):
            raise RuntimeError(f"{letter}: the replay did not restore {name} (see the [stateful] note)")
        title = what(ns[name])
        s = self.interleave({"ours": ours, "joblib": peer}, 3 * self.rounds)
        if self.states(body) != ["RUNNING", "EXECUTED"]:
            raise RuntimeError(f"{letter}: the cell ran again instead of replaying")
        ratio = s["ours"]["median"] / s["joblib"]["median"]
        self.raw[letter] = s
        self.rows.append(
            Row(f"{letter}. replay {title}", ms(s["ours"]), f"joblib load {ms(s['joblib'])}", f"{ratio:.2f}x",
                "<= 1.1x", verdict(ratio, 1.1), {**s, "ratio": ratio})
        )  # fmt: skip
        ns.pop(name), ns.pop(peer_name)
        gc.collect()

    def frame_replay(self) -> None:
        rows = self.n * 8 // 55  # ~55 bytes a row: as many MB as the array

        def what(df) -> str:
            kinds = ", ".join(dict.fromkeys(str(t) for t in df.dtypes))
            return f"{df.memory_usage(deep=True).sum() / 1e6:.0f} MB DataFrame ({kinds}; {len(df):,} rows)"

        self.replay(
            "e",
            what,
            f"df = make_frame(2, {rows})",
            f"df_j = cached_frame(2, {rows})",
            "a.equals(b) and list(a.dtypes) == list(b.dtypes)",
        )

    # -- g: first recording ------------------------------------------------------------

    def frame_recording(self) -> None:
        """f-df. the first recording of a 200 MB DataFrame of mixed dtypes:
        our cell vs joblib's first call vs a plain cell, overheads over plain."""
        rows = self.n * 8 // 55
        samples: dict[str, list[float]] = {k: [] for k in ("plain", "ours", "durable", "joblib")}
        for r in range(self.rounds):
            k = 5000 + r
            samples["plain"].append(self.timed(f"df_p = make_frame({k}, {rows})"))
            t0 = time.perf_counter()
            samples["ours"].append(self.timed(f"%%stateful --quiet\ndf_s = make_frame({k}, {rows})"))
            self.magics.runner.settle()
            samples["durable"].append(time.perf_counter() - t0)
            samples["joblib"].append(self.timed(f"df_j = cached_frame({k}, {rows})"))
        s = {k: stats(v) for k, v in samples.items()}
        plain = s["plain"]["median"]
        ours, jl, durable = (s[k]["median"] - plain for k in ("ours", "joblib", "durable"))
        self.raw["f-df"] = s
        self.rows.append(
            Row("f-df. first recording of a 200 MB DataFrame (mixed dtypes), overhead", f"{ours * 1e3:.0f} ms",
                f"joblib {jl * 1e3:.0f} ms", f"{ours / jl:.2f}x; plain {ms(s['plain'])}", "<= 1.0x",
                verdict(ours / jl, 1.0), {**s, "ratio": ours / jl})
        )  # fmt: skip
        self.rows.append(
            Row("f-df-durable. until its record is durable, minus plain", f"{durable * 1e3:.0f} ms",
                f"joblib {jl * 1e3:.0f} ms (never synced)", f"{durable / jl:.2f}x", "(info)", "info")
        )  # fmt: skip
        for name in ("df_p", "df_s", "df_j"):
            self.shell.user_ns.pop(name, None)
        gc.collect()

    def recording(self) -> None:
        import numpy as np

        n = self.n
        nbytes = n * 8
        floor_file = self.workdir / "floor.bin"
        data = np.arange(n, dtype="float64")

        def write_file(times: int, sync: bool) -> float:
            t0 = time.perf_counter()
            view = memoryview(data).cast("B")
            for _ in range(times):
                with open(floor_file, "wb") as fh:
                    for off in range(0, nbytes, 4 << 20):
                        fh.write(view[off : off + (4 << 20)])
                    fh.flush()
                    if sync:
                        os.fsync(fh.fileno())
            dt = time.perf_counter() - t0
            floor_file.unlink()
            return dt

        samples: dict[str, list[float]] = {k: [] for k in ("plain", "ours", "durable", "joblib", "file", "file2sync")}
        base = 1000
        gc.collect()
        for r in range(self.rounds):
            k = base + r  # new data every round, for every peer
            samples["plain"].append(self.timed(f"arr_p = np.arange({n}, dtype='float64') + {k}"))
            # What the user waits for (the cell returns), and until the record
            # is durable (written in the background meanwhile).
            t0 = time.perf_counter()
            samples["ours"].append(self.timed(f"%%stateful --quiet\narr_s = np.arange({n}, dtype='float64') + {k}"))
            self.magics.runner.settle()
            samples["durable"].append(time.perf_counter() - t0)
            samples["joblib"].append(self.timed(f"arr_j = cached_arange({k}, {n})"))
            samples["file"].append(write_file(1, False))
            samples["file2sync"].append(write_file(2, True))
        for r in range(self.rounds):
            if self.states(f"arr_s = np.arange({n}, dtype='float64') + {base + r}") != ["RUNNING", "EXECUTED"]:
                raise RuntimeError("f: a recording did not execute exactly once")
        s = {k: stats(v) for k, v in samples.items()}
        plain = s["plain"]["median"]
        ours, jl = s["ours"]["median"] - plain, s["joblib"]["median"] - plain
        self.raw["f"] = s
        mb = nbytes / 1e6
        self.rows.append(
            Row(f"f. first recording of {mb:.0f} MB, overhead (first - plain)", f"{ours * 1e3:.0f} ms",
                f"joblib {jl * 1e3:.0f} ms", f"{ours / jl:.2f}x; plain {ms(s['plain'])}", "<= 1.0x",
                verdict(ours / jl, 1.0), {**s, "ratio": ours / jl})
        )  # fmt: skip
        self.rows.append(
            Row("f'. whole cells: ours / joblib's first call", ms(s["ours"]), ms(s["joblib"]),
                f"{s['ours']['median'] / s['joblib']['median']:.2f}x", "(info)", "info")
        )  # fmt: skip
        durable = s["durable"]["median"] - plain
        self.rows.append(
            Row("f-durable. until the record is durable (written in the background), minus plain",
                f"{durable * 1e3:.0f} ms", f"joblib {jl * 1e3:.0f} ms (never synced)", f"{durable / jl:.2f}x",
                "(info)", "info")
        )  # fmt: skip
        self.rows.append(
            Row(f"f''. floors: {mb:.0f} MB to a file once / twice + fsync", ms(s["file"]), ms(s["file2sync"]),
                f"ours overhead = {ours / s['file2sync']['median']:.2f}x the durable floor", "(info)", "info")
        )  # fmt: skip
        for name in ("arr_p", "arr_s", "arr_j"):
            self.shell.user_ns.pop(name, None)
        gc.collect()

    # -- h: disk while recording ---------------------------------------------------------

    def disk(self) -> None:
        n = self.n
        fresh = self.workdir / "disk.sqlite.db"
        self.run(f"%%stateful --quiet --db {fresh}\nsmall = 1")  # the file exists, with its tables
        before = files_bytes(fresh)
        with DiskSampler(fresh) as sampler:
            self.run(f"%%stateful --quiet --db {fresh}\narr_d = np.arange({n}, dtype='float64') + 7")
            # The record is written in the background: the disk is sampled
            # until it has landed, not only while the cell ran.
            self.magics.runner.settle()
            after = files_bytes(fresh)
        nbytes = n * 8
        wal = Path(str(fresh) + "-wal")
        wal_after = wal.stat().st_size if wal.exists() else 0
        self.raw["g"] = {"before": before, "peak": sampler.peak, "after": after, "samples": sampler.samples, "nbytes": nbytes}
        self.rows.append(
            Row("g. disk peak while recording (RSSD + -wal) / data", f"{sampler.peak / nbytes:.3f}x",
                "joblib 1.000x (one file)", f"after {after / nbytes:.3f}x (-wal {wal_after / 1e6:.1f} MB); "
                f"{sampler.samples} samples", "<= 1.2x", verdict(max(sampler.peak, after) / nbytes, 1.2))
        )  # fmt: skip
        self.shell.user_ns.pop("arr_d", None)


# -- i: 1.5 GB in fresh processes ------------------------------------------------------------


def child(kind: str, db: str, jdir: str, n: int, k: int) -> None:
    """One fresh kernel-like process: run one cell, print what it cost."""
    import numpy as np  # noqa: F401 - imported before the clock starts, as in a notebook
    from IPython.core.interactiveshell import InteractiveShell

    import joblib

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "rssd_magic")
    magics = shell.magics_manager.registry["StatefulMagics"]
    magics.rssd_path = db
    shell.user_ns["cached_arange"] = joblib.Memory(location=jdir, verbose=0).cache(arange_plus)
    shell.run_cell("import numpy as np")
    if kind in ("record", "replay"):
        magics.runner.backend()  # opened before the clock starts, as in a kernel that ran a cell
        name, code = "arr", f"%%stateful --quiet\narr = np.arange({n}, dtype='float64') + {k}"
    else:
        name, code = "arr_j", f"arr_j = cached_arange({k}, {n})"
    base_hwm = status_kb("VmHWM")
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = NullWriter()
    sampler = DiskSampler(Path(db), every=0.005) if kind == "record" else None
    try:
        t0 = time.perf_counter()
        if sampler:
            with sampler:
                result = shell.run_cell(code)
        else:
            result = shell.run_cell(code)
        dt = time.perf_counter() - t0
    finally:
        sys.stdout, sys.stderr = saved
    arr = shell.user_ns.get(name)
    ok = bool(result.success and arr is not None and arr.shape == (n,) and arr[0] == k and arr[-1] == n - 1 + k)
    if kind in ("record", "replay"):
        # Recorded once, and replayed since: one RUNNING, one EXECUTED.
        import sqlite3

        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        states = [s for (s,) in conn.execute(
            "SELECT to_state FROM orchestration_session_state WHERE session_entry_id IS NOT NULL ORDER BY rowid")]
        conn.close()
        ok = ok and states == ["RUNNING", "EXECUTED"]
    out = {"kind": kind, "s": dt, "ok": ok, "hwm": status_kb("VmHWM"), "base_hwm": base_hwm, "nbytes": n * 8}
    if sampler:
        out["disk_peak"] = sampler.peak
        out["disk_after"] = files_bytes(Path(db))
    magics.close()
    print(json.dumps(out))


def huge(workdir: Path, quick: bool, rounds: int) -> list[Row]:
    n = (300 if quick else 1500) * 1_000_000 // 8
    db, jdir = workdir / "huge.sqlite.db", workdir / "joblib-huge"
    need = 2 * n * 8 * 1.3
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise RuntimeError(f"h: needs {need / 1e9:.1f} GB of free disk in {workdir}, has {free / 1e9:.1f} GB")

    def spawn(kind: str) -> dict:
        cmd = [sys.executable, str(HERE), "--child", kind, "--db", str(db), "--jdir", str(jdir), "--n", str(n)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=900)
        if proc.returncode:
            raise RuntimeError(f"h: child {kind} failed:\n{proc.stderr[-3000:]}")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        if not got["ok"]:
            raise RuntimeError(f"h: child {kind} did not get the right array: {got}")
        return got

    rec = spawn("record")
    dump = spawn("jdump")
    loads: dict[str, list[dict]] = {"replay": [], "jload": []}
    for _ in range(rounds):
        for kind in loads:
            loads[kind].append(spawn(kind))
    gb = n * 8 / 1e9
    r = stats([x["s"] for x in loads["replay"]])
    j = stats([x["s"] for x in loads["jload"]])
    hwm = max(x["hwm"] for x in loads["replay"])
    jhwm = max(x["hwm"] for x in loads["jload"])
    base = statistics.median(x["base_hwm"] for x in loads["replay"])
    nbytes = n * 8
    return [
        Row(f"h. {gb:.1f} GB array: first recording (fresh process)", f"{rec['s'] * 1e3:.0f} ms",
            f"joblib first call {dump['s'] * 1e3:.0f} ms", f"{rec['s'] / dump['s']:.2f}x", "records", "PASS",
            {"record": rec, "jdump": dump}),
        Row(f"h'. {gb:.1f} GB replay (fresh process each)", ms(r), f"joblib load {ms(j)}",
            f"{r['median'] / j['median']:.2f}x", "<= 1.2x", verdict(r["median"] / j["median"], 1.2),
            {"replay": loads["replay"], "jload": loads["jload"]}),
        Row(f"h''. {gb:.1f} GB replay: memory peak (VmHWM) / value", f"{hwm / nbytes:.3f}x",
            f"joblib {jhwm / nbytes:.3f}x", f"{hwm / 1e9:.2f} GB, {base / 1e6:.0f} MB before the cell", "<= 1.3x",
            verdict(hwm / nbytes, 1.3)),
        Row(f"h'''. {gb:.1f} GB: disk peak while recording / data", f"{rec['disk_peak'] / nbytes:.3f}x",
            "joblib 1.000x", f"after {rec['disk_after'] / nbytes:.3f}x", "<= 1.2x",
            verdict(rec["disk_peak"] / nbytes, 1.2)),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 50 MB / 300 MB values, 2 rounds")
    ap.add_argument("--rounds", type=int, help="rounds of first recordings (default 5; the replay gets 3x)")
    ap.add_argument("--only", default="efFgh", help="which figures, e.g. --only eh (default: efFgh; F is f for a DataFrame)")
    ap.add_argument("--json", metavar="PATH", help="also save the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--dir", help="where to make the temporary folder (default: the system's)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--jdir", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.db, args.jdir, args.n, 11)
        return 0

    info = machine()
    print(machine_line(info), file=OUT)
    workdir = Path(tempfile.mkdtemp(prefix="rssd-large-", dir=args.dir))
    print(f"workdir: {workdir}", file=OUT, flush=True)
    started = time.perf_counter()
    bench = Bench(workdir, args.quick, args.rounds)
    steps = {
        "e": ("e. DataFrame replay", bench.frame_replay),
        "f": ("f. first recording", bench.recording),
        "F": ("f-df. first recording of a DataFrame", bench.frame_recording),
        "g": ("g. disk while recording", bench.disk),
    }
    saved = sys.stdout, sys.stderr
    try:
        for letter in args.only:
            t0 = time.perf_counter()
            if letter == "h":
                log(f"running h. huge value ... ({loadavg()})")
                bench.rows.extend(huge(workdir, args.quick, 2 if args.quick else 3))
            else:
                title, step = steps[letter]
                log(f"running {title} ... ({loadavg()})")
                sys.stdout = sys.stderr = NullWriter()
                try:
                    step()
                finally:
                    sys.stdout, sys.stderr = saved
            log(f"  done in {time.perf_counter() - t0:.1f} s")
    finally:
        bench.magics.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report(bench.rows, started, quick=args.quick, json_path=args.json, info=info, raw=bench.raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
