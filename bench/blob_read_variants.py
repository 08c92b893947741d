#!/usr/bin/env python
"""Where the time of a big replay goes: ways of reading one 200 MB blob back
from an RSSD, timed side by side (interleaved rounds, medians), next to the
floor (joblib.load of the same bytes; ``readinto`` from a plain file).

The blob is written with the engine's own path (``SqliteBackend.claim`` +
``finish``: since issue 17 a large blob is several chunk rows), then read
back with ``SqliteBlobs.get`` as it is and with re-done readers, each
changing one thing:

* the destination buffer: zero-filled ``bytearray`` (what get_blob did
  before these measurements: malloc + memset, faulted in 4 KiB pages) vs a
  private anonymous ``mmap`` with ``MADV_HUGEPAGE`` (zero pages from the
  kernel, no memset, 2 MiB faults; numpy's own allocator does the same
  madvise, which is what joblib gets for free);
* the chunk size of ``Blob.read`` (8 MiB, as before, vs 256 KiB, which
  stays in L2);
* ``PRAGMA mmap_size`` (SQLite reads the file through a mapping instead of
  ``pread`` per page);
* the integrity check: one pass after reading vs streamed chunk by chunk;
* where the pages are: still in the ``-wal`` (right after recording) or
  checkpointed into the main file;
* the page size of the file (4 KiB default vs 64 KiB).

The winning combination of issue 6 (mmap+THP destination, 256 KiB chunks,
``mmap_size``, check streamed per chunk) is what ``SqliteBlobs.get`` and
``SqliteBackend.open`` do (sqlite_blobs.py: ``_buffer``, ``READ_CHUNK``;
sqlite_blobs.py: ``MMAP_SIZE``, set by the first large read); its re-done row is labelled "= blobs.get, issue 6".

Supporting evidence for figure c of bench_replay.py; not part of pytest.

    python bench/blob_read_variants.py [--mb 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, machine_line, record_run, summary  # noqa: E402

OUT = sys.__stdout__
KB256 = 256 << 10
MB8 = 8 << 20


def record(db: Path, data: bytes, page_size: int | None, checkpoint: bool) -> str:
    from rssd_magic.backends.sqlite import SqliteBackend
    from rssd_magic.engine.keys import cell_key

    if page_size:
        # Only possible before the file has any table.
        conn = sqlite3.connect(db)
        conn.execute(f"PRAGMA page_size = {page_size}")
        conn.execute("VACUUM")
        conn.close()
    store = SqliteBackend.open(db, session_args={"bench": "blob"})
    if not checkpoint:
        store.conn.execute("PRAGMA wal_autocheckpoint = 0")
    key = cell_key("big = ...", "bench")
    digest = raw_digest(data)
    if not checkpoint:  # the way finish wrote a blob before issue 17: one row, in the record's transaction
        store.conn.execute("BEGIN IMMEDIATE")
        store.conn.execute("INSERT INTO rssd_magic_blob (digest, size, data) VALUES (?, ?, ?)", (digest, len(data), data))
        store.conn.execute("COMMIT")
    record_run(store, key, "big = ...", {"names": {}}, [(digest, data)])
    if checkpoint:
        store.close()
        conn = sqlite3.connect(db)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # pages now only in the main file
        conn.close()
    # else: leave the store open (and so the -wal as the recording left it:
    # pages in the WAL, the WAL not reset), as a kernel that just recorded.
    return digest


def raw_digest(data) -> str:
    """The digest the engine files a raw (out-of-band) buffer under (XXH3-128)."""
    from rssd_magic.records.trust import buffer_digest

    return buffer_digest(data)


def verifier():
    """The engine's one-pass check of a buffer against its digest."""
    from rssd_magic.records.trust import verify

    return verify


def destination(kind: str, size: int):
    """A writable buffer of *size* bytes."""
    if kind == "bytearray":
        return bytearray(size)
    if kind == "mmap+thp":
        out = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if size >= (4 << 20) and hasattr(mmap, "MADV_HUGEPAGE"):
            out.madvise(mmap.MADV_HUGEPAGE)
        return out
    raise ValueError(kind)


def reader(
    db: Path,
    digest: str,
    *,
    dest: str = "mmap+thp",
    chunk: int = KB256,
    mmap_size: int = 0,
    reuse=None,
    fresh=False,
    check: str | None = None,
    unmap_each=False,
):
    """A read of the blob; *fresh*: on a new connection each time (as the
    first replay in a new kernel: SQLite's mapping starts empty).  *check*:
    None (no integrity check), "after" (verify() over the whole buffer, as
    get_blob did before), "streamed" (the engine's Verifier updated chunk
    by chunk while each chunk is still in cache, as get_blob does now) or
    "thread" (the Verifier fed 2 MiB at a time by a second thread, behind
    the copy).  *unmap_each*: SQLite's mapping dropped after each chunk row
    (what blobs.get does for blobs over UNMAP_ABOVE)."""
    import queue
    import threading

    from rssd_magic.records.trust import Verifier

    def connect():
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
        if mmap_size:
            conn.execute(f"PRAGMA mmap_size = {mmap_size}")
        return conn

    shared = None if fresh else connect()

    def read():
        conn = shared or connect()
        pieces, size = rows_of(conn, digest)
        out = reuse if reuse is not None else destination(dest, size)
        view = memoryview(out)
        h = Verifier(digest) if check == "streamed" else None
        if check == "thread":
            behind, hand = Verifier(digest), queue.SimpleQueue()

            def hash_behind():
                while (part := hand.get()) is not None:
                    behind.update(part)

            worker = threading.Thread(target=hash_behind)
            worker.start()
        at = handed = 0
        (limit,) = conn.execute("PRAGMA mmap_size").fetchone()
        for table, rowid, length in pieces:
            with conn.blobopen(table, "data", rowid, readonly=True) as blob:
                for _ in range(0, length, chunk):
                    data = blob.read(chunk)
                    view[at : at + len(data)] = data
                    at += len(data)
                    if h is not None:
                        h.update(data)
                    elif check == "thread" and (at - handed >= (2 << 20) or at == size):
                        hand.put(view[handed:at])
                        handed = at
            if unmap_each and limit:
                conn.execute(f"PRAGMA mmap_size = {limit - 65536}")
                conn.execute(f"PRAGMA mmap_size = {limit}")
        if check == "thread":
            hand.put(None)
            worker.join()
            behind.check()
        view.release()
        if check == "after":
            verifier()(digest, out)
        elif h is not None:
            h.check()
        if fresh:
            conn.close()
        return out

    return read


def rows_of(conn, digest: str) -> tuple[list[tuple[str, int, int]], int]:
    """``([(table, rowid, length)], size)``: the rows holding the blob, in order
    (its chunk rows, or its one row)."""
    rowid, size, stored = conn.execute(
        "SELECT rowid, size, length(data) FROM rssd_magic_blob WHERE digest = ?", (digest,)
    ).fetchone()
    if stored or not size:
        return [("rssd_magic_blob", rowid, size)], size
    chunks = conn.execute(
        "SELECT rowid, length(data) FROM rssd_magic_blob_chunk WHERE digest = ? ORDER BY offset", (digest,)
    ).fetchall()
    return [("rssd_magic_blob_chunk", r, n) for r, n in chunks], size


def apsw_variants(db: Path, digest: str, size: int, verify) -> dict:
    """If apsw is importable: its ``Blob.read_into`` copies straight from
    SQLite's pages into the destination (one copy less than ``Blob.read``).
    Not a dependency; these rows are skipped without it."""
    try:
        import apsw
    except ImportError:
        return {}

    def make(fresh: bool):
        def connect():
            conn = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
            conn.execute(f"PRAGMA mmap_size = {1 << 30}")
            return conn

        shared = None if fresh else connect()

        def read():
            conn = shared or connect()
            rowid, stored = conn.execute(
                "SELECT rowid, length(data) FROM rssd_magic_blob WHERE digest = ?", (digest,)
            ).fetchall()[0]
            pieces = [("rssd_magic_blob", rowid)] if stored else [
                ("rssd_magic_blob_chunk", r) for (r,) in conn.execute(
                    "SELECT rowid FROM rssd_magic_blob_chunk WHERE digest = ? ORDER BY offset", (digest,))]
            out = destination("mmap+thp", size)
            at = 0
            for table, rowid in pieces:
                blob = conn.blob_open("main", table, "data", rowid, False)
                n = blob.length()
                blob.read_into(out, at, n)
                blob.close()
                at += n
            if verify:
                verify(digest, out)
            if fresh:
                conn.close()
            return out

        return read

    return {
        "apsw read_into, mmap+THP, mmap_size, verify after": make(False),
        "  apsw, same, new connection/read": make(True),
    }


def _touch(buf):
    """Write one byte per 4 KiB page, so every page is faulted in."""
    view = memoryview(buf)
    view[::4096] = b"\x01" * len(range(0, len(view), 4096))
    view.release()
    return buf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    print(machine_line(machine()), file=OUT)
    size = args.mb * 1_000_000
    data = os.urandom(size)
    work = Path(tempfile.mkdtemp(prefix="rssd-blob-"))
    try:
        import joblib
        import numpy as np

        from rssd_magic.backends.sqlite import SqliteBackend

        db_ck = work / "checkpointed.sqlite.db"
        db_wal = work / "in-wal.sqlite.db"
        db64 = work / "p64k.sqlite.db"
        digest = record(db_ck, data, None, checkpoint=True)
        record(db_wal, data, None, checkpoint=False)
        record(db64, data, 65536, checkpoint=True)
        jl = work / "array.joblib"
        joblib.dump(np.frombuffer(data, dtype=np.uint8), jl)
        raw = work / "raw.bin"
        raw.write_bytes(data)
        del data

        store_ck = SqliteBackend.open(db_ck, readonly=True)
        store_wal = SqliteBackend.open(db_wal, readonly=True)
        prefaulted = _touch(destination("mmap+thp", size))
        verify = verifier()
        memoryview(prefaulted)[:] = open(raw, "rb").read()  # verify() alone checks real bytes

        def file_readinto():
            out = destination("mmap+thp", size)
            with open(raw, "rb", buffering=0) as fh:
                fh.readinto(out)
            return out

        G = 1 << 30
        variants = {
            "blobs.get as is, chunked, checkpointed": lambda: store_ck.blobs.get(digest),
            "blobs.get as is, one row still in -wal (before issue 17)": lambda: store_wal.blobs.get(digest),
            "bytearray dest, 8 MiB chunks (get_blob before, re-done)": reader(db_ck, digest, dest="bytearray", chunk=MB8),
            "mmap+THP dest, 8 MiB chunks": reader(db_ck, digest, chunk=MB8),
            "mmap+THP dest, 256 KiB chunks": reader(db_ck, digest),
            "mmap+THP, 256 KiB, PRAGMA mmap_size=1GiB": reader(db_ck, digest, mmap_size=G),
            "mmap+THP, 256 KiB, mmap_size, new connection/read": reader(db_ck, digest, mmap_size=G, fresh=True),
            "mmap+THP, 256 KiB, new connection/read": reader(db_ck, digest, fresh=True),
            "mmap+THP, 256 KiB, blob in -wal": reader(db_wal, digest),
            "mmap+THP, 256 KiB, blob in -wal, mmap_size": reader(db_wal, digest, mmap_size=G),
            "64 KiB pages: bytearray, 8 MiB": reader(db64, digest, dest="bytearray", chunk=MB8),
            "64 KiB pages: mmap+THP, 256 KiB": reader(db64, digest),
            "64 KiB pages: mmap+THP, 256 KiB, mmap_size": reader(db64, digest, mmap_size=G),
            "mmap+THP, 256 KiB, mmap_size, verify after": reader(db_ck, digest, mmap_size=G, check="after"),
            "  same, new connection/read": reader(db_ck, digest, mmap_size=G, fresh=True, check="after"),
            "  same, verify streamed per chunk (= blobs.get, issue 6)": reader(db_ck, digest, mmap_size=G, check="streamed"),
            "  same, verify streamed, new connection/read": reader(db_ck, digest, mmap_size=G, fresh=True, check="streamed"),
            "  same, verify in a second thread (2 MiB hand-offs)": reader(db_ck, digest, mmap_size=G, check="thread"),
            "  same, verify streamed, mapping dropped after each chunk": reader(db_ck, digest, mmap_size=G, check="streamed", unmap_each=True),
            "pre-faulted dest (SQLite copy only), 256 KiB": reader(db_ck, digest, reuse=prefaulted),
            "pre-faulted dest, 256 KiB, mmap_size": reader(db_ck, digest, reuse=prefaulted, mmap_size=G),
            "alloc only: bytearray(size)": lambda: bytearray(size),
            "verify(digest) alone (one pass over the buffer)": lambda: verify(digest, prefaulted),
            "alloc only: mmap+THP, touched": lambda: _touch(destination("mmap+thp", size)),
            "peer: joblib.load of the same bytes (array)": lambda: joblib.load(jl),
            "floor: plain file readinto(mmap+THP)": file_readinto,
        }
        variants.update(apsw_variants(db_ck, digest, size, verify))
        variants = {k: v for k, v in variants.items() if v is not None}
        head = open(raw, "rb").read(1000)
        for name, fn in variants.items():  # correctness, and one warm pass each
            got = fn()
            if "alone" not in name and "alloc only" not in name and bytes(memoryview(got).cast("B")[:1000]) != head:
                raise RuntimeError(f"{name}: wrong bytes")
            del got
        samples = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                got = fn()
                samples[name].append(time.perf_counter() - t0)
                del got
        base = summary(samples["blobs.get as is, chunked, checkpointed"])["median"]
        peer = summary(samples["peer: joblib.load of the same bytes (array)"])["median"]
        print(f"\nreading one {args.mb} MB blob, {args.rounds} interleaved rounds, medians (warm page cache):", file=OUT)
        width = max(map(len, variants))
        print(f"{'variant'.ljust(width)}  {'median':>8}     {'GB/s':>5}  {'vs get_blob':>11}  {'vs joblib':>9}", file=OUT)
        for name, xs in samples.items():
            m = summary(xs)["median"]
            print(
                f"{name.ljust(width)}  {m * 1e3:8.1f} ms  {size / m / 1e9:5.2f}  {m / base:10.2f}x  {m / peer:8.2f}x",
                file=OUT,
            )
        store_ck.close()
        store_wal.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
