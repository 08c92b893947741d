"""Monotonic ULIDs for primary keys.

surveilr's ids are ULIDs made by the writer, so RSSDs from different machines
merge without collisions.  Nothing is decided by their order: a ULID carries
its writer's clock, so the latest transition of a cell is the one the store
wrote last (SQLite's rowid, PostgreSQL's ``rssd_magic_state_seq``), never
the greatest id.  Within one process each new id is still forced above the
previous one (the ULID spec's monotonic mode), so ids read in the order a
kernel wrote them.

Made here rather than by a ULID library: a first run writes four, and the
library's object model cost 7.7 µs each; this is one integer, one
``os.urandom`` and thirteen lookups of two characters (3.6 µs).
"""

from __future__ import annotations

import os
import threading
import time

_lock = threading.Lock()
_last = 0
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford's base32
#: Every 10-bit value as its two characters.
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]
#: A ULID is its 128 bits as a 130-bit number in 26 five-bit digits: 13 pairs.
_SHIFTS = tuple(range(120, -1, -10))


def new_ulid() -> str:
    """A new ULID string (48-bit Unix milliseconds, 80 random bits, 26
    Crockford base32 characters), strictly greater than any this process
    made before."""
    global _last
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    with _lock:
        if value <= _last:
            value = _last + 1
        _last = value
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in _SHIFTS])
