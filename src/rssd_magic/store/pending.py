"""Rows a store keeps until it writes: replay counts, and where a write may
have to wait (an RSSD whose lock a neighbour holds), the session's rows.

A replay writes nothing: its count waits here and goes with the store's
next write transaction, or is written on its own at most every
:data:`HIT_FLUSH_S` (journal.py's ``note_hit``; an RSSD's housekeeper, a
server's short transaction).  A transaction that fails gives back what it
took, so no row is written twice or lost, and none naming the session
lands before it.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from . import rows
from .dialect import Tx

#: Replay counts are written at least this often while a kernel replays.
HIT_FLUSH_S = 5.0


@dataclass
class Pending:
    """Rows waiting for a write: this kernel's session (once) and replay
    counts.  Taken only by a connection that holds the write lock, and
    given back if its transaction fails, so no row is written twice or
    lost, and none naming the session lands before it."""

    session: dict | None = None
    hits: dict[str, int] = field(default_factory=dict)
    #: Transactions that took rows and have not ended yet.
    inflight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def take(self) -> tuple[dict | None, dict[str, int]]:
        with self.lock:
            taken = self.session, self.hits
            self.session, self.hits = None, {}
            self.inflight += 1
            return taken

    def give_back(self, session: dict | None, hits: dict[str, int]) -> None:
        with self.lock:
            if session is not None:
                self.session = session
            for sid, n in hits.items():
                self.hits[sid] = self.hits.get(sid, 0) + n

    def settled(self) -> None:
        """The transaction that took rows has ended (committed or rolled back)."""
        with self.lock:
            self.inflight -= 1

    def waiting(self) -> bool:
        """True while rows wait or are being written."""
        with self.lock:
            return self.session is not None or bool(self.hits) or self.inflight > 0

    def hit(self, state_id: str) -> None:
        with self.lock:
            self.hits[state_id] = self.hits.get(state_id, 0) + 1

    def __bool__(self) -> bool:
        return self.session is not None or bool(self.hits)


@contextmanager
def pending_written(t: Tx, pending: Pending) -> Iterator[None]:
    """Write what *pending* holds in transaction *t* (which holds the write
    lock), for the length of the ``with`` block that commits it: given back
    to *pending* if the block fails."""
    session, hits = pending.take()
    try:
        if session is not None:
            rows.start_session(t, session)
        if hits:
            rows.add_hits(t, hits)
        yield
    except BaseException:
        pending.give_back(session, hits)
        raise
    finally:
        pending.settled()
