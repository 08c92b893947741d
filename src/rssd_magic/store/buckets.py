"""Large values in a bucket: which of a run's blobs go to object storage,
and reading a record's blobs wherever they are.

A team sets ``StatefulMagics.blob_store`` (or ``$RSSD_MAGIC_BLOBS``) to
``s3://bucket/prefix``: every blob of at least ``blob_min_bytes`` is written
there under its content digest (backends/objects.py) *before* the record
that names it is written, and the record says which bucket (its
``blob_store`` field, covered by its signature).  The state store keeps the
records and the small values.  So a teammate with read access replays it
without setting anything: the record tells where its bytes are.

Reads look in the state store first, then in the bucket the record names:
an RSSD exported with its bytes copied in (transfer.py) replays with no
bucket at all, and one indexed lookup is nothing beside a large read.  A
digest names its bytes forever and every read is checked against it, so
which copy answers never matters.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Iterable

from ..records.serialize import NotRestored
from .base import Blob, StoreError

#: The bucket for large values when ``StatefulMagics.blob_store`` is unset.
ENV_BLOBS = "RSSD_MAGIC_BLOBS"
#: Blobs at least this large go to the bucket (``StatefulMagics.blob_min_bytes``).
DEFAULT_MIN_BYTES = 1 << 20

_open: dict[str, Any] = {}
_lock = threading.Lock()


def configured(setting: str | None) -> str | None:
    """The bucket URL large values go to (the setting, else the
    environment), checked: StoreError names what is wrong with it."""
    url = setting if setting not in (None, "") else os.environ.get(ENV_BLOBS) or None
    if url is None:
        return None
    from ..backends.objects import ObjectLocation

    return ObjectLocation.parse(url).url


def bucket(url: str) -> Any:
    """The :class:`~rssd_magic.backends.objects.S3Blobs` of *url*, one per
    process (its client and threads are reused by every record naming it)."""
    with _lock:
        found = _open.get(url)
        if found is None:
            from ..backends.objects import S3Blobs  # boto3 loads only for a team that uses a bucket

            found = _open[url] = S3Blobs(url)
        return found


def put(url: str, blobs: list[Blob]) -> None:
    """Make *blobs* durable in the bucket *url* (StoreError: one line naming
    it), and keep a copy in this machine's cache: this kernel's and the next
    one's replays of the record read them from disk, not from the bucket."""
    store = bucket(url)
    store.put_many(blobs)
    if store.cache is not None:
        for digest, data in blobs:
            store.cache.write(digest, data)  # best effort: the bucket has them


def nbytes(data: Any) -> int:
    try:
        return memoryview(data).nbytes
    except TypeError:
        return len(data)


def split(blobs: Iterable[Blob], min_bytes: int) -> tuple[list[Blob], list[Blob]]:
    """``(far, near)``: the blobs for the bucket, and those for the store."""
    far, near = [], []
    for blob in blobs:
        (far if nbytes(blob[1]) >= min_bytes else near).append(blob)
    return far, near


def reader(store: Any, where: str | None, digests: Iterable[str] = ()) -> Callable[[str], Any]:
    """A ``get(digest)`` for one record's blobs: from the state store, else
    from the bucket *where* the record names.  A blob in neither is
    ``NotRestored`` saying where it was looked for (one line).  The small
    ones among *digests* (the blobs the replay will ask for) are read from
    the store together, up front (Blobs.get_small)."""
    try:
        ready = store.blobs.get_small(digests)
    except StoreError:  # read one by one, as before, each saying what went wrong
        ready = {}

    def get(digest: str) -> Any:
        found = ready.pop(digest, None)
        if found is not None:
            return found
        try:
            return store.blobs.get(digest)
        except KeyError:
            if where is None:
                raise
        try:
            return bucket(where).get(digest)
        except KeyError:
            raise NotRestored(f"(its bytes, blob {digest[:24]}…, are gone from {where})") from None
        except StoreError as exc:
            raise NotRestored(f"({exc})") from None

    return get
