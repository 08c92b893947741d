"""Blobs on a PostgreSQL server: content-addressed bytes in chunks.

A value is one ``rssd_magic_blob`` row (digest, size, chunk count) and its
bytes in ``rssd_magic_blob_chunk`` rows of :data:`CHUNK` bytes: a 200 MB
array is never one parameter, one ``bytea`` or one result.  Chunks are sent
as binary parameters and read back as a binary stream (single-row mode), each
copied once into the output buffer and hashed on the way, so a changed or
missing chunk is an IntegrityError, never a wrong value.

Nothing stored is trusted for being there:

* **On read**, the chunks must add up to the blob row's size and count
  before a buffer of that size is allocated (a row claiming 1 TB allocates
  nothing), and the bytes are checked against the digest as they arrive.
* **On write** (store/blobs.py), a stored copy's row, chunk numbers and
  lengths (from the TOAST pointers, nothing read) must be what the writer
  would store, then its bytes are compared with the writer's — a small
  blob's come back with that first query (one round trip), a large one's
  are streamed back and compared chunk by chunk.  Reading back beat
  hashing on the server: PostgreSQL's own sha256 ran at ~180 MB/s, md5 at
  ~450 MB/s, a binary stream back at ~500 MB/s, and it costs the shared
  server no CPU (bench figure p4).  A missing, short, extra or changed
  chunk, or a size that lies, gets the blob rewritten.

Large blobs are also kept in a cache on this machine
(store/blobcache.py): a server is several times slower to read from than
a local file.

Blobs and :meth:`gc` exclude each other through a transaction-level advisory
lock (shared for writers, exclusive for gc): a run that found a blob already
stored, and so did not upload it, can't have it deleted under its record.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator

import psycopg

from ..records.trust import IntegrityError
from ..store.blobcache import LocalCache
from ..store.blobs import ALTERED, SMALL, Blobs, Filling, verified
from ..store.dialect import Tx
from .postgres_conn import Sql

#: Bytes per chunk row: large enough that per-row costs vanish, small
#: enough to keep the server's and the driver's buffers small.
CHUNK = 4 << 20
#: Blobs from this size up are kept in the local cache.
CACHE_MIN = 1 << 20
#: Blobs up to this size come back with their row, in the same round trip.
INLINE = 64 << 10
#: Slowest link a blob read is given time for, on top of the busy timeout
#: (bytes per second): a read's deadline grows with the blob's size.
MIN_RATE = 1 << 20

#: A blob's row, what its chunks add up to (sizes come from the TOAST
#: pointers: nothing is read), and a small blob's bytes.
HEAD = f"""SELECT b.size, b.chunks, count(c.n), coalesce(sum(octet_length(c.data)), 0),
                  CASE WHEN b.size <= {INLINE} AND b.chunks = 1 THEN
                      (SELECT d.data FROM {{rssd_magic_blob_chunk}} AS d WHERE d.digest = b.digest AND d.n = 0) END
           FROM {{rssd_magic_blob}} AS b LEFT JOIN {{rssd_magic_blob_chunk}} AS c ON c.digest = b.digest
           WHERE b.digest = %s GROUP BY b.digest, b.size, b.chunks"""
#: The one-chunk blobs of at most SMALL bytes among a list of digests (Blobs.get_small).
SMALL_ONES = f"""SELECT b.digest, d.data FROM {{rssd_magic_blob}} AS b
    JOIN {{rssd_magic_blob_chunk}} AS d ON d.digest = b.digest AND d.n = 0
    WHERE b.digest = ANY(%s) AND b.chunks = 1 AND b.size BETWEEN 1 AND {SMALL} AND octet_length(d.data) = b.size
      AND NOT EXISTS (SELECT 1 FROM {{rssd_magic_blob_chunk}} AS x WHERE x.digest = b.digest AND x.n <> 0)"""
#: What is stored under a digest: its row, each chunk's number and length
#: (from the TOAST pointers: nothing is read), and a small blob's bytes.
STORED = f"""SELECT b.size, b.chunks, c.n, octet_length(c.data), CASE WHEN b.size <= {INLINE} THEN c.data END
            FROM {{rssd_magic_blob}} AS b LEFT JOIN {{rssd_magic_blob_chunk}} AS c ON c.digest = b.digest
            WHERE b.digest = %s ORDER BY c.n"""


def lock_key(schema: str) -> int:
    """The advisory lock (a signed 64-bit key) that blob writers and gc of
    one schema share."""
    return int.from_bytes(hashlib.sha256(f"rssd_magic.blobs:{schema}".encode()).digest()[:8], "big", signed=True)


class PgBlobs(Blobs):
    """``rssd_magic_blob``: content-addressed bytes on the server."""

    def __init__(self, store: Any, chunk: int = CHUNK):
        # The PostgresBackend: its statements (q), reads and transactions,
        # which reconnect and ride out an outage.
        super().__init__(store)
        self.lock = lock_key(store.schema)
        self.chunk = chunk
        self.cache = LocalCache.from_env()

    @property
    def q(self) -> Sql:
        return self.store.q

    def _head(self, digest: str) -> tuple[int, int, Any, str | None]:
        """``(size, chunks, a small blob's bytes, what does not add up)`` of
        a stored blob (KeyError when none is): the chunks must add up to
        the row before a buffer of its size is made."""
        found = self.store._fetch(HEAD, (digest,))
        if not found:
            raise KeyError(digest)
        size, chunks, stored, stored_bytes, inline = int(found[0][0]), int(found[0][1]), *found[0][2:]
        wrong = int(stored) != chunks or int(stored_bytes) != size
        return size, chunks, inline, f"{int(stored_bytes)} bytes in {int(stored)} chunks stored" if wrong else None

    def get(self, digest: str) -> Any:
        """Read a blob into one writable buffer, checking its digest on the way
        (driver errors are StoreError already: the store's reads say so)."""
        size, chunks, inline, wrong = self._head(digest)
        cached = size >= CACHE_MIN and self.cache is not None
        if cached:
            out = self.cache.read(digest, size)
            if out is not None:
                return out
        if wrong:
            raise IntegrityError(f"blob {digest[:24]}… is incomplete or altered ({wrong} for a recorded {size} bytes "
                                 f"in {chunks})")  # fmt: skip
        if inline is not None:
            return verified(digest, inline)
        out = self.store._attempts(lambda conn: self._stream_into(conn, digest, size, chunks))
        if cached:
            self.cache.write(digest, out)
        return out

    def _small_rows(self, digests: list[str]) -> list[tuple[str, bytes]]:
        return self.store._fetch(SMALL_ONES, (digests,))  # one round trip for all of them

    def _stream_into(self, conn: psycopg.Connection, digest: str, size: int, chunks: int) -> Any:
        n = 0
        with Filling(digest, size) as out, self.q.tx(conn, self.deadline(size)):
            for chunk in self.chunks(conn, digest):
                out.add(chunk)
                n += 1
            return out.done(whole=n == chunks)

    def check(self, digest: str) -> str | None:
        """What the server holds under *digest*, hashed as it streams (the
        local cache is not asked: the server's bytes are what teammates read)."""
        try:
            size, chunks, _, wrong = self._head(digest)
            if wrong:
                return f"{wrong}, its row says {size} in {chunks}"
            self.store._attempts(lambda conn: self._stream_into(conn, digest, size, chunks))
        except KeyError:
            return "missing"
        except IntegrityError:
            return ALTERED
        return None

    def deadline(self, size: int) -> float:
        """Seconds a statement moving *size* bytes may take."""
        return self.q.timeout_s + size / MIN_RATE

    def chunks(self, conn: psycopg.Connection, digest: str) -> Iterator[bytes]:
        """The stored chunks of a blob, in order, as a binary stream (one row
        in the driver's memory at a time).  Not checked: callers verify."""
        with conn.cursor(binary=True) as cur:
            for (chunk,) in cur.stream(
                self.q("SELECT data FROM {rssd_magic_blob_chunk} WHERE digest = %s ORDER BY n"), (digest,)
            ):
                yield chunk

    # -- writing: proven or (re)written in the record's transaction (Blobs.put) --

    def shared(self, t: Tx) -> None:
        t.conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (self.lock,))

    def _holds(self, t: Tx, digest: str, view: memoryview) -> bool | None:
        """Whether the stored rows (STORED) hold exactly *view*: the same row,
        chunk numbers and lengths, then the same bytes — a small blob's came
        with its row, a large one's are read back and compared chunk by
        chunk (stopping at the first difference)."""
        stored = t.conn.execute(self.q(STORED), (digest,)).fetchall()
        if not stored:
            return None
        size, count = view.nbytes, self._count(view.nbytes)
        if int(stored[0][0]) != size or int(stored[0][1]) != count or len(stored) != count:
            return False
        if [(n, length) for _, _, n, length, _ in stored] != ([*enumerate(map(len, self._cut(view)))] or [(0, 0)]):
            return False  # an empty blob is one empty chunk
        theirs = (row[4] for row in stored) if size <= INLINE else self.chunks(t.conn, digest)
        for mine, stored_chunk in zip(self._cut(view), theirs):
            if bytes(mine) != stored_chunk:  # bytes(): memcmp, where a memoryview compares item by item
                return False
        return True

    def _add(self, t: Tx, digest: str, view: memoryview) -> bool:
        c, q = t.conn, self.q
        c.execute(q("DELETE FROM {rssd_magic_blob_chunk} WHERE digest = %s"), (digest,))
        if not c.execute(
            q("""INSERT INTO {rssd_magic_blob} (digest, size, chunks) VALUES (%s, %s, %s)
                 ON CONFLICT (digest) DO NOTHING RETURNING 1"""),
            (digest, view.nbytes, self._count(view.nbytes)),
        ).fetchone():
            return False
        with c.cursor() as cur:
            insert = q("INSERT INTO {rssd_magic_blob_chunk} (digest, n, data) VALUES (%s, %s, %b)")
            for n, chunk in enumerate(self._cut(view)):
                cur.execute(insert, (digest, n, chunk))
            if view.nbytes == 0:
                cur.execute(insert, (digest, 0, b""))
        return True

    def _count(self, size: int) -> int:
        return max(1, -(-size // self.chunk))

    def _cut(self, view: memoryview) -> Iterator[memoryview]:
        return (view[i : i + self.chunk] for i in range(0, view.nbytes, self.chunk))

    # -- for gc, in its transaction (tables.gc) ----------------------------------

    def exclusive(self, t: Any) -> None:
        """Take the blob lock exclusively: a run that skipped uploading a blob
        because it was stored holds it shared until its record commits, so
        gc sees that record or runs before it (chunks go with their row)."""
        t.conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.lock,))
