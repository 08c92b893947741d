"""Monotonic ULIDs for primary keys.

surveilr's ids are ULIDs made by the writer, so RSSDs from different machines
merge without collisions.  Nothing is decided by their order: a ULID carries
its writer's clock, so the latest transition of a cell is the one the store
wrote last (SQLite's rowid, PostgreSQL's ``rssd_magic_state_seq``), never
the greatest id.  Within one process each new id is still forced above the
previous one (the ULID spec's monotonic mode), so ids read in the order a
kernel wrote them.
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
