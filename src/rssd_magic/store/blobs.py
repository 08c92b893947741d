"""What every blob store does alike, whatever holds the bytes: the buffer a
blob is read into, its bytes checked against its digest as they arrive,
a stored copy proven before a record names it, and the rows gc and
``forget`` list and delete.

**Bytes already there are verified, never trusted** (:meth:`Blobs.put`): a
row under a digest may hold other bytes (planted, or rotten), and a record
that names it would fail every replay.  So before a record names a blob
that was stored already, the store proves its copy holds these bytes
(``_holds``: it hashes them, or compares them with the writer's); a wrong
copy is deleted and written anew in the same transaction, which is how
``--force`` repairs a cell.

A store's blob module (``backends/*_blobs.py``) keeps what only it can do:
how a blob is cut into rows, written, read back and proven.  Both stores
keep one ``rssd_magic_blob`` row per digest with its ``size``, so listing,
sizes and deleting are one statement each here, in the store's dialect.
"""

from __future__ import annotations

import mmap
from typing import Any, Iterable

from ..records.trust import IntegrityError, Verifier
from .base import Blob, StoreError
from .dialect import Tx

#: Tries at writing one digest while other writers race to store it.
PUT_TRIES = 3
#: Blobs from this size up are read into huge-page mappings (see buffer).
HUGE_BUFFER = 4 << 20
#: Bytes read are handed to the digest check in slices of this size: few
#: enough hand-offs to its thread, small enough to keep both cores busy.
HASH_SPAN = 8 << 20
#: Blobs up to this size are read together on a replay (:meth:`Blobs.get_small`).
SMALL = 64 << 10
#: What :meth:`~rssd_magic.store.base.BlobStore.check` says of a blob whose
#: bytes are there but not the ones its digest names.
ALTERED = "its stored bytes do not match its digest"


def buffer(size: int) -> bytearray | mmap.mmap:
    """A writable, zero-initialised buffer of *size* bytes.

    Measured on a 200 MB array (bench/profile_replay.py): zero-filling a
    ``bytearray`` cost more than joblib's whole load, so large blobs go into
    a private anonymous mapping with huge pages (zeroed by the kernel,
    faulted in 2 MiB at a time, what numpy's allocator does).  numpy arrays
    built on either buffer are writable."""
    if size >= HUGE_BUFFER and hasattr(mmap, "MAP_PRIVATE"):
        out = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            out.madvise(mmap.MADV_HUGEPAGE)
        return out
    return bytearray(size)


def bytes_view(data: Any) -> memoryview:
    """*data* as a flat view of bytes (what a chunk is cut from); an array
    that is not contiguous is copied first, since it can't be cast."""
    view = memoryview(data)
    if not view.c_contiguous:
        view = memoryview(bytes(view))
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class Filling:
    """One blob's bytes arriving in order, copied into one buffer of its
    recorded size and hashed on the way; :meth:`done` is the buffer, or
    IntegrityError unless the bytes are all there and have the digest.

    Use as a ``with`` block: the view into the buffer is released however
    the block ends (a mapping with a view open can't be closed)."""

    def __init__(self, digest: str, size: int):
        self.digest, self.size = digest, size
        self.out = buffer(size)
        self.view = memoryview(self.out)
        self.verifier = Verifier(digest)
        self.at = self.hashed = 0

    def add(self, chunk: Any) -> None:
        end = self.at + len(chunk)
        if end > self.size:
            raise IntegrityError(f"blob {self.digest[:24]}… has more bytes than its recorded size {self.size}")
        self.view[self.at : end] = chunk
        self.at = end
        if end - self.hashed >= HASH_SPAN:
            # What landed is checked in large slices, on a second core while
            # the next ones are read (trust.Verifier).
            self.verifier.update(self.view[self.hashed : end])
            self.hashed = end

    def done(self, whole: bool = True) -> Any:
        """The buffer; *whole* False: the store found pieces missing or extra
        even if the bytes add up."""
        if self.at != self.size or not whole:
            raise IntegrityError(f"blob {self.digest[:24]}… is incomplete ({self.at} of {self.size} bytes stored)")
        self.verifier.update(self.view[self.hashed : self.at])
        self.view.release()
        self.verifier.check()
        return self.out

    def __enter__(self) -> "Filling":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.view.release()


def verified(digest: str, data: Any) -> bytearray:
    """A small blob read in one piece, as a writable buffer, once its bytes
    are found to have *digest* (IntegrityError otherwise)."""
    verifier = Verifier(digest)
    verifier.update(data)
    verifier.check()
    return bytearray(data)


def checked(rows: Iterable[tuple[str, Any]]) -> dict[str, bytearray]:
    """``{digest: bytes}`` of the *rows* whose bytes have their digest (the
    others are left out, for the one-by-one read to report)."""
    out = {}
    for digest, data in rows:
        try:
            out[digest] = verified(digest, data)
        except IntegrityError:
            continue
    return out


class Blobs:
    """The half of a blob store written once: sizes, deletes and gc's
    listing, as statements on the journal it belongs to (*store*: its
    ``query`` and ``write``)."""

    def __init__(self, store: Any):
        self.store = store

    def put_many(self, blobs: Iterable[Blob], conn: Any = None, checked: Iterable[str] = frozenset()) -> None:
        """Store blobs (idempotent), in the caller's transaction open on
        *conn*, or in one transaction each.  A digest *checked* ahead of the
        record (a store's ``stage``) costs one lookup here, and is written
        again if a gc freed it since."""
        if conn is None:
            for digest, data in blobs:
                self.store.write(lambda t, _retrying, d=digest, b=data: self.put(t, d, b))
            return
        t = Tx(conn, self.store.dialect)
        for digest, data in blobs:
            self.put(t, digest, data, digest in checked)

    def put(self, t: Tx, digest: str, data: Any, checked: bool = False) -> bool:
        """One blob, in transaction *t*: False when the stored copy was proven
        to be these bytes, True when they were (re)written."""
        view = bytes_view(data)
        self.shared(t)
        for _ in range(PUT_TRIES):
            found = (self._exists(t, digest) or None) if checked else self._holds(t, digest, view)
            if found:
                return False
            if found is False:
                # Wrong bytes under this digest: replaced by ours.  Waits for a
                # concurrent writer; if one rewrote it meanwhile, its copy is
                # checked on the next turn.
                self.drop(t, [digest])
            if self._add(t, digest, view):
                return True
        where = f"{self.store.kind} {self.store.location}"
        raise StoreError(f"{where}: blob {digest[:24]}… is being rewritten by others; try again")

    def shared(self, t: Tx) -> None:
        """Keep gc away from blobs until *t* ends (:meth:`exclusive`)."""

    def _exists(self, t: Tx, digest: str) -> bool:
        return t.one("SELECT 1 FROM {rssd_magic_blob} WHERE digest = ?", (digest,)) is not None

    def _holds(self, t: Tx, digest: str, view: memoryview) -> bool | None:
        """Whether the copy stored under *digest* is *view*'s bytes; None
        when none is stored."""
        raise NotImplementedError

    def _add(self, t: Tx, digest: str, view: memoryview) -> bool:
        """Store *view* under *digest*; False when a row for it was there
        already (written by another writer meanwhile: nothing written)."""
        raise NotImplementedError

    def get_small(self, digests: Iterable[str]) -> dict[str, bytearray]:
        """Of *digests*, the blobs of at most :data:`SMALL` bytes in one
        piece, read together (one statement, not one per blob: a replay of
        a cell that bound ten small values) and each checked against its
        digest.  What is left out — larger, missing, or not what its digest
        says — is for :meth:`get` to read, or to say what is wrong with it."""
        wanted = list(dict.fromkeys(digests))
        return checked(self._small_rows(wanted)) if len(wanted) > 1 else {}

    def _small_rows(self, digests: list[str]) -> Iterable[tuple[str, Any]]:
        """``(digest, bytes)`` of the one-piece blobs of 1 to SMALL bytes
        among *digests* (a store that can't read them together: none)."""
        return ()

    def sizes(self) -> dict[str, int]:
        return dict(self.store.query("SELECT digest, size FROM {rssd_magic_blob}"))

    def delete(self, digests: Iterable[str]) -> int:
        """Delete blobs (gc's lock taken, as gc takes it); how many existed."""
        wanted = list(digests)

        def tx(t: Any, _retrying: bool) -> int:
            self.exclusive(t)
            return self.drop(t, wanted)

        return self.store.write(tx)

    # -- for gc, in its transaction (tables.gc) ----------------------------------

    def exclusive(self, t: Any) -> None:
        """Keep out, until *t* ends, writers that found a blob stored and so
        did not write it (nothing to take where write transactions exclude
        each other)."""

    def listing(self, t: Any) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """``(digest, size)`` of every blob, and of what writes cut short left
        (:meth:`partial`)."""
        return t.all("SELECT digest, size FROM {rssd_magic_blob}"), self.partial(t)

    def partial(self, t: Any) -> list[tuple[str, int]]:
        """``(digest, bytes)`` of pieces no blob row owns yet (none where a
        blob's pieces go with its row)."""
        return []

    def drop(self, t: Any, digests: list[str]) -> int:
        """Delete blobs in transaction *t*; how many rows existed."""
        return t.run("DELETE FROM {rssd_magic_blob} WHERE " + t.d.in_list("digest"), (t.d.listed(digests),)).rowcount
