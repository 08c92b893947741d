"""Digests of blobs: the names stored bytes go by, checked on every read.

A record's signature covers its blobs through their digests (trust.py), so
every digest is cryptographic — a second preimage would let whoever can
write the store swap a value under a signed record:

* **BLAKE3** (``blake3:<64 hex>``) for everything written now: pickle
  streams, raw array buffers, SQL result blobs (Parquet, Arrow, pickle);
* **SHA-256** (``sha256:<64 hex>``) for pickle streams and result tables of
  older records, still read and checked;
* **XXH3-128** (``xxh3-128:``), what raw buffers were named by before, is
  fast but not collision-resistant (8 changed bytes collided end to end): a
  blob named so is still checked when it is read or copied, but no spec
  naming one is ever loaded (:func:`usable`).

Which algorithm a digest may name is fixed by the blob's kind
(:data:`STREAM`, :data:`BUFFER`), never chosen by the record.

**Checking while reading.**  BLAKE3 costs ~50 ms per 200 MB on one core of
the machine it was measured on — as much as reading the blob.  So a
:class:`Verifier` fed large pieces hashes them on a second thread while the
reader copies the next ones (the hash releases the GIL), and the read of a
200 MB array costs about what joblib's load does.  Small blobs are hashed
inline: a thread would cost more than the hash.
"""

from __future__ import annotations

import hashlib
import hmac
import queue
import threading
import weakref
from typing import Any

import blake3
import xxhash

#: Algorithms a blob read by a loader may be named by, per kind of blob.
STREAM = frozenset({"blake3", "sha256"})  # bytes that get interpreted
BUFFER = frozenset({"blake3"})  # raw out-of-band buffers
#: Every algorithm a stored blob may be checked against (old xxh3 buffers
#: are still copied and verified by export/import and gc, never loaded).
KNOWN = frozenset({"blake3", "sha256", "xxh3-128"})

#: From this size up, hashing in one call uses both cores (blake3's threads).
THREADED_HASH = 4 << 20
#: Bytes a Verifier hashes inline before it hands the rest to a thread.
INLINE_MAX = 2 << 20
#: Pieces queued for the hashing thread at most (the reader waits beyond).
QUEUE_MAX = 32


class IntegrityError(Exception):
    """A blob's bytes don't match the digest its payload names."""


def algorithm(digest: Any) -> str:
    """``blake3`` for ``blake3:…``; ``""`` when *digest* is not a string."""
    return digest.partition(":")[0] if isinstance(digest, str) else ""


def usable(digest: Any, kind: frozenset[str]) -> bool:
    """May a loader read a blob named *digest* as a blob of *kind*?"""
    return algorithm(digest) in kind


def _blake3(data: Any) -> str:
    size = memoryview(data).nbytes
    threads = blake3.blake3.AUTO if size >= THREADED_HASH else 1
    return "blake3:" + blake3.blake3(data, max_threads=threads).hexdigest()


def stream_digest(data: Any) -> str:
    """Digest of a pickle stream or any blob whose bytes get interpreted."""
    return _blake3(data)


def buffer_digest(data: Any) -> str:
    """Digest of raw data (out-of-band pickle buffers)."""
    return _blake3(data)


def _hasher(algo: str) -> Any:
    if algo == "blake3":
        # Free to use both cores: while the reader copies, the pieces it
        # hands over are hashed on what is left; once it is done, the rest
        # on both (small inputs stay on one thread).
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    if algo == "sha256":
        return hashlib.sha256()
    if algo == "xxh3-128":
        return xxhash.xxh3_128()
    raise ValueError(algo)


class Verifier:
    """Checks bytes against a digest as they are read, piece by piece (one
    pass over a large blob instead of a second one after reading it).

    Pieces must not change after :meth:`update` is given them (they are
    hashed later, on another thread, once :data:`INLINE_MAX` bytes were
    seen): hand it bytes read, or the slice of the destination the bytes
    were just copied into — large slices are cheapest.
    """

    def __init__(self, digest: str):
        self.digest = digest
        algo = algorithm(digest) or type(digest).__name__
        if algo not in KNOWN:
            raise IntegrityError(f"blob {str(digest)[:24]}…: unknown digest algorithm {algo!r}")
        self._prefix = algo + ":"
        self._hash = _hasher(algo)
        self._seen = 0
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._failed: list[BaseException] = []

    def update(self, data: Any) -> None:
        if self._queue is None:
            self._seen += memoryview(data).nbytes
            if self._seen <= INLINE_MAX or not isinstance(self._hash, blake3.blake3):
                self._hash.update(data)
                return
            self._start()
        self._queue.put(data)

    def _start(self) -> None:
        q: queue.Queue = queue.Queue(QUEUE_MAX)
        self._queue = q
        self._thread = threading.Thread(
            target=_hash_from, args=(q, self._hash, self._failed), name="rssd-magic-verify", daemon=True
        )
        self._thread.start()
        # A reader that stops early (an error) never calls check(): the
        # thread ends when this Verifier is collected.
        self._finalizer = weakref.finalize(self, q.put, None)

    def check(self) -> None:
        """Raise IntegrityError unless what was read has the digest."""
        if self._queue is not None:
            self._finalizer.detach()
            self._queue.put(None)
            self._thread.join()
            self._queue = None
            if self._failed:
                raise IntegrityError(f"blob {self.digest[:24]}… could not be checked ({self._failed[0]})")
        if not hmac.compare_digest(self._prefix + self._hash.hexdigest(), self.digest):
            raise IntegrityError(
                f"blob {self.digest[:24]}… does not match its digest (changed after it was written)"
            )


def _hash_from(q: queue.Queue, hasher: Any, failed: list) -> None:
    """The hashing thread: every piece queued, in order, until None."""
    while True:
        piece = q.get()
        if piece is None:
            return
        if not failed:
            try:
                hasher.update(piece)  # releases the GIL: the reader goes on meanwhile
            except BaseException as exc:  # noqa: BLE001 - reported by check()
                failed.append(exc)


def verify(digest: str, data: Any) -> None:
    """Raise IntegrityError unless *data* has *digest*."""
    if algorithm(digest) == "blake3" and memoryview(data).nbytes >= THREADED_HASH:
        if not hmac.compare_digest(_blake3(data), digest):
            raise IntegrityError(f"blob {digest[:24]}… does not match its digest (changed after it was written)")
        return
    verifier = Verifier(digest)
    verifier.update(data)
    verifier.check()
