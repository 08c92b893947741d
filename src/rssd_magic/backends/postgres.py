"""The state store on a PostgreSQL server, for teams: the same rows as an
RSSD (surveilr's ``orchestration_*`` tables, postgres_schema.py), shared by
every kernel that can reach the server.

Design rules, on top of those every backend keeps (base.py):

* **Short transactions only.**  Connections are in autocommit mode; each
  claim, heartbeat and end of run is one ``BEGIN … COMMIT`` of a few
  statements.  Nothing — no transaction, no session-level advisory lock —
  is held while a cell runs, so PgBouncer and pools work.
* **A claim is a row lock, for a moment.**  ``INSERT … ON CONFLICT DO
  NOTHING`` makes the cell's claim row exist, ``SELECT … FOR UPDATE`` takes
  it; everything after that in the transaction (the latest state, the new
  RUNNING, the new token) is decided with no other claimer of the cell in
  between.  Ends take the same lock, so they are compare-and-append.
* **One clock: the server's.**  Transition times, claim times and
  heartbeats are ``clock_timestamp()``; a waiter reads how long a holder has
  been silent from the server (``Claim.silent_s``), not from another host.
* **Order by the store.**  ``Transition.seq`` is an identity column
  (``rssd_magic_state_seq``), never an id or a time.
* **Woken, not polling.**  An end is NOTIFYed on the cell's channel inside
  its transaction (delivered at COMMIT); a waiter LISTENs on its own
  connection and returns at the first notification.
* **A lost connection is reconnected.**  A write that failed because the
  link broke is retried on a new connection for up to the busy timeout; an
  end whose COMMIT may have landed is recognized by its state id, not
  written twice.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import asdict
from typing import Any, Callable, Iterable, Iterator

import psycopg
from psycopg import sql

from ..canonical import loads_object
from ..claims import current_holder
from ..ids import new_ulid
from ..keys import CellKey
from ..lifecycle import ABANDONED, INITIAL, RUNNING
from . import postgres_reports, postgres_rows as rows, redact
from .base import (
    Blob,
    CellRow,
    Claim,
    ClaimOutcome,
    ClaimRequest,
    ExecRow,
    Fenced,
    HistoryRow,
    Holder,
    StorageStats,
    StoreError,
    Transition,
    executed_results,
    judge_claim,
)
from .postgres_blobs import PgBlobs
from .postgres_conn import cause, connect, lost
from .postgres_live import Listener, PgRenewer, channel
from .postgres_reports import STATE_COLUMNS
from .postgres_schema import ensure_schema

BUSY_TIMEOUT_S = 30.0
HIT_FLUSH_S = 5.0
#: First pause before reconnecting a lost connection (doubled up to 2 s).
RECONNECT_PAUSE_S = 0.1


class PostgresBackend:
    """A schema on a PostgreSQL server.  Use :meth:`open`; one per kernel and URL."""

    scheme = "postgresql"

    def __init__(self, url: str, conn: psycopg.Connection, schema: str, busy_timeout_s: float, readonly: bool):
        self.url = url
        self.location = redact(url)
        self.schema = schema
        self.conn = conn
        self.busy_timeout_s = busy_timeout_s
        self.readonly = readonly
        self.notice: str | None = None
        self.host = socket.gethostname()
        self.session_id: str | None = None
        self.blobs = PgBlobs(self._live, self._tx, schema, self.location)
        self._pending_hits: dict[str, int] = {}
        self._hits_flushed = time.monotonic()
        self._src_of: dict[str, str] = {}  # entry id -> ingest_src (entries never change)
        self._user_sql: psycopg.Connection | None = None
        self._listener = Listener(url)
        self._awaited: str | None = None
        self._closed = False

    # -- opening -----------------------------------------------------------------

    @classmethod
    def open(
        cls,
        location: str,
        *,
        session_args: dict | None = None,
        create: bool = True,
        readonly: bool = False,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
        allow_network_fs: bool = False,
    ) -> "PostgresBackend":
        """Connect to the server at *location* (a libpq URL) and make its
        current schema ready, or raise StoreError naming the target and the
        cause.  Databases are never created (*create* only matters for
        files); *readonly* refuses a schema without surveilr's tables and
        writes nothing."""
        url = str(location)
        conn = connect(url, lock_timeout_s=busy_timeout_s)
        try:
            layout = ensure_schema(conn, readonly=readonly)
            backend = cls(url, conn, layout.schema, busy_timeout_s, readonly)
            if session_args is not None and not readonly:
                backend.start_session(session_args)
            return backend
        except ValueError as exc:
            conn.close()
            raise StoreError(f"PostgreSQL {redact(url)}: {exc}") from None
        except psycopg.Error as exc:
            conn.close()
            raise StoreError(f"PostgreSQL {redact(url)}: {cause(exc)}") from None
        except BaseException:
            conn.close()
            raise

    # -- connections and transactions -----------------------------------------------

    def _live(self) -> psycopg.Connection:
        """The main connection, reconnected if the link was lost."""
        if self._closed:
            raise StoreError(f"PostgreSQL {self.location}: closed")
        if lost(self.conn):
            self.conn = connect(self.url, lock_timeout_s=self.busy_timeout_s)
            self.conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(self.schema)))
        return self.conn

    def _tx(self, fn: Callable[[psycopg.Connection, bool], Any], *, patience_s: float | None = None) -> Any:
        """``fn(conn, retrying)`` in one transaction.  When the connection is
        lost, it is reopened and *fn* run again (``retrying`` True: whatever
        *fn* wrote may have committed) for up to *patience_s* seconds (the
        busy timeout).  Driver errors become StoreError; Fenced and the
        like pass through, rolled back."""
        patience = self.busy_timeout_s if patience_s is None else patience_s
        deadline = time.monotonic() + patience
        pause, retrying = RECONNECT_PAUSE_S, False
        while True:
            try:
                conn = self._live()
                with conn.transaction():
                    return fn(conn, retrying)
            except psycopg.Error as exc:
                if not lost(self.conn) or time.monotonic() + pause > deadline:
                    raise StoreError(f"PostgreSQL {self.location}: {cause(exc)}") from None
            except StoreError:  # could not reconnect yet
                if time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause, retrying = min(pause * 2, 2.0), True

    def _read(self, query: str, params: tuple = ()) -> list[tuple]:
        """Rows of one statement (autocommit); a lost link is reconnected once."""
        for attempt in (0, 1):
            try:
                return self._live().execute(query, params).fetchall()
            except psycopg.Error as exc:
                if attempt or not lost(self.conn):
                    raise StoreError(f"PostgreSQL {self.location}: {cause(exc)}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    # -- sessions ------------------------------------------------------------------

    def start_session(self, args: dict) -> str:
        if self.session_id is not None:
            return self.session_id
        session_id = new_ulid()
        holder = asdict(current_holder(session_id))
        self._tx(lambda c, retrying: rows.open_session(c, session_id, self.host, args, holder, retrying))
        self.session_id = session_id
        return session_id

    def _session(self) -> str:
        return self.session_id or self.start_session({"process": {"pid": os.getpid(), "argv": sys.argv}})

    def open_sessions(self) -> list[tuple[str, dict]]:
        out = []
        for sid, elaboration in self._read(
            """SELECT orchestration_session_id, elaboration FROM orchestration_session
               WHERE orchestration_nature_id = %s AND orch_finished_at IS NULL""",
            (rows.NATURE_ID,),
        ):
            holder = loads_object(elaboration).get("holder")
            if isinstance(holder, dict):
                out.append((sid, holder))
        return out

    def end_session(self, session_id: str, *, failed: bool, reason: str) -> bool:
        return self._tx(lambda c, _r: rows.end_session(c, session_id, failed, reason))

    def close(self, *, failed: bool = False) -> None:
        if self._closed:
            return
        try:
            # At exit a lost link is not reopened: the next kernel closes the session.
            if self.session_id is not None and not self.readonly and not lost(self.conn):

                def tx(c: psycopg.Connection, _retrying: bool) -> None:
                    self._flush_hits(c)
                    why = "a cell failed in this kernel" if failed else "kernel shut down"
                    rows.end_session(c, self.session_id, failed, why)

                self._tx(tx, patience_s=0)  # at exit: no waiting for a server that is gone
        except (StoreError, psycopg.Error):
            pass  # closing must never raise at interpreter exit
        finally:
            self._closed = True
            self._listener.close()
            for conn in (self.conn, self._user_sql):
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:  # noqa: BLE001 - a broken link
                        pass

    # -- waiting for other kernels ------------------------------------------------------

    def wait_for_change(self, timeout: float) -> None:
        """Sleep until the awaited cell's channel is notified, or *timeout*.
        The channel is the one of the cell :meth:`claim` last found held."""
        if self._awaited is None:
            time.sleep(timeout)
        else:
            self._listener.wait(self._awaited, timeout)

    # -- the hot path --------------------------------------------------------------------

    def latest(self, key: CellKey) -> Transition | None:
        found = self._read(rows.LATEST, (key.ingest_src,))
        return Transition(*found[0]) if found else None

    def latest_variant(self, key: CellKey) -> Transition | None:
        lo = key.base_src
        hi = lo[:-1] + chr(ord(lo[-1]) + 1)
        found = self._read(
            f"""SELECT {STATE_COLUMNS}
                FROM rssd_magic_state_seq AS q
                JOIN orchestration_session_state AS s ON s.orchestration_session_state_id = q.state_id
                WHERE q.entry_id IN (
                    SELECT orchestration_session_entry_id FROM orchestration_session_entry
                    WHERE ingest_src COLLATE "C" >= %s AND ingest_src COLLATE "C" < %s
                      AND ingest_src COLLATE "C" <> %s)
                  AND s.to_state = 'EXECUTED'
                ORDER BY q.seq DESC LIMIT 1""",
            (lo, hi, key.ingest_src),
        )
        return Transition(*found[0]) if found else None

    def note_hit(self, state_id: str) -> None:
        # Counted in memory, written with the next transaction, at close, or
        # when HIT_FLUSH_S have passed: a replay pays for no write.
        self._pending_hits[state_id] = self._pending_hits.get(state_id, 0) + 1
        now = time.monotonic()
        if now - self._hits_flushed > HIT_FLUSH_S and not self.readonly:
            self._hits_flushed = now
            try:
                self._tx(lambda c, _r: self._flush_hits(c), patience_s=0)  # a replay never waits for this
            except StoreError:
                pass  # unreachable now: keep counting, try again later

    def flush_hits(self) -> None:
        if self._pending_hits and not self.readonly:
            self._tx(lambda c, _r: self._flush_hits(c))

    def _flush_hits(self, c: psycopg.Connection) -> None:
        if self._pending_hits:
            rows.add_hits(c, self._pending_hits)
            self._pending_hits.clear()

    # -- claims ------------------------------------------------------------------------

    def claim(self, request: ClaimRequest) -> ClaimOutcome:
        self._session()
        key = request.key
        h = request.holder

        def tx(c: psycopg.Connection, _retrying: bool) -> ClaimOutcome:
            self._flush_hits(c)
            row = rows.lock_cell(c, key.ingest_src)
            previous = rows.latest_in(c, key.ingest_src)
            verdict = judge_claim(
                request, previous, lambda: rows.claim_from(row) if row is not None and row[1] == previous.state_id else None
            )
            if verdict.kind != "run":
                return ClaimOutcome(verdict.kind, previous, claim=verdict.held)
            abandoned = None
            if verdict.abandon is not None:
                abandoned = previous = rows.append(
                    c, self.session_id, previous.entry_id, RUNNING, ABANDONED, None, verdict.abandon, None
                )
            entry_id = previous.entry_id if previous else rows.entry(c, self.session_id, key, request.source)
            self._src_of[entry_id] = key.ingest_src
            running = rows.append(
                c, self.session_id, entry_id, previous.to_state if previous else INITIAL, RUNNING, None, verdict.reason,
                request.elaboration,
            )  # fmt: skip
            token, at = rows.take(c, key.ingest_src, entry_id, running.state_id, self.session_id, h, request.lease_s)
            mine = Claim(entry_id, running.state_id, token, h, 0, request.lease_s, at, 0.0)
            return ClaimOutcome("run", previous, running=running, claim=mine, abandoned=abandoned)

        outcome = self._tx(tx)
        if outcome.kind == "held":
            self._awaited = channel(self.schema, key.ingest_src)
        return outcome

    def claim_of(self, running: Transition) -> Claim | None:
        found = self._read(rows.CLAIM + " WHERE state_id = %s AND entry_id = %s", (running.state_id, running.entry_id))
        return rows.claim_from(found[0]) if found else None

    def renewer(self) -> PgRenewer:
        return PgRenewer(self.url, self.schema, self.busy_timeout_s)

    def _src(self, c: psycopg.Connection, entry_id: str) -> str | None:
        src = self._src_of.get(entry_id)
        if src is None:
            row = c.execute(
                "SELECT ingest_src FROM orchestration_session_entry WHERE orchestration_session_entry_id = %s",
                (entry_id,),
            ).fetchone()
            if row is None:
                return None
            src = self._src_of[entry_id] = row[0]
        return src

    def finish(
        self,
        running: Transition,
        token: int,
        to_state: str,
        result_json: str | None,
        reason: str,
        blobs: Iterable[Blob] = (),
        signatures: Iterable[tuple[str, str, str]] = (),
        exec_row: ExecRow | None = None,
    ) -> Transition:
        blobs, signatures = list(blobs), list(signatures)
        done_id = new_ulid()

        def tx(c: psycopg.Connection, retrying: bool) -> Transition:
            if retrying:  # the COMMIT of a try whose link broke may have landed
                row = c.execute(
                    f"""SELECT {STATE_COLUMNS} FROM orchestration_session_state AS s
                        JOIN rssd_magic_state_seq AS q ON q.state_id = s.orchestration_session_state_id
                        WHERE s.orchestration_session_state_id = %s""",
                    (done_id,),
                ).fetchone()
                if row is not None:
                    return Transition(*row)
            src = self._src(c, running.entry_id)
            held = rows.lock_cell(c, src, create=False) if src is not None else None
            latest = rows.latest_in(c, src) if src is not None else None
            mine = held is not None and held[1] == running.state_id and held[0] == running.entry_id
            if latest is None or latest.state_id != running.state_id or not mine or int(held[2]) != token:
                raise Fenced(self._who_took_over(held, latest, token))
            rows.add_signatures(c, signatures)
            for digest, data in blobs:
                self.blobs.put(c, digest, data)
            done = rows.append(c, self.session_id, running.entry_id, RUNNING, to_state, result_json, reason, None, done_id)
            # Released, and the cell's waiters told (delivered at COMMIT).
            c.execute(
                "UPDATE rssd_magic_claim SET state_id = NULL WHERE ingest_src = %s AND token = %s RETURNING pg_notify(%s, %s)",
                (src, token, channel(self.schema, src), done.state_id),
            )
            if exec_row is not None:
                rows.exec_row(c, self.session_id, running.entry_id, exec_row)
            return done

        return self._tx(tx)

    @staticmethod
    def _who_took_over(held: tuple | None, latest: Transition | None, token: int) -> str:
        """Who holds, or last held, the cell since this run lost it: the
        claim row keeps its last holder after release."""
        if held is not None and int(held[2]) != token:
            _, _, _, session_id, host, machine, boot, pidns, pid, started = held[:10]
            return Holder(host, machine, boot, pidns, int(pid), int(started), session_id).describe()
        state = latest.to_state if latest is not None else "nothing"
        return f"another kernel (the cell's latest state is {state})"

    def append_if_latest(
        self, entry_id: str, from_state: str, to_state: str, result_json: str | None, reason: str, if_latest: str
    ) -> Transition | None:
        self._session()

        def tx(c: psycopg.Connection, _retrying: bool) -> Transition | None:
            src = self._src(c, entry_id)
            if src is None:
                return None
            rows.lock_cell(c, src)
            latest = rows.latest_in(c, src)
            if latest is None or latest.state_id != if_latest:
                return None
            return rows.append(c, self.session_id, entry_id, from_state, to_state, result_json, reason, None)

        return self._tx(tx)

    # -- signatures ----------------------------------------------------------------------

    def signatures(self, payload_ids: Iterable[str]) -> dict[str, dict[str, str]]:
        ids = list(dict.fromkeys(payload_ids))
        if not ids:
            return {}
        found = self._read(
            "SELECT payload_id, key_id, signature FROM rssd_magic_signature WHERE payload_id = ANY(%s)", (ids,)
        )
        out: dict[str, dict[str, str]] = {}
        for pid, key_id, sig in found:
            if isinstance(key_id, str) and isinstance(sig, str):
                out.setdefault(pid, {})[key_id] = sig
        return out

    def add_signatures(self, signed: Iterable[tuple[str, str, str]]) -> None:
        signed = list(signed)
        if signed:
            self._tx(lambda c, _r: rows.add_signatures(c, signed))

    # -- the user's SQL on the server itself ---------------------------------------------

    def sql_connection(self) -> psycopg.Connection:
        """A connection of its own (autocommit; run_sql opens and closes the
        cell's transactions), in the same schema as the state."""
        if lost(self._user_sql):
            self._user_sql = connect(self.url, purpose="sql")
        return self._user_sql

    # -- reports ---------------------------------------------------------------------------

    def _report(self, fn: Callable, *args) -> Any:
        try:
            return fn(self._live(), *args)
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL {self.location}: {cause(exc)}") from None

    def cells(self) -> list[CellRow]:
        return self._report(postgres_reports.cells)

    def history(self, cell: CellRow) -> list[HistoryRow]:
        return self._report(postgres_reports.history, cell)

    def result_of(self, state_id: str) -> str | None:
        found = self._read(
            "SELECT transition_result FROM orchestration_session_state WHERE orchestration_session_state_id = %s",
            (state_id,),
        )
        return found[0][0] if found else None

    def current_results(self) -> Iterator[tuple[CellRow, str]]:
        return executed_results(self.cells())

    def storage(self) -> StorageStats:
        return self._report(postgres_reports.storage, self.location, self.schema)

    def gc(self, digests_of: Callable[[str], set[str]], dry_run: bool = False) -> tuple[list[tuple[str, int]], int, int]:
        return self._report(postgres_reports.gc, self.blobs.lock, digests_of, dry_run)

    # -- moving records to and from RSSD files ------------------------------------------------

    def export_rssd(self, path: str, *, scope: str | None = None, digests_of: Callable[[str], set[str]]) -> dict:
        """Write this store's cells (of *scope*, or all) into the RSSD file at
        *path*, with the blobs *digests_of(record)* names: see
        :func:`postgres_transfer.export_rssd`."""
        from .postgres_transfer import export_rssd

        summary = self._report(export_rssd, path, scope, digests_of)
        return {**summary, "from": self.location}

    def import_rssd(self, path: str) -> dict:
        """Bring the cells of the RSSD file at *path* into this store: see
        :func:`postgres_transfer.import_rssd`."""
        from .postgres_transfer import import_rssd

        summary = self._report(import_rssd, path, self.blobs)
        return {**summary, "to": self.location}
