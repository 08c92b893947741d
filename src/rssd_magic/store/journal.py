"""A store, as the engine and the reports see it: the journal of every
cell's transitions, with claims decided and runs ended as
compare-and-append, forgetting only while a run is the latest, signatures
and sessions — its shared half written once here, over what each store
implements (the abstract methods below: its transactions, its hot path,
its claim row, how it appends and orders a transition, its heartbeat and
its wake-ups, with its ``blobs`` and its ``dialect``).

What only a store can do stays in its modules: SQLite waits for another
process's write lock, checks the file under it, and keeps the session's
rows and replay counts until a write is possible (sqlite*.py); PostgreSQL
takes a row lock per cell, rides out a restart and a pooler, and tells
waiters with NOTIFY (postgres*.py).  The promises every store keeps are
base.py's; ``tests/test_backend_contract.py`` holds each store to them.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any, Callable, Iterable, Iterator

from ..records.ids import new_ulid
from ..engine.keys import CellKey, src_range
from ..engine.lifecycle import ABANDONED, INITIAL, RUNNING
from . import rows, tally
from .base import (
    Blob,
    BlobStore,
    Claim,
    ClaimOutcome,
    ClaimRequest,
    ExecRow,
    Fenced,
    Holder,
    Renewer,
    StoreError,
    Transition,
    judge_claim,
)  # fmt: skip
from .dialect import Dialect, Tx
from .pending import HIT_FLUSH_S, Pending


#: Seconds a store waits for another process's lock, or a server that is away.
BUSY_TIMEOUT_S = 30.0


class Journal:
    """An opened state store: one instance per kernel and location.

    ``open(location, *, session_args=None, create=True, readonly=False,
    busy_timeout_s=30.0, allow_network_fs=False, notify=None)`` is a
    classmethod of each store (options it has no use for are accepted and
    ignored).  Opening a prepared store writes nothing.  *notify(line,
    tag=None)* is told what the user should know, once each: a store that
    is read-only here, a file replaced under a running kernel, a wait for
    another process's lock; and, tagged ``created``, a store that opening
    created (a run from the wrong folder shows).
    """

    #: ``file`` or the URL scheme the store serves (``postgresql``).
    scheme = "?"
    #: What messages call it, before its location (``RSSD``, ``PostgreSQL``).
    kind = "?"
    #: What messages name: the file path, or the URL without its password.
    location = ""
    #: This host's name (for records and messages only).
    host = ""
    #: This process's ``orchestration_session`` id, once started.
    session_id: str | None = None
    #: None while this process may write the store; else why not, in a few
    #: words (a read-only file or mount, a schema made by a newer version).
    #: A read-only store replays; every write raises StoreError at once.
    read_only: str | None = None
    blobs: BlobStore
    #: Rows waiting for a write (pending.py): replay counts at least.
    pending: Pending
    #: The store's SQL (dialect.py).
    dialect: Dialect

    def __init__(self) -> None:
        self._srcs: dict[str, str] = {}  # entry id -> ingest_src (entries never change)
        self.host = socket.gethostname()
        self._hits_due_at = 0.0

    # -- what each store implements for the engine ---------------------------------

    def latest(self, key: CellKey) -> Transition | None:
        """The cell's latest transition by store order (None: never ran).
        One indexed read: this is all a replay costs the store."""
        raise NotImplementedError

    def note_hit(self, state_id: str) -> None:
        """Count a replay; buffered (a replay writes nothing) and handed to
        the store to write (:meth:`_hits_due`) at most every HIT_FLUSH_S.
        A read-only store counts nothing."""
        if self.read_only is not None:
            return
        self.pending.hit(state_id)
        now = time.monotonic()
        if now - self._hits_due_at > HIT_FLUSH_S:
            self._hits_due_at = now
            self._hits_due()

    def flush_hits(self, patience_s: float | None = None) -> None:
        """Write buffered hit counts, and whatever else waits for a write
        (the session's rows), now, waiting up to *patience_s* (default: the
        busy timeout) for another process's lock."""
        raise NotImplementedError

    def start_session(self, args: dict) -> str:
        """Start this process's ``orchestration_session`` (once) and return
        its id; *args* go to ``args_json``, the process's Holder to
        ``elaboration``, with surveilr's first session-level state
        (``INITIAL → surveilr_orchestration_init``, rows.py).  Its rows may
        be written later, when a write is possible, but before any row that
        names the session."""
        raise NotImplementedError

    def close(self, *, failed: bool = False) -> None:
        """Write pending hits and finish the session (``surveilr_orch_completed``,
        or ``surveilr_orch_failed`` when a cell run in it *failed*, and
        ``orch_finished_at``).  Closes connections.  Never raises."""
        raise NotImplementedError

    def renewer(self) -> Renewer:
        """A new heartbeat connection (used from another thread)."""
        raise NotImplementedError

    def writer(self) -> "Journal":
        """A second instance of this store for this process's session, with
        a connection of its own, for a thread that writes a run's record
        while this one goes on (engine/recorder.py).  Closing it ends no
        session."""
        raise NotImplementedError

    def wait_for_change(self, timeout: float) -> None:
        """Sleep until another process may have ended a run (a store that can
        be told, PostgreSQL's LISTEN/NOTIFY, wakes at once), or *timeout*.
        A store that can't be told only sleeps: the caller polls."""
        time.sleep(timeout)

    def sql_connection(self) -> Any:
        """A DB-API connection of its own for the user's SQL cells, so nothing
        a cell does (PRAGMAs, transactions) touches the state's connection."""
        raise NotImplementedError

    # -- its transactions: also what the code above the stores reads and
    # writes through (rows.py, tables.py, transfer.py) ------------------------

    def read(self, fn: Callable[[Tx], Any]) -> Any:
        """``fn(tx)`` in one consistent read (driver errors: StoreError)."""
        raise NotImplementedError

    def write(self, fn: Callable[[Tx, bool], Any]) -> Any:
        """``fn(tx, retrying)`` in one short write transaction, waiting for
        another process's lock up to the busy timeout; *retrying* is True
        when an earlier try may have committed."""
        raise NotImplementedError

    def query(self, template: str, params: Any = ()) -> list[tuple]:
        """The rows of one statement, in one round trip."""
        raise NotImplementedError

    def each(self, template: str, params: Any = ()) -> Iterator[tuple]:
        """The rows of one statement, one at a time (never all in memory)."""
        raise NotImplementedError

    def footprint(self) -> tuple[int, int, dict]:
        """What the store takes on disk: ``(bytes, WAL bytes, extra fields)``."""
        raise NotImplementedError

    def _writable(self) -> None:
        """StoreError at once when this store must not be written."""
        if self.read_only is not None:
            raise StoreError(f"{self.kind} {self.location}: {self.read_only}; nothing can be recorded in it")

    def _session(self) -> str:
        """This process's session, started now if it was not."""
        return self.session_id or self.start_session({"process": {"pid": os.getpid(), "argv": sys.argv}})

    def _hits_due(self) -> None:
        """Replay counts have waited long enough: have them written, never
        waiting for a lock or a server to do so."""

    def _append(self, t: Tx, entry_id: str | None, from_state: str, to_state: str, result_json: str | None,
                reason: str, elaboration: dict | None, state_id: str | None = None) -> Transition:  # fmt: skip
        """Append one transition in *t* (the store's :meth:`_insert`), counted
        by the tally (tally.py) — or the tally recounted, when rows it did
        not count came first."""
        done = self._insert(t, entry_id, from_state, to_state, result_json, reason, elaboration, state_id)
        if not tally.appended(t, done.entry_id, done.from_state, done.to_state, done.result_json, done.seq):
            tally.rebuild(t)
        return done

    def _insert(self, t: Tx, entry_id: str | None, from_state: str, to_state: str, result_json: str | None,
                reason: str, elaboration: dict | None, state_id: str | None = None) -> Transition:  # fmt: skip
        """Insert one transition (with its store order) in *t*."""
        raise NotImplementedError

    def _lock(self, t: Tx, ingest_src: str, create: bool = True) -> None:
        """Hold the cell against other claimers until *t* ends (a store whose
        write transactions exclude each other needs nothing)."""

    def _take(self, t: Tx, ingest_src: str, entry_id: str, state_id: str, holder: Holder,
              lease_s: float) -> tuple[int, str, float | None]:  # fmt: skip
        """Make the cell's claim ours with the next fencing token:
        ``(token, claimed_at, silent_s)``."""
        raise NotImplementedError

    def _release(self, t: Tx, ingest_src: str, entry_id: str, token: int, done: Transition) -> None:
        """Let go of the claim *token* holds (and tell waiters, where the store can)."""
        raise NotImplementedError

    def _last_claim(self, t: Tx, ingest_src: str, entry_id: str) -> tuple | None:
        """The cell's claim row (:data:`rows.CLAIM`), held or released."""
        raise NotImplementedError

    def _before_claim(self, t: Tx) -> None:
        """What a claim's transaction writes first (waiting rows)."""

    def _stage(self, running: Transition, token: int, blobs: list[Blob]) -> Any:
        """Blobs written ahead of the record, in transactions of their own."""
        return None

    def _put_blobs(self, t: Tx, blobs: list[Blob], staged: Any) -> None:
        """Every blob of a record, in the record's transaction: each proven
        right (or rewritten) before the record names it — the staged ones
        again too, since a gc may have freed one since."""
        self.blobs.put_many(blobs, t.conn, staged or set())

    def _finished(self, staged: Any) -> None:
        """After a run's end committed."""

    def _claimed(self, outcome: ClaimOutcome, key: CellKey) -> None:
        """After a claim committed (a store that can be told of changes
        listens for the held cell)."""

    # -- written once: reading ---------------------------------------------------------

    def latest_variant(self, key: CellKey) -> Transition | None:
        """The latest EXECUTED run of the same code on other inputs (to say
        why this one runs), or None."""
        lo, hi = src_range(key.base_src)
        found = self.query(rows.VARIANT, (lo, hi, key.ingest_src))
        return Transition(*found[0]) if found else None

    def claim_of(self, running: Transition) -> Claim | None:
        """The claim on a RUNNING transition (None when nobody holds it)."""
        found = self.query(rows.CLAIM_OF, (running.entry_id, running.state_id))
        return rows.claim_from(found[0]) if found else None

    def signatures(self, payload_ids: Iterable[str]) -> dict[str, dict[str, str]]:
        """Every key's signature row of *payload_ids*, in one query:
        ``{payload_id: {key_id: signature}}`` (payloads without a row absent;
        rows whose key id or signature is not text left out)."""
        ids = list(dict.fromkeys(payload_ids))
        if not ids:
            return {}
        if len(ids) == 1:  # a replay's one record
            return rows.signatures_of(self.query(rows.SIGNATURES + "payload_id = ?", (ids[0],)))
        return rows.signatures_of(self.query(rows.SIGNATURES + self.dialect.in_list("payload_id"), (self.dialect.listed(ids),)))

    def open_sessions(self, boot: str | None = None) -> list[tuple[str, dict]]:
        """``(session_id, holder)`` of our sessions not finished yet (*holder*
        as its process recorded it; of one *boot* of one machine, chosen by
        the store, when given): the engine judges which a killed kernel left
        open (claims.close_orphaned_sessions)."""
        if self.read_only is not None:
            return []  # what this process may not end, it need not judge
        return self.read(lambda t: rows.open_sessions(t, boot))

    # -- written once: writing ---------------------------------------------------------

    def add_signatures(self, signed: Iterable[tuple[str, str, str]]) -> None:
        """Record ``(payload_id, key_id, signature)`` rows (idempotent)."""
        signed = list(signed)
        self._writable()
        if signed:
            self.write(lambda t, _retrying: rows.add_signatures(t, signed))

    def end_session(self, session_id: str, *, failed: bool, reason: str) -> bool:
        """Finish another process's session (a killed kernel's) as :meth:`close`
        would, with *reason*; False if it was finished meanwhile."""
        self._writable()
        return self.write(lambda t, _retrying: rows.end_session(t, session_id, failed, reason))

    def _src(self, t: Tx, entry_id: str) -> str | None:
        src = self._srcs.get(entry_id)
        if src is None:
            row = t.one(
                "SELECT ingest_src FROM {orchestration_session_entry} WHERE orchestration_session_entry_id = ?",
                (entry_id,),
            )
            if row is None:
                return None
            src = self._srcs[entry_id] = row[0]
        return src

    def claim(self, request: ClaimRequest) -> ClaimOutcome:
        """Decide and record, in one transaction, who runs the cell now
        (:func:`base.judge_claim`): replay (``done``), wait for a live holder
        (``held``), or append RUNNING with a claim and a larger fencing token
        (``run``), recording ``RUNNING → ABANDONED`` first when taking over."""
        self._writable()
        self._session()
        key, holder = request.key, request.holder

        def tx(t: Tx, _retrying: bool) -> ClaimOutcome:
            self._before_claim(t)
            self._lock(t, key.ingest_src)
            previous = rows.latest_in(t, key.ingest_src)
            verdict = judge_claim(
                request, previous, lambda: rows.claim_from(t.one(rows.CLAIM_OF, (previous.entry_id, previous.state_id)))
            )
            if verdict.kind != "run":
                return ClaimOutcome(verdict.kind, previous, claim=verdict.held)
            abandoned = None
            if verdict.abandon is not None:
                abandoned = previous = self._append(t, previous.entry_id, RUNNING, ABANDONED, None, verdict.abandon, None)
            entry_id = previous.entry_id if previous else rows.entry(t, self.session_id, key, request.source)
            self._srcs[entry_id] = key.ingest_src
            from_state = previous.to_state if previous else INITIAL
            running = self._append(t, entry_id, from_state, RUNNING, None, verdict.reason, request.elaboration)
            token, at, silent = self._take(t, key.ingest_src, entry_id, running.state_id, holder, request.lease_s)
            mine = Claim(entry_id, running.state_id, token, holder, 0, request.lease_s, at, silent)
            return ClaimOutcome("run", previous, running=running, claim=mine, abandoned=abandoned)

        outcome = self.write(tx)
        self._claimed(outcome, key)
        return outcome

    def _fence(self, t: Tx, running: Transition, token: int) -> str | None:
        """Raise Fenced unless *running* is still its cell's latest transition
        and *token* still holds its claim; the cell's ingest_src."""
        src = self._src(t, running.entry_id)
        if src is not None:
            self._lock(t, src, create=False)
        latest = rows.latest_in(t, src) if src is not None else None
        held = rows.claim_from(t.one(rows.CLAIM_OF, (running.entry_id, running.state_id)))
        if latest is None or latest.state_id != running.state_id or held is None or held.token != token:
            raise Fenced(self._who_took_over(t, src, running, token, latest))
        return src

    def _who_took_over(self, t: Tx, src: str | None, running: Transition, token: int, latest: Transition | None) -> str:
        """Who holds, or last held, the cell since *running* lost it: the
        claim row keeps its last holder after release."""
        row = self._last_claim(t, src, running.entry_id) if src is not None else None
        if row is not None and int(row[2]) != token:
            _, _, _, session_id, host, machine, boot, pidns, pid, started = row[:10]
            return Holder(host, machine, boot, pidns, int(pid), int(started), session_id).describe()
        state = latest.to_state if latest is not None else "nothing"
        return f"another kernel (the cell's latest state is {state})"

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
        """End a run: append ``RUNNING → to_state`` with its record, blobs,
        signatures and *exec_row*, and release the claim, in one transaction
        — only while *running* is still the cell's latest transition and
        *token* still holds it (:class:`Fenced` otherwise, nothing written).
        Every blob exists when the record commits (large ones may be written
        beforehand, in transactions of their own: ``_stage``)."""
        self._writable()
        blobs, signatures = list(blobs), list(signatures)
        staged = self._stage(running, token, blobs)
        done_id = new_ulid()

        def tx(t: Tx, retrying: bool) -> Transition:
            if retrying:  # the COMMIT of a try whose link broke may have landed
                row = t.one("SELECT " + rows.STATE + " FROM {states} WHERE s.orchestration_session_state_id = ?", (done_id,))
                if row is not None:
                    return Transition(*row)
            src = self._fence(t, running, token)
            rows.add_signatures(t, signatures)
            self._put_blobs(t, blobs, staged)
            done = self._append(t, running.entry_id, RUNNING, to_state, result_json, reason, None, done_id)
            self._release(t, src, running.entry_id, token, done)
            if exec_row is not None:
                rows.exec_row(t, self.session_id, running.entry_id, exec_row)
            return done

        done = self.write(tx)
        self._finished(staged)
        return done

    def append_if_latest(
        self, entry_id: str, from_state: str, to_state: str, result_json: str | None, reason: str, if_latest: str
    ) -> Transition | None:
        """Append one transition only if *if_latest* is still the latest
        transition of the entry's cell (None otherwise): ``forget`` can't
        land after a newer run."""
        self._writable()
        self._session()

        def tx(t: Tx, _retrying: bool) -> Transition | None:
            src = self._src(t, entry_id)
            if src is None:
                return None
            self._lock(t, src)
            latest = rows.latest_in(t, src)
            if latest is None or latest.state_id != if_latest:
                return None
            return self._append(t, entry_id, from_state, to_state, result_json, reason, None)

        return self.write(tx)


#: The name the engine types an opened store by.
StateBackend = Journal
