"""gc of the bucket large values go to: mark and sweep, with a grace
period, touching only what this store wrote there.

Only the bucket the user set (``StatefulMagics.blob_store``,
``$RSSD_MAGIC_BLOBS``, ``gc --blob-store``) is swept, never one because a
record names it: whoever can write the store could name anyone's bucket.

*Mark*: the blobs the current EXECUTED records name (tables.referenced).
*Sweep*: every object of the bucket's prefix older than the grace period
that no current record names — a recording in flight writes its objects
before its record, so the grace period (default an hour) keeps them, and
``S3Blobs.delete`` looks at each object again right before deleting it (a
writer that found its blob stored renewed its use mark).

A bucket is not the store's alone: a prefix another store (another RSSD, a
teammate's schema) writes to holds blobs this one never named, and deleting
them would break that store's replays.  So an object older than the grace
period that *no* record of this store ever named — current or not — means
the prefix is shared, and nothing is deleted there: the answer says so
(give each store a prefix of its own).  Objects this store named once and
no longer names are the only ones it deletes.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from ..store import buckets, tables
from ..store.base import StoreError
from ..store.journal import StateBackend

#: How long an object no record names is kept (``gc --grace``).
DEFAULT_GRACE_S = 3600.0


def sweep(store: StateBackend, bucket: str | None, grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False,
          keep: set[str] | None = None, named: set[str] | None = None) -> list[dict]:  # fmt: skip
    """gc of *bucket* — the one large values go to, as the user set it: a
    bucket a record names is never swept for being named (whoever can write
    the store could name anyone's).  One entry per bucket this store's
    records name: ``bucket``, ``deleted``, ``bytes_freed``, ``kept``,
    ``kept_bytes``, ``uploads_aborted``, ``left``: why nothing was deleted
    there (not the bucket set here, a shared prefix, a fault), else None;
    and with *dry_run* ``objects``: ``{digest, size}`` of each object that
    would be deleted.  *keep*: the digests the current records name, when
    the caller has them; *named*, the buckets records ever named (else
    read here)."""
    named = tables.buckets(store) if named is None else named
    if not named:
        return []
    others = sorted(named - {bucket})
    out = [dict(_entry(url), left="not swept: not the bucket large values go to here (set StatefulMagics.blob_store "
                "or $RSSD_MAGIC_BLOBS to it, or pass --blob-store)") for url in others]  # fmt: skip
    if bucket not in named:
        return out
    if keep is None:  # what the current records name (gc found it already: tables.gc's named)
        keep = store.read(lambda t: tables.referenced(t))
    cutoff = datetime.now(timezone.utc) - timedelta(seconds=max(0.0, grace_s))
    url, ever = bucket, tables.bucket_refs(store).get(bucket, set())
    entry = _entry(url)
    try:
        there = buckets.bucket(url).objects()
        old = {d: size for d, (size, when) in there.items() if when < cutoff}
        foreign = [d for d in old if d not in ever]
        doomed = {d: size for d, size in old.items() if d not in keep and d in ever}
        if foreign:
            entry["left"] = (
                f"{len(foreign)} object(s) there, older than the grace period, were never named by this store: "
                "the prefix is shared with another store (or holds other files), so nothing was deleted there "
                "(give each store a prefix of its own)"
            )
            doomed = {}
        entry["deleted"] = len(doomed)
        if doomed and not dry_run:
            # Fewer when a writer renewed a use mark since the listing.
            entry["deleted"] = buckets.bucket(url).delete(doomed, unused_since=cutoff)
        if not dry_run and entry["left"] is None:
            entry["uploads_aborted"] = buckets.bucket(url).abort_uploads(cutoff)
    except StoreError as exc:
        entry["left"], entry["deleted"], doomed, there = str(exc), 0, {}, {}
    entry["bytes_freed"] = sum(doomed.values())  # at most: see deleted
    if dry_run:
        entry["objects"] = [{"digest": d, "size": size} for d, size in sorted(doomed.items())]
    entry["kept"] = len(there) - len(doomed)
    entry["kept_bytes"] = sum(size for size, _ in there.values()) - entry["bytes_freed"]
    out.append(entry)
    return out


def _entry(url: str) -> dict:
    return {"bucket": url, "deleted": 0, "bytes_freed": 0, "kept": 0, "kept_bytes": 0, "uploads_aborted": 0, "left": None}


def check(store: StateBackend, digest: str, where: str | None) -> str | None:
    """None when *digest*'s bytes are intact in the store or, for a record
    naming a bucket, there; else why not (``missing``, or what is wrong).
    A bucket that can't be asked is StoreError: nothing is known of the
    blob, and ``verify --repair`` must not forget its cells for an outage."""
    why = store.blobs.check(digest)
    if why != "missing" or where is None:
        return why
    return buckets.bucket(where).check(digest)
