"""Sessions of an RSSD (the SQLite backend's, as a mixin): one
``orchestration_session`` per kernel, with surveilr's session-level states,
so surveilr's own pages count our kernels; and the heartbeat connection.

``INITIAL → surveilr_orchestration_init`` when a kernel opens the file, then
``surveilr_orch_completed`` or ``surveilr_orch_failed`` (a cell of it
failed) and ``orch_finished_at`` when it closes.  The kernel's Holder goes
into the session's ``elaboration``, so the next kernel can tell a session a
killed kernel left open (runner.close_orphaned_sessions) and end it.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from dataclasses import asdict
from pathlib import Path

from .. import __version__
from ..canonical import dumps, loads_object, utc_now
from ..claims import current_holder
from ..ids import new_ulid
from ..lifecycle import INITIAL
from .base import NATURE_ID, NATURE_LABEL, SESSION_COMPLETED, SESSION_FAILED, SESSION_INIT



class SqliteSessions:
    """Session methods of :class:`~rssd_magic.backends.sqlite.SqliteBackend`
    (they use its ``conn``, ``host``, ``session_id``, ``_write`` and
    ``_append``)."""

    def start_session(self, args: dict) -> str:
        if self.session_id is not None:
            return self.session_id
        session_id = new_ulid()
        holder = asdict(current_holder(session_id))
        with self._write() as c:
            # surveilr's device upsert, without rewriting a row it wrote.
            c.execute(
                """INSERT INTO device (device_id, name, state, boundary)
                   VALUES (?, ?, '"SINGLETON"', 'UNKNOWN')
                   ON CONFLICT (name, state, boundary) DO NOTHING""",
                (new_ulid(), self.host),
            )
            (device_id,) = c.execute(
                """SELECT device_id FROM device
                   WHERE name = ? AND state = '"SINGLETON"' AND boundary = 'UNKNOWN'""",
                (self.host,),
            ).fetchone()
            c.execute(
                """INSERT INTO orchestration_nature (orchestration_nature_id, nature)
                   VALUES (?, ?) ON CONFLICT DO NOTHING""",
                (NATURE_ID, NATURE_LABEL),
            )
            c.execute(
                """INSERT INTO orchestration_session
                   (orchestration_session_id, device_id, orchestration_nature_id, version, args_json, elaboration)
                   VALUES (?, ?, ?, ?, ?, ?)""",
                (session_id, device_id, NATURE_ID, __version__, dumps(args), dumps({"holder": holder})),
            )
            self.session_id = session_id  # _append writes it
            try:
                self._append(c, None, INITIAL, SESSION_INIT, None, "kernel started", None)
            except BaseException:
                self.session_id = None
                raise
        return session_id

    def _session(self) -> str:
        return self.session_id or self.start_session({"process": {"pid": os.getpid(), "argv": sys.argv}})

    def open_sessions(self) -> list[tuple[str, dict]]:
        rows = self.conn.execute(
            """SELECT orchestration_session_id, elaboration FROM orchestration_session
               WHERE orchestration_nature_id = ? AND orch_finished_at IS NULL""",
            (NATURE_ID,),
        ).fetchall()
        out = []
        for sid, elaboration in rows:
            holder = loads_object(elaboration).get("holder")
            if isinstance(holder, dict):
                out.append((sid, holder))
        return out

    def end_session(self, session_id: str, *, failed: bool, reason: str) -> bool:
        with self._write() as c:
            return self._end_session(c, session_id, failed, reason)

    def _end_session(self, c: sqlite3.Connection, session_id: str, failed: bool, reason: str) -> bool:
        cur = c.execute(
            """UPDATE orchestration_session SET orch_finished_at = CURRENT_TIMESTAMP
               WHERE orchestration_session_id = ? AND orch_finished_at IS NULL""",
            (session_id,),
        )
        if cur.rowcount == 0:
            return False
        c.execute(
            """INSERT INTO orchestration_session_state
               (orchestration_session_state_id, session_id, session_entry_id, from_state, to_state,
                transition_reason, transitioned_at) VALUES (?, ?, NULL, ?, ?, ?, ?)""",
            (new_ulid(), session_id, SESSION_INIT, SESSION_FAILED if failed else SESSION_COMPLETED, reason, utc_now()),
        )
        return True


class SqliteRenewer:
    """Heartbeats through a connection of their own."""

    def __init__(self, path: Path, busy_timeout_s: float):
        self.conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)

    def renew(self, held: dict[str, int]) -> set[str]:
        lost = set()
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            for state_id, token in held.items():
                cur = self.conn.execute(
                    "UPDATE rssd_magic_claim SET beat = beat + 1 WHERE state_id = ? AND token = ?", (state_id, token)
                )
                if cur.rowcount == 0:
                    lost.add(state_id)
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        return lost

    def close(self) -> None:
        self.conn.close()
