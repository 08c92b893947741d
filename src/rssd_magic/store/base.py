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

from ..engine.keys import CellKey
from ..engine.lifecycle import REPLAY, WAIT, decide
from ..records.record import RunRecord

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
