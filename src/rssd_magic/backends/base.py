"""The storage seam: what the engine and the reports need from a place that
keeps cell state, and the promises every store keeps.

A store is a :class:`StateBackend`: a **journal** — the latest transition
of a cell, claims, compare-and-append ends, forgetting while a run is the
latest, heartbeats, waiting for a change (journal.py writes the shared
half once; a store adds its transactions and a few hooks) — with
:class:`BlobStore` **blobs** (get, put, check, delete, list) and a
**dialect** (dialect.py) in which everything above the stores — the
session rows (rows.py), the reports, gc, export and import (tables.py,
transfer.py) — is written once.  A store registers itself by URL scheme
(``backends/__init__.py``); the engine never sees a driver or a connection.

Promises every store keeps (``tests/test_backend_contract.py`` holds each
to them):

* **Order by the store.**  "Latest" is the store's own insertion order
  (SQLite's rowid, a PostgreSQL sequence), carried as ``Transition.seq``.
  Ids and timestamps carry the writer's clock and never decide anything.
* **Short transactions.**  Nothing is held open while a cell runs: a claim
  is one transaction, each heartbeat one, the end of a run one.
* **Claims are decided atomically** (:meth:`StateBackend.claim`): of any
  number of racing kernels exactly one gets ``run``.  Every claim of an
  entry gets a larger fencing ``token`` than the one before.
* **Ends are compare-and-append** (:meth:`StateBackend.finish`): a run's
  EXECUTED, FAILED or INTERRUPTED lands only while its own RUNNING is still
  the latest transition of its cell and its token still holds the claim;
  otherwise :class:`Fenced` is raised and nothing is written.
* **Every driver error becomes** :class:`StoreError` with a message naming
  the file or URL: callers never catch ``sqlite3.Error`` or ``psycopg.Error``.
* **A replay writes nothing**, and neither does opening a store to replay:
  sessions and hit counts wait until a write is possible; a store the
  process can't write (``read_only``: a read-only file, a schema made by a
  newer version) still replays, and is never written.
* **Blobs are verified on write**: before a record names a blob, the bytes
  stored under its digest are checked (or replaced); a row is never trusted
  for being there.  Reads check every byte against the digest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

from ..keys import CellKey
from ..lifecycle import REPLAY, WAIT, decide
from ..record import RunRecord

Blob = tuple[str, Any]  # (digest, bytes-like)

#: Our ``orchestration_nature`` row: every session of ours carries it.
NATURE_ID = "rssd-magic-stateful-cell"
NATURE_LABEL = "Jupyter %%stateful cell (rssd_magic)"
#: surveilr's own session-level states (what ``surveilr orchestrate``
#: writes), so its web UI's orchestration pages count our kernels.
SESSION_INIT = "surveilr_orchestration_init"
SESSION_COMPLETED = "surveilr_orch_completed"
SESSION_FAILED = "surveilr_orch_failed"


class StoreError(Exception):
    """The state store can't be used or written; the message names the file
    or URL and the cause, in one line."""


class Fenced(Exception):
    """A run's end was refused: its claim was taken over meanwhile.

    ``by`` describes the run that holds the cell now (or what became of it).
    """

    def __init__(self, by: str):
        super().__init__(by)
        self.by = by


@dataclass(frozen=True)
class Transition:
    """One row of ``orchestration_session_state`` for a cell.

    ``seq`` is the store's insertion order (the only order that counts);
    ``transitioned_at`` is the writer's clock, for people to read.
    """

    state_id: str
    entry_id: str
    session_id: str
    from_state: str
    to_state: str
    result_json: str | None
    reason: str | None
    transitioned_at: str
    seq: int = 0

    def record(self) -> RunRecord:
        """The parsed ``transition_result`` (RecordError when it is not one)."""
        return RunRecord.from_json(self.result_json)


@dataclass(frozen=True)
class Holder:
    """The process that holds a claim, described so that another process can
    tell whether it still runs *without trusting any clock or hostname*.

    Pids can only be compared inside one PID namespace of one running kernel:
    ``boot`` (the kernel's boot id) and ``pidns`` say which, ``started`` is
    the process start in clock ticks since boot (immune to clock changes).
    ``machine`` (``/etc/machine-id``) and ``host`` are for people to read.
    """

    host: str
    machine: str
    boot: str
    pidns: str
    pid: int
    started: int
    session_id: str

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}"


@dataclass(frozen=True)
class Claim:
    """Who runs a cell now: the RUNNING transition it claimed, its fencing
    token, and its heartbeat.

    ``beat`` grows with every heartbeat; a waiter judges a holder by whether
    it sees ``beat`` move on its *own* monotonic clock.  ``silent_s`` is the
    time since the last beat measured by the store's single clock, when it
    has one every client shares (PostgreSQL's ``clock_timestamp()``); None
    where it doesn't (SQLite files are shared by hosts with their own clocks).
    ``claimed_at`` is the holder's clock, for people to read.  Two views of
    one claim taken at different moments are equal: ``silent_s`` is a
    measurement, not part of what the claim is.
    """

    entry_id: str
    state_id: str
    token: int
    holder: Holder
    beat: int
    lease_s: float
    claimed_at: str
    silent_s: float | None = field(default=None, compare=False)

    def describe(self) -> str:
        return f"{self.holder.describe()}, since {self.claimed_at} UTC"


@dataclass(frozen=True)
class ClaimRequest:
    """What :meth:`StateBackend.claim` is asked.

    *rerun_of* is the EXECUTED state the caller chose to run again (``--force``,
    a lapsed ``--ttl``) with *rerun_reason*; *first_reason* is recorded when
    the cell never ran (``first run``, ``input n changed (1 → 2)``).  *takeover* is
    a claim the caller judged dead (*dead_because* says why): it is taken over
    only if the claim is still exactly that one (same state, token and beat).
    """

    key: CellKey
    source: str
    elaboration: dict
    holder: Holder
    lease_s: float
    rerun_of: str | None = None
    rerun_reason: str = ""
    first_reason: str = "first run"
    takeover: Claim | None = None
    dead_because: str = ""


@dataclass(frozen=True)
class ClaimOutcome:
    """What :meth:`StateBackend.claim` decided.

    ``run``: this process holds the cell (``running``, ``claim`` are ours;
    ``abandoned`` is the takeover record when a dead holder was replaced).
    ``done``: ``previous`` is an EXECUTED result to replay.
    ``held``: ``claim`` is the live holder's; ``previous`` its RUNNING.
    """

    kind: str
    previous: Transition | None
    running: Transition | None = None
    claim: Claim | None = None
    abandoned: Transition | None = None


@dataclass(frozen=True)
class ClaimVerdict:
    """What a backend does inside its claim transaction (:func:`judge_claim`).

    ``done`` and ``held`` become the :class:`ClaimOutcome` of that kind
    (``held`` names the live claim); ``run`` appends RUNNING with *reason*,
    after a ``RUNNING → ABANDONED`` with reason *abandon* when that is set.
    """

    kind: str
    reason: str = ""
    abandon: str | None = None
    held: Claim | None = None


def judge_claim(
    request: ClaimRequest, previous: Transition | None, held_claim: Callable[[], Claim | None]
) -> ClaimVerdict:
    """The claim policy, the same on every backend: called inside the claim
    transaction with the cell's latest transition; *held_claim* reads the
    claim of that RUNNING (asked only when the cell is RUNNING).

    A RUNNING cell is taken over only when the caller judged its claim dead
    and the claim is still exactly that one (same state, token and beat): a
    holder that renewed or was replaced since is left alone.
    """
    rerun = request.rerun_reason if previous is not None and previous.state_id == request.rerun_of else None
    decision = decide(previous.to_state if previous else None, rerun=rerun)
    if decision.action == REPLAY:
        return ClaimVerdict("done")
    if decision.action == WAIT:
        held = held_claim()
        wanted = request.takeover
        if held is not None and (
            wanted is None or (wanted.state_id, wanted.token, wanted.beat) != (held.state_id, held.token, held.beat)
        ):
            return ClaimVerdict("held", held=held)
        why = request.dead_because if held is not None else "no holder is recorded for it"
        return ClaimVerdict("run", "takeover after ABANDONED", abandon=f"holder dead: {why}")
    return ClaimVerdict("run", decision.reason if previous is not None else request.first_reason)


@dataclass(frozen=True)
class ExecRow:
    """What surveilr's ``orchestration_session_exec`` says of one run (not a
    replay): written by :meth:`StateBackend.finish` in the same transaction
    as the run's end, so surveilr's "executions" pages count every run once.

    ``nature`` is ``python-cell`` or ``sql-cell``; ``status`` 0 for success
    (surveilr's own convention), 1 otherwise; ``identity`` the cell's key;
    ``input_text`` its options; ``output_text`` the first ~4 KB of what it
    printed; ``error_text`` the error, when it failed.
    """

    nature: str
    code: str
    status: int
    identity: str
    input_text: str = ""
    output_text: str = ""
    error_text: str | None = None
    namespace: str | None = None
    elaboration: dict | None = None


class BlobStore(Protocol):
    """Content-addressed bytes: a digest names its blob forever."""

    def get(self, digest: str) -> Any:
        """One blob as a writable buffer, checked against *digest* while it
        is read (IntegrityError on a mismatch); KeyError when missing."""

    def put_many(self, blobs: Iterable[Blob]) -> None:
        """Store blobs (idempotent: a digest already stored is skipped)."""

    def check(self, digest: str) -> str | None:
        """None when the store holds a blob under *digest* whose bytes have
        that digest (read back and hashed, never taken from a cache); else
        why not, in a few words (``missing``, or what is wrong)."""

    def sizes(self) -> dict[str, int]:
        """``{digest: size}`` of every stored blob."""

    def delete(self, digests: Iterable[str]) -> int:
        """Delete blobs; returns how many existed."""

    # gc decides and deletes in one transaction ``t`` (tables.gc):
    # ``exclusive(t)`` keeps writers that found a blob stored away until it
    # ends, ``listing(t)`` is ``(blobs, partial)`` as ``(digest, size)``
    # pairs (``partial``: what a write cut short left), ``drop(t, digests)``.


class Renewer(Protocol):
    """A heartbeat's own connection (never the main thread's: a beat must not
    land inside, or be rolled back with, another transaction)."""

    def renew(self, held: dict[str, int]) -> set[str]:
        """Bump the beat of each ``{state_id: token}`` claim still held with
        that token; return the state ids no longer held (taken over)."""

    def close(self) -> None: ...


class StateBackend(Protocol):
    """An opened state store.  One instance per kernel and location."""

    #: ``file`` or the URL scheme the backend serves (``postgresql``).
    scheme: str
    #: What messages name: the file path, or the URL without its password.
    location: str
    #: This host's name (for records and messages only).
    host: str
    #: This process's ``orchestration_session`` id, once started.
    session_id: str | None
    #: None while this process may write the store; else why not, in a few
    #: words (a read-only file or mount, a schema made by a newer version).
    #: A read-only store replays; every write raises StoreError at once.
    read_only: str | None
    blobs: BlobStore
    dialect: Any

    # -- opening and closing -----------------------------------------------------
    #
    # ``open(location, *, session_args=None, create=True, readonly=False,
    # busy_timeout_s=30.0, allow_network_fs=False, notify=None)`` is a
    # classmethod of each backend (options a backend has no use for are
    # accepted and ignored).  Opening a prepared store writes nothing.
    # *notify(line, tag=None)* is told what the user should know, once
    # each: a store that is read-only here, a file replaced under a running
    # kernel, a wait for another process's lock; and, tagged ``created``, a
    # store that opening created (a run from the wrong folder shows).

    def start_session(self, args: dict) -> str:
        """Start this process's ``orchestration_session`` (once) and return
        its id; *args* go to ``args_json``, the process's Holder to
        ``elaboration``.  The session gets surveilr's first session-level
        state (a row with ``session_entry_id`` NULL): ``INITIAL →
        surveilr_orchestration_init``.  Its rows may be written later, when
        a write is possible, but before any row that names the session."""

    def open_sessions(self) -> list[tuple[str, dict]]:
        """``(session_id, holder)`` of our sessions not finished yet, where
        *holder* is the Holder (as a dict) its process recorded: the engine
        judges which of them a killed kernel left open."""

    def end_session(self, session_id: str, *, failed: bool, reason: str) -> bool:
        """Finish another process's session (a killed kernel's) as
        :meth:`close` would, with *reason*; False if it was finished meanwhile."""

    def close(self, *, failed: bool = False) -> None:
        """Write pending hits and finish the session: its last session-level
        state ``surveilr_orchestration_init → surveilr_orch_completed`` (or
        ``surveilr_orch_failed`` when *failed*: a cell run in it failed) and
        ``orch_finished_at``.  Closes connections.  Never raises."""

    # -- the hot path -----------------------------------------------------------

    def latest(self, key: CellKey) -> Transition | None:
        """The cell's latest transition by store order (None: never ran).
        One indexed read: this is all a replay costs the store."""

    def latest_variant(self, key: CellKey) -> Transition | None:
        """The latest EXECUTED run of the same code on other inputs (to say
        why this one runs), or None."""

    def note_hit(self, state_id: str) -> None:
        """Count a replay; may be buffered (no synchronous write)."""

    def flush_hits(self, patience_s: float | None = None) -> None:
        """Write buffered hit counts, and whatever else waits for a write
        (the session's rows), now, waiting up to *patience_s* (default: the
        busy timeout) for another process's lock."""

    # -- claims ---------------------------------------------------------------

    def claim(self, request: ClaimRequest) -> ClaimOutcome:
        """Decide and record, atomically, who runs the cell now (see
        :func:`rssd_magic.lifecycle.decide`): replay (``done``), wait for a
        live holder (``held``), or append RUNNING with a new claim (``run``),
        recording ``RUNNING → ABANDONED`` first when taking over."""

    def claim_of(self, running: Transition) -> Claim | None:
        """The claim on a RUNNING transition (None when nobody holds it)."""

    def renewer(self) -> Renewer:
        """A new heartbeat connection (used from another thread)."""

    def wait_for_change(self, timeout: float) -> None:
        """Sleep until another process may have ended a run (a backend that
        can be told, such as PostgreSQL's LISTEN/NOTIFY, wakes at once), or
        until *timeout* seconds pass."""

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
        signatures and *exec_row*, and release the claim, in one transaction —
        only while *running* is still the cell's latest transition and
        *token* still holds it (:class:`Fenced` otherwise, nothing written).
        Every blob in *blobs* exists when the record commits (large ones may
        be written beforehand, in transactions of their own)."""

    def append_if_latest(
        self, entry_id: str, from_state: str, to_state: str, result_json: str | None, reason: str, if_latest: str
    ) -> Transition | None:
        """Append one transition only if *if_latest* is still the latest
        transition of the entry's cell (None otherwise): ``forget`` can't
        land after a newer run."""

    # -- signatures -------------------------------------------------------------

    def signatures(self, payload_ids: Iterable[str]) -> dict[str, dict[str, str]]:
        """Every key's signature row of *payload_ids*, in one query:
        ``{payload_id: {key_id: signature}}`` (payloads without a row absent;
        rows whose key id or signature is not text left out).  A replay asks
        for one payload; ``trust`` for all it considers."""

    def add_signatures(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """Record ``(payload_id, key_id, signature)`` rows (idempotent)."""

    # -- what the code above the stores reads and writes through ------------------
    #
    # ``dialect`` renders shared statements; ``read(fn)`` runs ``fn(tx)`` in
    # one consistent read, ``write(fn)`` runs ``fn(tx, retrying)`` in one
    # short write transaction, ``query``/``each`` return or stream the rows
    # of one statement, ``footprint()`` is what the store takes on disk
    # (journal.py documents each).

    # -- the user's SQL on the store itself (--sql without --conn) -----------------

    def sql_connection(self) -> Any:
        """A DB-API connection of its own for the user's SQL cells, so nothing
        a cell does (PRAGMAs, transactions) touches the state's connection."""
