"""Blobs in an RSSD: content-addressed bytes in our ``rssd_magic_blob``
table, checked against their digest while they are read back.

**Layout.**  Every blob has one ``rssd_magic_blob`` row (digest, size).  A
blob of up to one chunk keeps its bytes in that row's ``data``; a larger
one — SQLite refuses any row over its length limit, 1 GB by default — keeps
an empty ``data`` there and its bytes in ``rssd_magic_blob_chunk`` rows
keyed by (digest, byte offset).  One digest still names one whole value:
specs, signatures and gc never see chunks.  Writers keep one invariant:
*a blob row exists only once all its chunks do* (the row is inserted in the
transaction that checks they tile the blob; gc deletes both together).

**Writing large blobs** (:meth:`SqliteBlobs.stage`): before the record, one
chunk per transaction, with checkpoints that keep the ``-wal`` within a
tenth of the value (or a chunk), so the file plus its WAL stay close to the
data's size while recording (one transaction would put the whole value in
the WAL and then copy it, doubling the disk used until the WAL is reset).
The record's own transaction then re-checks every blob and writes again
whatever a concurrent gc deleted in between (store/blobs.py's ``put``).

**Bytes already there are verified, never trusted** (store/blobs.py): here
they are read back and hashed (:func:`intact`).

**Reading** (:meth:`SqliteBlobs.get`): into one writable buffer, in slices
small enough to stay in cache, through SQLite's file mapping, checking the
digest on the way.
"""

from __future__ import annotations

import json
import mmap
import sqlite3
from typing import Any, Callable, Iterable

from ..records.trust import IntegrityError, Verifier
from ..store.base import Blob, StoreError
from ..store.blobs import ALTERED, SMALL, Blobs, Filling
from ..store.blobs import bytes_view as _bytes_view
from ..store.dialect import Tx
from .sqlite_file import pragmas
from .sqlite_schema import SQL

#: Blobs are read back in slices of this size, into one preallocated buffer:
#: large enough to amortise the call, small enough to stay in L2.
READ_CHUNK = 256 << 10
#: A connection that reads a large blob reads pages through a file mapping
#: this large from then on (no pread per page, which costs 2x joblib's load
#: on a large value: bench/blob_read_variants.py); SQLite caps it at its
#: compile-time maximum (2 GiB in common builds), and pages past it are read
#: one pread at a time.  Set at that first read (:func:`_map`), not at
#: open: a mapping costs every new connection its page faults and unmapping
#: at close — a third of a `stats` over 20,000 cells — and small reads
#: gain nothing from it.
MMAP_SIZE = 1 << 31
#: Blobs from this size up are read through the mapping.
MAP_FROM = 1 << 20
#: Bytes per chunk row of a large blob, and per staging transaction (so the
#: page cache that holds one while it is written stays small).  Rows are
#: kept well under SQLite's length limit (see chunk_size).
CHUNK = 16 << 20
#: Blobs from this size up (and every blob of more than one chunk) are
#: written before the record, in transactions of their own (stage); smaller
#: ones go in the record's transaction.
STAGE_MIN = 1 << 20
#: Room left in a chunk row for its digest, offset and record header.
ROW_OVERHEAD = 1024
#: Blobs larger than this don't keep their file pages mapped while they are
#: read: pages read through SQLite's mapping stay in the process's resident
#: set, so a 1.5 GB value would count twice (the value, and the file).
#: Smaller blobs keep the mapping, so the next replay finds it warm
#: (re-faulting it made a 200 MB read 1.32x slower: bench/README.md).
UNMAP_ABOVE = 512 << 20

BLOB = "rssd_magic_blob"
CHUNKS = "rssd_magic_blob_chunk"


def chunk_size(conn: sqlite3.Connection) -> int:
    """Bytes per chunk row: CHUNK, or less when the connection's
    ``SQLITE_LIMIT_LENGTH`` (the largest row SQLite accepts) is smaller."""
    limit = conn.getlimit(sqlite3.SQLITE_LIMIT_LENGTH)
    return max(1, min(CHUNK, limit - ROW_OVERHEAD if limit > 2 * ROW_OVERHEAD else limit // 2))


class SqliteBlobs(Blobs):
    """``rssd_magic_blob`` (+ ``rssd_magic_blob_chunk``): content-addressed
    bytes in the RSSD."""

    def __init__(self, store: Any):
        super().__init__(store)
        self._using = store.db.using  # the backend's connection, held for one operation
        self._write = store.db.write  # its BEGIN IMMEDIATE … COMMIT

    # -- reading -----------------------------------------------------------------

    def get(self, digest: str) -> bytearray | mmap.mmap:
        """Read a blob into one writable buffer (store/blobs.py), checking its
        digest on the way, in slices small enough to stay in cache."""
        with self._using() as conn:
            # Its rows are read in one snapshot, so a gc committing meanwhile
            # can't pull a chunk from under the read.
            own = not conn.in_transaction
            if own:
                conn.execute("BEGIN")
            try:
                return _read(conn, digest, *_pieces(conn, digest))  # sizes checked before allocating
            finally:
                if own and conn.in_transaction:
                    conn.execute("COMMIT")

    def _small_rows(self, digests: list[str]) -> list[tuple[str, bytes]]:
        try:
            with self._using() as conn:
                return conn.execute(
                    f"""SELECT digest, data FROM {BLOB} WHERE digest IN (SELECT value FROM json_each(?))
                        AND size BETWEEN 1 AND ? AND length(data) = size""",
                    (json.dumps(digests), SMALL),
                ).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"RSSD {self.store.path}: {exc}") from None

    # -- writing -----------------------------------------------------------------

    def large(self, blobs: Iterable[Blob]) -> list[tuple[str, memoryview]]:
        """The blobs :meth:`stage` writes ahead of the record: those that take
        more than one row, and one-row blobs of STAGE_MIN bytes or more."""
        with self._using() as conn:
            least = min(STAGE_MIN, chunk_size(conn) + 1)
        return [(d, _bytes_view(data)) for d, data in blobs if memoryview(data).nbytes >= least]

    def stage(self, big: list[tuple[str, memoryview]]) -> set[str]:
        """Write *big* (from :meth:`large`) now, ahead of the record that will
        name them: one chunk per transaction, and a passive checkpoint (which
        never waits for readers) before the WAL would hold more than a tenth
        of the bytes staged (or one chunk, if that is more).

        A checkpoint fsyncs the WAL and the file (synchronous=NORMAL): each
        costs a few ms on top of its bytes, so fewer of them for a larger
        value (1.5 GB: 10 instead of 90), while the WAL stays within ~10%
        of the value (bench/record_phases.py).

        Blobs already stored are read back and checked (:func:`intact`);
        bad ones are deleted and written again.  A crash part way leaves
        chunks no record names, which gc frees; the record's own transaction
        checks every blob is still there (Blobs.put), so a gc in between costs
        a rewrite, never a record naming a missing blob.  Returns the
        digests whose bytes were checked or written here.
        """
        with self._using() as conn:
            size = chunk_size(conn)
            budget = max(size, sum(view.nbytes for _, view in big) // 10)
            pending = 0

            def written(nbytes: int) -> None:
                # Checkpoint before the next chunk would take the WAL past the
                # budget (a 200 MB value: every chunk; 1.5 GB: every 9).
                nonlocal pending
                pending += nbytes
                if pending + size > budget:
                    checkpoint(conn)
                    pending = 0

            # A page cache that holds a whole chunk (a smaller one spills the
            # zero-filled pages to the WAL and reads them back; in KiB: the chunk
            # and 4 MiB more), and no automatic checkpoint inside each COMMIT.
            with pragmas(conn, cache_size=-(size // 1024 + 4096), wal_autocheckpoint=0):
                for digest, view in big:
                    found = intact(conn, digest)
                    if found:
                        continue  # the same bytes are stored already: no write lock needed
                    if found is False:
                        with self._write() as c:
                            self.drop(Tx(c, SQL), [digest])
                    # The last chunk goes with the blob row (_store checks that
                    # all the others are there); a small blob is one row.
                    for offset in range(0, view.nbytes - size, size):
                        with self._write() as c:
                            if self._exists(Tx(c, SQL), digest):
                                break  # stored meanwhile (by another kernel)
                            _put_chunk(c, digest, offset, view[offset : offset + size])
                        written(size)
                    with self._write() as c:
                        _store(c, digest, view, size)  # nothing if stored meanwhile
                    written(view.nbytes % size or size)
                if pending:
                    checkpoint(conn)
        return {digest for digest, _ in big}

    # -- proven or (re)written in the record's transaction (Blobs.put) --------

    def _holds(self, t: Tx, digest: str, view: memoryview) -> bool | None:
        return intact(t.conn, digest)

    def _add(self, t: Tx, digest: str, view: memoryview) -> bool:
        return _store(t.conn, digest, view, chunk_size(t.conn))

    def check(self, digest: str) -> str | None:
        with self._using() as conn:
            found = intact(conn, digest)
        return None if found else "missing" if found is None else ALTERED

    # -- for gc, in its transaction (tables.gc); gc's write transaction holds
    # the file's write lock, so there is nothing for exclusive() to take --------

    def partial(self, t: Tx) -> list[tuple[str, int]]:
        """Chunks without a blob row (a crash, Ctrl-C, a run taken over), one
        per digest with the bytes they hold."""
        return t.all(
            f"""SELECT k.digest, total(length(k.data)) FROM {CHUNKS} AS k
                WHERE NOT EXISTS (SELECT 1 FROM {BLOB} AS b WHERE b.digest = k.digest) GROUP BY k.digest"""
        )

    def drop(self, t: Tx, digests: list[str]) -> int:
        """Blobs and their chunks; how many blob rows existed."""
        deleted = super().drop(t, digests)
        t.run("DELETE FROM {rssd_magic_blob_chunk} WHERE " + t.d.in_list("digest"), (t.d.listed(digests),))
        return deleted


def checkpoint(conn: sqlite3.Connection) -> None:
    """Copy what the WAL holds into the database file, so the next writer
    starts the WAL over instead of growing it.  PASSIVE: it never waits for
    (or blocks) another connection; a long reader only delays the reset."""
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


# -- the pieces ------------------------------------------------------------------


def _store(c: sqlite3.Connection, digest: str, view: memoryview, size: int) -> bool:
    """Store one blob in transaction *c*: one row when it fits in a chunk of
    *size* bytes, else its chunks (those not there yet) and then its row.
    False when a row for the digest was there already (nothing written)."""
    if view.nbytes <= size:
        return c.execute(
            f"INSERT INTO {BLOB} (digest, size, data) VALUES (?, ?, ?) ON CONFLICT (digest) DO NOTHING",
            (digest, view.nbytes, view),
        ).rowcount == 1
    if c.execute(f"SELECT 1 FROM {BLOB} WHERE digest = ?", (digest,)).fetchone():
        return False
    _complete(c, digest, view, size)
    return True


def intact(conn: sqlite3.Connection, digest: str) -> bool | None:
    """Whether the bytes stored under *digest* have that digest (read back
    and hashed slice by slice, never allocated whole); None when no blob is
    stored under it."""
    try:
        size, pieces = _pieces(conn, digest)
        verifier = Verifier(digest)
        at = 0
        for table, rowid, length in pieces:
            with conn.blobopen(table, "data", rowid, readonly=True) as blob:
                for _ in range(0, length, READ_CHUNK):
                    chunk = blob.read(READ_CHUNK)
                    verifier.update(chunk)
                    at += len(chunk)
        if at != size:
            return False
        verifier.check()
        return True
    except KeyError:
        return None
    except IntegrityError:
        return False


def _pieces(conn: sqlite3.Connection, digest: str) -> tuple[int, list[tuple[str, int, int]]]:
    """``(size, [(table, rowid, length), …])`` of a stored blob, in order;
    KeyError when none is stored, IntegrityError when its rows don't add up
    to its size."""
    row = conn.execute(f"SELECT rowid, size, length(data) FROM {BLOB} WHERE digest = ?", (digest,)).fetchone()
    if row is None:
        raise KeyError(digest)
    rowid, size, stored = row
    if stored or not size:  # one row, which must hold as many bytes as it says
        if not isinstance(size, int) or size != stored:
            raise IntegrityError(f"blob {digest[:24]}…: its row holds {stored} bytes but says {size}")
        return size, [(BLOB, rowid, size)]
    pieces = conn.execute(
        f"SELECT rowid, offset, length(data) FROM {CHUNKS} WHERE digest = ? ORDER BY offset", (digest,)
    ).fetchall()
    if not _tiles([(off, n) for _, off, n in pieces], size):
        raise IntegrityError(f"blob {digest[:24]}…: its chunks do not add up to its {size} bytes")
    return size, [(CHUNKS, rid, n) for rid, _, n in pieces]


def _put_chunk(c: sqlite3.Connection, digest: str, offset: int, piece: memoryview) -> None:
    """One chunk row, unless it is there already.  Written as a zeroblob
    filled in place: the bytes are copied once, into SQLite's pages (binding
    them would copy them twice more, into the statement and the record)."""
    row = c.execute(f"SELECT rowid, length(data) FROM {CHUNKS} WHERE digest = ? AND offset = ?", (digest, offset)).fetchone()
    if row is not None:
        if row[1] == piece.nbytes:
            return  # same digest, offset and length: the same bytes
        c.execute(f"DELETE FROM {CHUNKS} WHERE rowid = ?", (row[0],))
    rowid = c.execute(
        f"INSERT INTO {CHUNKS} (digest, offset, data) VALUES (?, ?, zeroblob(?))", (digest, offset, piece.nbytes)
    ).lastrowid
    with c.blobopen(CHUNKS, "data", rowid) as blob:
        blob.write(piece)


def _complete(c: sqlite3.Connection, digest: str, view: memoryview, size: int) -> None:
    """Make a chunked blob whole in transaction *c*: write the chunks that
    are missing (gc may have freed those staged earlier; another version may
    have used another chunk size), drop the ones that don't fit, then add
    its blob row — the row that says the blob exists."""
    rows = c.execute(f"SELECT offset, length(data) FROM {CHUNKS} WHERE digest = ? ORDER BY offset", (digest,)).fetchall()
    if not _tiles(rows, view.nbytes):
        offsets = range(0, view.nbytes, size)
        for offset in offsets:
            _put_chunk(c, digest, offset, view[offset : offset + size])
        keep = set(offsets)
        c.executemany(
            f"DELETE FROM {CHUNKS} WHERE digest = ? AND offset = ?", [(digest, off) for off, _ in rows if off not in keep]
        )
    c.execute(
        f"INSERT INTO {BLOB} (digest, size, data) VALUES (?, ?, X'') ON CONFLICT (digest) DO NOTHING",
        (digest, view.nbytes),
    )


def _tiles(rows: list[tuple[int, int]], size: int) -> bool:
    """True when ``(offset, length)`` rows, sorted, cover ``[0, size)`` exactly."""
    at = 0
    for offset, length in rows:
        if offset != at or not length:
            return False
        at += length
    return at == size


def _read(conn: sqlite3.Connection, digest: str, size: int, pieces: list[tuple[str, int, int]]):
    """The bytes of ``(table, rowid, length)`` pieces, in order, as one
    buffer; IntegrityError unless they have *digest*."""
    if size >= MAP_FROM:
        _map(conn)
    unmap = _unmapper(conn) if size > UNMAP_ABOVE and len(pieces) > 1 else None
    with Filling(digest, size) as out:
        for table, rowid, length in pieces:
            with conn.blobopen(table, "data", rowid, readonly=True) as blob:
                for _ in range(0, length, READ_CHUNK):
                    out.add(blob.read(READ_CHUNK))
            if unmap is not None:
                unmap()
        return out.done()


def _map(conn: sqlite3.Connection) -> None:
    """Have the connection read the file through a mapping from now on
    (:data:`MMAP_SIZE`)."""
    (limit,) = conn.execute("PRAGMA mmap_size").fetchone()
    if limit <= 65536:  # (SQLite reports its own cap once set: set once)
        conn.execute(f"PRAGMA mmap_size = {MMAP_SIZE}").fetchall()


def _unmapper(conn: sqlite3.Connection) -> Callable[[], None] | None:
    """A function that makes SQLite drop its file mapping (so the pages
    read so far leave the resident set; the page cache keeps them), or None
    when the connection maps nothing.  SQLite unmaps the file whenever
    ``mmap_size`` changes (os_unix.c, SQLITE_FCNTL_MMAP_SIZE), and maps it
    again, lazily, on the next read: two changes drop it and keep the limit."""
    (limit,) = conn.execute("PRAGMA mmap_size").fetchone()
    if limit <= 65536:
        return None

    def unmap() -> None:
        conn.execute(f"PRAGMA mmap_size = {limit - 65536}").fetchall()
        conn.execute(f"PRAGMA mmap_size = {limit}").fetchall()

    return unmap
