"""Monotonic ULIDs for primary keys.

surveilr's ids are ULIDs made by the writer, so RSSDs from different machines
merge without collisions.  We also rely on their order: the latest transition
of a cell is the one with the greatest id.  A plain ULID is only ordered to the
millisecond, so within one process each new id is forced above the previous
one (the ULID spec's monotonic mode).
"""

from __future__ import annotations

import threading

from ulid import ULID

_lock = threading.Lock()
_last = 0


def new_ulid() -> str:
    """A new ULID string, strictly greater than any this process made before."""
    global _last
    ulid = ULID()
    value = int(ulid)
    with _lock:
        if value <= _last:
            value, ulid = _last + 1, None
        _last = value
    return str(ulid if ulid is not None else ULID.from_int(value))
