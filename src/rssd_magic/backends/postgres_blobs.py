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
* **On write**, a digest already stored is proven to hold the bytes being
  recorded before the record that names it commits: its row, chunk numbers
  and lengths (from the TOAST pointers, nothing read) must be what the
  writer would store, then its bytes are compared with the writer's — a
  small blob's come back with that first query (one round trip), a large
  one's are streamed back and compared chunk by chunk.  Reading back beat
  hashing on the server: PostgreSQL's own sha256 ran at ~180 MB/s, md5 at
  ~450 MB/s, a binary stream back at ~500 MB/s, and it costs the shared
  server no CPU (bench figure p4).  A missing, short, extra or changed
  chunk, or a size that lies, gets the blob rewritten from the writer's
  bytes in the same transaction — so ``--force`` repairs a cell whose blob
  was damaged.

Large blobs are also kept in a cache on this machine (:class:`LocalCache`):
a server reassembles a value from 2 KB TOAST pieces and sends it through a
socket, several times slower than reading a local file (bench_postgres.py,
figure p3), and a digest names its bytes forever, so a copy can't go stale.
The server still says whether the blob exists; the copy is checked against
the digest on every read and dropped when it does not match.  The cache
opens regular files of this user only (never through a symlink, never a
FIFO that would block), and checks the file's size before allocating.

Blobs and :meth:`gc` exclude each other through a transaction-level advisory
lock (shared for writers, exclusive for gc): a run that found a blob already
stored, and so did not upload it, can't have it deleted under its record.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import psycopg

from ..records.digests import KNOWN
from ..records.trust import IntegrityError, Verifier
from ..store.base import Blob, StoreError
from .postgres_conn import Sql, cause
from .sqlite_blobs import _buffer

#: Bytes per chunk row: large enough that per-row costs vanish, small
#: enough to keep the server's and the driver's buffers small.
CHUNK = 4 << 20
#: Blobs from this size up are kept in the local cache.
CACHE_MIN = 1 << 20
#: ``$RSSD_MAGIC_BLOB_CACHE``: the cache's folder, or ``off``; and its size cap.
ENV_CACHE = "RSSD_MAGIC_BLOB_CACHE"
ENV_CACHE_BYTES = "RSSD_MAGIC_BLOB_CACHE_BYTES"
CACHE_BYTES = 4 << 30
_HEX = frozenset("0123456789abcdef")
#: Blobs up to this size come back with their row, in the same round trip.
INLINE = 64 << 10
#: Slowest link a blob read is given time for, on top of the busy timeout
#: (bytes per second): a read's deadline grows with the blob's size.
MIN_RATE = 1 << 20
#: Tries at writing one digest while other writers race to store it.
PUT_TRIES = 3

#: A blob's row, what its chunks add up to (sizes come from the TOAST
#: pointers: nothing is read), and a small blob's bytes.
HEAD = f"""SELECT b.size, b.chunks, count(c.n), coalesce(sum(octet_length(c.data)), 0),
                  CASE WHEN b.size <= {INLINE} AND b.chunks = 1 THEN
                      (SELECT d.data FROM {{rssd_magic_blob_chunk}} AS d WHERE d.digest = b.digest AND d.n = 0) END
           FROM {{rssd_magic_blob}} AS b LEFT JOIN {{rssd_magic_blob_chunk}} AS c ON c.digest = b.digest
           WHERE b.digest = %s GROUP BY b.digest, b.size, b.chunks"""
#: What is stored under a digest: its row, each chunk's number and length
#: (from the TOAST pointers: nothing is read), and a small blob's bytes.
STORED = f"""SELECT b.size, b.chunks, c.n, octet_length(c.data), CASE WHEN b.size <= {INLINE} THEN c.data END
            FROM {{rssd_magic_blob}} AS b LEFT JOIN {{rssd_magic_blob_chunk}} AS c ON c.digest = b.digest
            WHERE b.digest = %s ORDER BY c.n"""


class LocalCache:
    """Verified copies of large blobs in a folder of this machine, by digest,
    least recently read evicted past a size cap."""

    def __init__(self, root: Path, limit: int = CACHE_BYTES):
        self.root = root
        self.limit = limit

    @classmethod
    def from_env(cls) -> "LocalCache | None":
        where = os.environ.get(ENV_CACHE)
        if where is not None and where.strip().lower() in ("", "0", "off", "no", "none"):
            return None
        if where:
            root = Path(where).expanduser()
        else:
            root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rssd_magic" / "blobs"
        try:
            limit = int(os.environ.get(ENV_CACHE_BYTES, CACHE_BYTES))
        except ValueError:
            limit = CACHE_BYTES
        return cls(root, limit)

    def path(self, digest: str) -> Path | None:
        """Where *digest* is kept; None for a digest that is not a plain
        algorithm and hex (it names a file: nothing else may get in)."""
        algo, _, hexd = digest.partition(":")
        if algo not in KNOWN or len(hexd) < 16 or not set(hexd) <= _HEX:
            return None
        return self.root / algo / hexd[:2] / hexd

    def read(self, digest: str, size: int) -> Any:
        """The blob, checked, or None (not here, or not what it should be:
        then the copy is deleted).  Only a regular file of this user is
        read, and only when it has *size* bytes."""
        path = self.path(digest)
        if path is None:
            return None
        try:
            # O_NONBLOCK: a FIFO planted here opens at once (and is refused below).
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink: never followed
                _unlink(path)
            return None
        with os.fdopen(fd, "rb", buffering=0) as fh:
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                    raise IntegrityError("not a regular file of this user")
                if st.st_size != size:
                    raise IntegrityError("size")
                out = _buffer(size)
                view = memoryview(out)
                verifier = Verifier(digest)
                try:
                    for offset in range(0, size, CHUNK):
                        part = view[offset : offset + CHUNK]
                        if fh.readinto(part) != len(part):
                            raise IntegrityError("short read")
                        verifier.update(part)
                finally:
                    view.release()
                verifier.check()
            except (IntegrityError, OSError):
                _unlink(path)
                return None
        try:
            os.utime(path, follow_symlinks=False)  # most recently read: evicted last
        except OSError:
            pass
        return out

    def write(self, digest: str, data: Any) -> None:
        """Keep a copy (atomically: a reader sees all of it or nothing);
        best effort, since the server has the blob anyway."""
        path = self.path(digest)
        if path is None:
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
            with os.fdopen(os.open(tmp, flags, 0o600), "wb") as fh:
                fh.write(memoryview(data))
            os.replace(tmp, path)
            self._evict()
        except OSError:
            _unlink(tmp)

    def _evict(self) -> None:
        files = []
        for p in self.root.glob("*/*/*"):
            try:
                st = p.lstat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.limit:
                break
            _unlink(p)
            total -= size


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def lock_key(schema: str) -> int:
    """The advisory lock (a signed 64-bit key) that blob writers and gc of
    one schema share."""
    return int.from_bytes(hashlib.sha256(f"rssd_magic.blobs:{schema}".encode()).digest()[:8], "big", signed=True)


def chunks_of(view: memoryview, step: int) -> Callable[[], Iterator[memoryview]]:
    """A blob in memory as chunks, as often as asked."""
    return lambda: (view[i : i + step] for i in range(0, view.nbytes, step))


class PgBlobs:
    """``rssd_magic_blob``: content-addressed bytes on the server."""

    def __init__(self, store: Any, chunk: int = CHUNK):
        # The PostgresBackend: its statements (q), reads and transactions,
        # which reconnect and ride out an outage.
        self.store = store
        self.lock = lock_key(store.schema)
        self.where = store.location
        self.chunk = chunk
        self.cache = LocalCache.from_env()

    @property
    def q(self) -> Sql:
        return self.store.q

    def get(self, digest: str) -> Any:
        """Read a blob into one writable buffer, checking its digest on the way."""
        try:
            return self._get(digest)
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL {self.where}: {cause(exc)}") from None

    def _get(self, digest: str) -> Any:
        found = self.store._fetch(HEAD, (digest,))
        if not found:
            raise KeyError(digest)
        size, chunks, stored, stored_bytes, inline = int(found[0][0]), int(found[0][1]), *found[0][2:]
        cached = size >= CACHE_MIN and self.cache is not None
        if cached:
            out = self.cache.read(digest, size)
            if out is not None:
                return out
        # Trust no row for its size: the chunks must add up before a buffer is made.
        if int(stored) != chunks or int(stored_bytes) != size:
            raise IntegrityError(
                f"blob {digest[:24]}… is incomplete or altered ({int(stored_bytes)} bytes in {int(stored)} chunks "
                f"stored for a recorded {size} bytes in {chunks})"
            )
        if inline is not None:
            verifier = Verifier(digest)
            verifier.update(inline)
            verifier.check()
            return bytearray(inline)
        out = self.store._attempts(lambda conn: self._stream_into(conn, digest, size, chunks))
        if cached:
            self.cache.write(digest, out)
        return out

    def _stream_into(self, conn: psycopg.Connection, digest: str, size: int, chunks: int) -> Any:
        out = _buffer(size)
        view = memoryview(out)
        verifier = Verifier(digest)
        offset = n = 0
        try:
            with self.q.tx(conn, self.deadline(size)):
                for chunk in self.chunks(conn, digest):
                    end = offset + len(chunk)
                    if end > size:
                        raise IntegrityError(f"blob {digest[:24]}… has more bytes than its recorded size {size}")
                    verifier.update(chunk)
                    view[offset:end] = chunk
                    offset, n = end, n + 1
        finally:
            view.release()
        if offset != size or n != chunks:
            raise IntegrityError(f"blob {digest[:24]}… is incomplete ({offset} of {size} bytes stored)")
        verifier.check()
        return out

    def check(self, digest: str) -> str | None:
        """What the server holds under *digest*, hashed as it streams (the
        local cache is not asked: the server's bytes are what teammates read)."""
        try:
            found = self.store._fetch(HEAD, (digest,))
            if not found:
                return "missing"
            size, chunks = int(found[0][0]), int(found[0][1])
            if int(found[0][2]) != chunks or int(found[0][3]) != size:
                return f"{int(found[0][3])} bytes in {int(found[0][2])} chunks stored, its row says {size} in {chunks}"
            self.store._attempts(lambda conn: self._stream_into(conn, digest, size, chunks))
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL {self.where}: {cause(exc)}") from None
        except IntegrityError:
            return "its stored bytes do not match its digest"
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

    def put_many(self, blobs: Iterable[Blob], conn: psycopg.Connection | None = None) -> None:
        """Store blobs (a digest already stored is checked, and rewritten
        unless it holds these bytes).  Inside the caller's transaction when
        *conn* is given, else one transaction each."""
        if conn is not None:
            for digest, data in blobs:
                self.put(conn, digest, data)
            return
        self.store._writable()
        for digest, data in blobs:
            self.store._tx(lambda c, _retry, d=digest, b=data: self.put(c, d, b))

    def put(self, c: psycopg.Connection, digest: str, data: Any) -> bool:
        """One blob, in the transaction open on *c*; False when the stored
        copy was proven to be these bytes."""
        view = memoryview(data)
        if not view.c_contiguous:
            view = memoryview(bytes(view))
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        return self.put_stream(c, digest, view.nbytes, chunks_of(view, self.chunk))

    def put_stream(self, c: psycopg.Connection, digest: str, size: int, chunks: Callable[[], Iterable[Any]]) -> bool:
        """One blob of *size* bytes, from *chunks()* (each :attr:`chunk` bytes,
        the last one shorter; asked again when the bytes are needed twice),
        in the transaction open on *c*.  Returns False when the stored copy
        was proven to be these bytes, True when they were (re)written.
        Whatever *chunks* raises (a digest check) rolls it back with the
        caller's transaction."""
        q = self.q
        c.execute("SELECT pg_advisory_xact_lock_shared(%s)", (self.lock,))
        count = max(1, -(-size // self.chunk))
        for _ in range(PUT_TRIES):
            stored = c.execute(q(STORED), (digest,)).fetchall()
            if stored:
                if self._same(c, digest, stored, size, count, chunks):
                    return False
                # Wrong bytes under this digest: replaced by ours.  Waits for
                # a concurrent writer; if one rewrote it meanwhile, its copy
                # is checked on the next turn.
                c.execute(q("DELETE FROM {rssd_magic_blob} WHERE digest = %s"), (digest,))
            c.execute(q("DELETE FROM {rssd_magic_blob_chunk} WHERE digest = %s"), (digest,))
            if c.execute(
                q("""INSERT INTO {rssd_magic_blob} (digest, size, chunks) VALUES (%s, %s, %s)
                     ON CONFLICT (digest) DO NOTHING RETURNING 1"""),
                (digest, size, count),
            ).fetchone():
                self._write_chunks(c, digest, size, chunks)
                return True
        raise StoreError(f"PostgreSQL {self.where}: blob {digest[:24]}… is being rewritten by others; try again")

    def _same(self, c: psycopg.Connection, digest: str, stored: list[tuple], size: int, count: int,
              chunks: Callable[[], Iterable[Any]]) -> bool:  # fmt: skip
        """True when the stored rows (STORED) hold exactly *chunks()*: the
        same row, chunk numbers and lengths, then the same bytes — a small
        blob's came with its row, a large one's are read back and compared
        chunk by chunk (stopping at the first difference)."""
        if int(stored[0][0]) != size or int(stored[0][1]) != count or len(stored) != count:
            return False
        if [(n, length) for _, _, n, length, _ in stored] != [(n, len(m)) for n, m in enumerate(self._lengths(size))]:
            return False
        theirs = (row[4] for row in stored) if size <= INLINE else self.chunks(c, digest)
        for mine, stored_chunk in zip(chunks(), theirs):
            if bytes(mine) != stored_chunk:  # bytes(): memcmp, where a memoryview compares item by item
                return False
        return True

    def _lengths(self, size: int) -> list[range]:
        return [range(min(self.chunk, size - i)) for i in range(0, size, self.chunk)] or [range(0)]

    def _write_chunks(self, c: psycopg.Connection, digest: str, size: int, chunks: Callable[[], Iterable[Any]]) -> None:
        written = n = 0
        with c.cursor() as cur:
            insert = self.q("INSERT INTO {rssd_magic_blob_chunk} (digest, n, data) VALUES (%s, %s, %b)")
            for n, chunk in enumerate(chunks()):
                cur.execute(insert, (digest, n, chunk))
                written += memoryview(chunk).nbytes
            if size == 0:
                cur.execute(insert, (digest, 0, b""))
        if written != size:
            raise ValueError(f"blob {digest[:24]}…: {written} bytes given for a size of {size}")

    # -- for gc, in its transaction (tables.gc) ----------------------------------

    def exclusive(self, t: Any) -> None:
        """Take the blob lock exclusively: a run that skipped uploading a blob
        because it was stored holds it shared until its record commits, so
        gc sees that record or runs before it."""
        t.conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.lock,))

    def listing(self, t: Any) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        return t.all("SELECT digest, size FROM {rssd_magic_blob}"), []  # chunks go with their row

    def drop(self, t: Any, digests: list[str]) -> None:
        t.run("DELETE FROM {rssd_magic_blob} WHERE digest = ANY(?)", (list(digests),))

    def sizes(self) -> dict[str, int]:
        return {d: int(s) for d, s in self.store._fetch("SELECT digest, size FROM {rssd_magic_blob}")}

    def delete(self, digests: Iterable[str]) -> int:
        wanted = list(digests)
        self.store._writable()

        def tx(c: psycopg.Connection, _retry: bool) -> int:
            c.execute("SELECT pg_advisory_xact_lock(%s)", (self.lock,))
            return c.execute(self.q("DELETE FROM {rssd_magic_blob} WHERE digest = ANY(%s)"), (wanted,)).rowcount

        return self.store._tx(tx)
