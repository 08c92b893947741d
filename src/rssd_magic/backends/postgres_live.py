"""The connections a PostgreSQL store keeps apart from its main one, for
the time a cell runs or is waited for: the holder's heartbeat and the
waiter's LISTEN.

Each has a connection of its own (a beat must not land inside, or be rolled
back with, the main thread's transaction; a LISTEN must not be held by a
connection that also writes), reopened when it was lost.
"""

from __future__ import annotations

import hashlib
import time

import psycopg
from psycopg import sql

from .base import StoreError
from .postgres_conn import connect, lost


def channel(schema: str, ingest_src: str) -> str:
    """The NOTIFY channel of one cell (an identifier of at most 63 bytes)."""
    return "rssd_magic_" + hashlib.sha256(f"{schema}\0{ingest_src}".encode()).hexdigest()[:40]


class Listener:
    """LISTENs on one cell's channel at a time, on a connection of its own."""

    def __init__(self, url: str):
        self.url = url
        self.conn: psycopg.Connection | None = None
        self.channel: str | None = None

    def wait(self, wanted: str, timeout: float) -> None:
        """Return at the first notification on *wanted*, or after *timeout*.
        The first call for a channel only starts listening and returns at
        once: the caller reads again, so a commit just before LISTEN is not
        missed.  Without a connection it sleeps (the caller polls)."""
        try:
            if lost(self.conn):
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
            time.sleep(timeout)
        except BaseException:
            self.close()  # interrupted inside the driver: the link's state is unknown
            raise

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001 - a broken link
                pass
        self.conn, self.channel = None, None


class PgRenewer:
    """Heartbeats: each beat one transaction that bumps ``beat`` and stamps
    ``heartbeat_at`` with the server's clock, for every claim still held
    with its token."""

    def __init__(self, url: str, schema: str, busy_timeout_s: float):
        self.url, self.schema, self.busy_timeout_s = url, schema, busy_timeout_s
        self.conn: psycopg.Connection | None = None

    def renew(self, held: dict[str, int]) -> set[str]:
        if lost(self.conn):
            self.conn = connect(self.url, lock_timeout_s=self.busy_timeout_s, purpose="heartbeat")
            self.conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(self.schema)))
        gone = set()
        with self.conn.transaction():
            for state_id, token in held.items():
                cur = self.conn.execute(
                    """UPDATE rssd_magic_claim SET beat = beat + 1, heartbeat_at = clock_timestamp()
                       WHERE state_id = %s AND token = %s""",
                    (state_id, token),
                )
                if cur.rowcount == 0:
                    gone.add(state_id)
        return gone

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
