#!/usr/bin/env python
"""Where the time of recording a large value goes (issue 17), step by step.

A profiler sees a recording as "pickle, then one COMMIT"; this script takes
the steps apart on a real RSSD (each round in a fresh file), for one array
of ``--mb`` MB:

* **dump**: ``serialize.dump_value`` (pickle protocol 5, the buffer
  out-of-band, its XXH3-128 digest);
* **one transaction** (how ``finish`` wrote blobs before issue 17): the
  bound blob INSERTed in the record's transaction (SQLite copies it into the
  statement, the record, then its pages; spills go to the WAL), the COMMIT
  (the rest of the pages to the WAL), then the checkpoint SQLite's
  auto-checkpoint would run inside that COMMIT (fsync the WAL, copy it into
  the file, fsync the file), timed on its own here (``wal_autocheckpoint``
  off);
* **staged** (``SqliteBlobs.stage`` now): one chunk per transaction, written
  in place into a zeroblob, each followed by a passive checkpoint; the WAL
  writes and the checkpoints are summed separately;
* each with ``synchronous = NORMAL`` (what RSSDs use) and ``OFF`` (not used:
  it shows how much of a checkpoint is the fsyncs);
* floors: the same bytes written to a plain file once (what joblib does),
  twice with an fsync after each (the least a durable WAL database does:
  the WAL, then the database file), and in SQLite's pattern (4 KiB writes,
  a WAL-like file then a database-like one, fdatasync per 16 MiB chunk);
* the disk (file + ``-wal``) sampled every 2 ms during each write.

    python bench/record_phases.py [--mb 200] [--rounds 3] [--page-size 65536]

Not part of the pytest run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DiskSampler, loadavg, machine, machine_line  # noqa: E402

OUT = sys.__stdout__


def one_transaction(db: Path, digest: str, view: memoryview, sync: str) -> dict:
    from rssd_magic.backends.sqlite import SqliteBackend

    b = SqliteBackend.open(db, session_args={"bench": "phases"})
    c = b.conn
    c.execute(f"PRAGMA synchronous = {sync}")
    c.execute("PRAGMA wal_autocheckpoint = 0")  # timed separately below
    t = time.perf_counter
    with DiskSampler(db) as disk:
        t0 = t()
        c.execute("BEGIN IMMEDIATE")
        c.execute("INSERT INTO rssd_magic_blob (digest, size, data) VALUES (?, ?, ?)", (digest, view.nbytes, view))
        t1 = t()
        c.execute("COMMIT")
        t2 = t()
        c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        t3 = t()
    b.close()
    return {"insert": t1 - t0, "commit": t2 - t1, "checkpoint": t3 - t2, "total": t3 - t0, "disk_peak": disk.peak}


def staged(db: Path, digest: str, view: memoryview, sync: str) -> dict:
    from rssd_magic.backends import sqlite_blobs
    from rssd_magic.backends.sqlite import SqliteBackend

    b = SqliteBackend.open(db, session_args={"bench": "phases"})
    b.conn.execute(f"PRAGMA synchronous = {sync}")
    # The engine's explicit checkpoints do all the work either way; without
    # the automatic one inside each COMMIT, the two are timed apart.
    b.conn.execute("PRAGMA wal_autocheckpoint = 0")
    spent = {"writes": 0.0, "checkpoints": 0.0}
    real = sqlite_blobs.checkpoint
    clock = time.perf_counter
    mark = [clock()]

    def timed_checkpoint(conn):
        # Everything since the last checkpoint was a chunk's transaction.
        t0 = clock()
        spent["writes"] += t0 - mark[0]
        real(conn)
        mark[0] = clock()
        spent["checkpoints"] += mark[0] - t0

    sqlite_blobs.checkpoint = timed_checkpoint
    try:
        with DiskSampler(db) as disk:
            t0 = clock()
            mark[0] = t0
            b.blobs.stage(b.blobs.large([(digest, view)]))
            total = clock() - t0
    finally:
        sqlite_blobs.checkpoint = real
    b.close()
    return {**spent, "total": total, "disk_peak": disk.peak}


def file_floor(path: Path, view: memoryview, times: int, sync: bool) -> float:
    t0 = time.perf_counter()
    for _ in range(times):
        with open(path, "wb") as fh:
            for off in range(0, view.nbytes, 4 << 20):
                fh.write(view[off : off + (4 << 20)])
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
    dt = time.perf_counter() - t0
    path.unlink()
    return dt


def page_floor(work: Path, view: memoryview, chunk: int) -> float:
    """SQLite's write pattern with plain files: each chunk written 4 KiB at a
    time to a WAL-like file (reused from its start) and fdatasync'd, then
    4 KiB at a time to the end of a database-like file and fdatasync'd."""
    wal, db = work / "floor.wal", work / "floor.db"
    page = 4096
    t0 = time.perf_counter()
    w = os.open(wal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    d = os.open(db, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for start in range(0, view.nbytes, chunk):
            end = min(start + chunk, view.nbytes)
            for off in range(start, end, page):
                os.pwrite(w, view[off : min(off + page, end)], off - start)
            os.fdatasync(w)
            for off in range(start, end, page):
                os.pwrite(d, view[off : min(off + page, end)], off)
            os.fdatasync(d)
    finally:
        os.close(w)
        os.close(d)
    dt = time.perf_counter() - t0
    wal.unlink()
    db.unlink()
    return dt


def new_file(db: Path, page_size: int | None) -> Path:
    """*db*, created with *page_size* when one is given (only possible before
    the file holds a table)."""
    if page_size:
        import sqlite3

        conn = sqlite3.connect(db)
        conn.execute(f"PRAGMA page_size = {page_size}")
        conn.execute("VACUUM")
        conn.close()
    return db


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", help="where to write (default: the system's temporary folder)")
    ap.add_argument("--page-size", type=int, help="create the RSSDs with this page size (default: SQLite's, 4096)")
    args = ap.parse_args(argv)
    import numpy as np

    from rssd_magic.records.serialize import dump_value

    print(machine_line(machine()), file=OUT, flush=True)
    work = Path(tempfile.mkdtemp(prefix="rssd-phases-", dir=args.dir))
    n = args.mb * 1_000_000 // 8
    rows: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        rows.setdefault(name, []).append(seconds)

    disk: dict[str, list[float]] = {}
    try:
        for r in range(args.rounds):
            arr = np.arange(n, dtype="float64") + r
            t0 = time.perf_counter()
            spec, blobs = dump_value(arr)
            add("dump: pickle + digest (serialize.dump_value)", time.perf_counter() - t0)
            (digest,) = spec["buffers"]
            view = memoryview(dict(blobs)[digest]).cast("B")
            for sync in ("NORMAL", "OFF"):
                db = new_file(work / f"one-{sync}-{r}.db", args.page_size)
                got = one_transaction(db, digest, view, sync)
                for step in ("insert", "commit", "checkpoint", "total"):
                    add(f"one transaction, sync {sync}: {step}", got[step])
                disk.setdefault(f"one transaction, sync {sync}", []).append(got["disk_peak"] / view.nbytes)
                db.unlink()
                db = new_file(work / f"staged-{sync}-{r}.db", args.page_size)
                got = staged(db, digest, view, sync)
                for step in ("writes", "checkpoints", "total"):
                    add(f"staged, sync {sync}: {step}", got[step])
                disk.setdefault(f"staged, sync {sync}", []).append(got["disk_peak"] / view.nbytes)
                for f in work.glob(db.name + "*"):
                    f.unlink()
            add("floor: file written once", file_floor(work / "floor.bin", view, 1, False))
            add("floor: file written twice, fsync each", file_floor(work / "floor.bin", view, 2, True))
            add("floor: SQLite's pattern (4 KiB writes, WAL then file, fdatasync per chunk)", page_floor(work, view, 16 << 20))
            del arr, spec, blobs, view
        page = f"page size {args.page_size}" if args.page_size else "SQLite's default page size"
        print(f"\nrecording one {args.mb} MB float64 array, {args.rounds} rounds, {page}, median [range]; {loadavg()}", file=OUT)
        width = max(map(len, rows))
        for name, xs in rows.items():
            m = statistics.median(xs)
            print(f"{name.ljust(width)}  {m * 1e3:8.1f} ms  [{min(xs) * 1e3:.0f}-{max(xs) * 1e3:.0f}]", file=OUT)
        print("\ndisk peak (file + -wal, sampled every 2 ms) / data:", file=OUT)
        for name, xs in disk.items():
            print(f"  {name.ljust(width)}  {statistics.median(xs):.3f}x", file=OUT)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
