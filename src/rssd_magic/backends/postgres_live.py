"""The connections a PostgreSQL store keeps apart from its main one, for
the time a cell runs or is waited for: the holder's heartbeat and the
waiter's LISTEN.

Each has a connection of its own (a beat must not land inside, or be rolled
back with, the main thread's transaction; a LISTEN must not be held by a
connection that also writes), reopened when it was lost: a beat that finds
its link broken (a restart, a killed connection) reconnects at once, and
raises StoreError only while the server can't be reached (the next beat
tries again); a listener that can't listen sleeps instead, and tries to
reconnect at most once a second (the caller polls meanwhile).

Behind a pooler no listener is made at all (postgres.py decides): a LISTEN
would stay on a server connection the pooler hands to others, and the
notification would never reach us.
"""

from __future__ import annotations

import hashlib
import time

import psycopg
from psycopg import sql

from ..store import rows
from ..store.base import StoreError
from ..store.dialect import Dialect, Tx
from .postgres_conn import Sql, cause, close_quietly, connect, lost, transient

#: Seconds between two attempts of a listener to reconnect.
RELISTEN_S = 1.0


def channel(schema: str, ingest_src: str) -> str:
    """The NOTIFY channel of one cell (an identifier of at most 63 bytes)."""
    return "rssd_magic_" + hashlib.sha256(f"{schema}\0{ingest_src}".encode()).hexdigest()[:40]


class Listener:
    """LISTENs on one cell's channel at a time, on a connection of its own."""

    def __init__(self, url: str):
        self.url = url
        self.conn: psycopg.Connection | None = None
        self.channel: str | None = None
        self._failed_at = float("-inf")

    def wait(self, wanted: str, timeout: float) -> None:
        """Return at the first notification on *wanted*, or after *timeout*.
        The first call for a channel only starts listening and returns at
        once: the caller reads again, so a commit just before LISTEN is not
        missed.  Without a connection it sleeps (the caller polls)."""
        try:
            if lost(self.conn):
                if time.monotonic() - self._failed_at < RELISTEN_S:
                    time.sleep(timeout)  # the server was away a moment ago: the caller polls
                    return
                self.conn, self.channel = connect(self.url, purpose="listener"), None
            if self.channel != wanted:
                if self.channel is not None:
                    # Only the awaited cell: notifications of others would pile up unread.
                    self.conn.execute("UNLISTEN *")
                self.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(wanted)))
                self.channel = wanted
                return
            for _ in self.conn.notifies(timeout=timeout, stop_after=1):
                break
        except (psycopg.Error, StoreError):
            self.close()
            self._failed_at = time.monotonic()
            time.sleep(timeout)
        except BaseException:
            self.close()  # interrupted inside the driver: the link's state is unknown
            raise

    def close(self) -> None:
        close_quietly(self.conn)
        self.conn, self.channel = None, None


class PgRenewer:
    """Heartbeats: each beat one transaction that bumps ``beat`` and stamps
    ``heartbeat_at`` with the server's clock (rows.beat), for every claim
    still held with its token."""

    def __init__(self, url: str, location: str, q: Sql, dialect: Dialect):
        self.url, self.location, self.q, self.dialect = url, location, q, dialect
        self.conn: psycopg.Connection | None = None

    def renew(self, held: dict[str, int]) -> set[str]:
        """Beat.  A link found broken (a restart, a killed connection) is
        reopened at once for this beat; StoreError when the server can't be
        reached (the next beat tries again)."""
        for again in (True, False):
            try:
                if lost(self.conn):
                    self.conn = connect(self.url, purpose="heartbeat")
                with self.q.tx(self.conn):
                    return rows.beat(Tx(self.conn, self.dialect), held)
            except psycopg.Error as exc:
                if not (again and transient(exc, self.conn)):
                    raise StoreError(f"PostgreSQL {self.location}: {cause(exc)}") from None
                self.close()
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        close_quietly(self.conn)
        self.conn = None
