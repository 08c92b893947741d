"""The states a cell goes through, and the one table that says what a run of
``%%stateful`` does in each.

History is append-only: a cell's state is the ``to_state`` of its latest
transition, "latest" meaning last in the store's own order (SQLite's rowid,
a PostgreSQL sequence), never a timestamp or a ULID, which carry the
writer's clock.  The chain::

    INITIAL ─→ RUNNING ─→ EXECUTED ─→ FORGOTTEN ─→ RUNNING …
                  │  └──→ FAILED | INTERRUPTED ─→ RUNNING …
                  └─────→ ABANDONED (holder dead, taken over) ─→ RUNNING …

:func:`decide` is used twice with the same answer: once on a plain read (the
replay hot path, no write) and again inside the claim transaction, where the
answer is final because no other writer can slip in between.
"""

from __future__ import annotations

from dataclasses import dataclass

INITIAL = "INITIAL"
RUNNING = "RUNNING"
EXECUTED = "EXECUTED"
FAILED = "FAILED"
INTERRUPTED = "INTERRUPTED"
ABANDONED = "ABANDONED"
FORGOTTEN = "FORGOTTEN"

#: States a run ends in.  Recording one is a compare-and-append: it lands
#: only while the run's own RUNNING is still the latest transition.
ENDS = frozenset({EXECUTED, FAILED, INTERRUPTED})
#: Every state this package writes for a cell.
STATES = frozenset({INITIAL, RUNNING, EXECUTED, FAILED, INTERRUPTED, ABANDONED, FORGOTTEN})

# What a run of the magic does with a cell.
REPLAY = "replay"  # show the recorded run
RUN = "run"  # claim the cell and execute it
WAIT = "wait"  # another kernel holds it: wait for it (or take over if it died)
REFUSE = "refuse"  # --replay-only and nothing to replay


@dataclass(frozen=True)
class Decision:
    """What to do, and the reason a run is recorded with (``transition_reason``)."""

    action: str
    reason: str = ""


def decide(latest_state: str | None, *, rerun: str | None = None, replay_only: bool = False) -> Decision:
    """What a cell whose latest state is *latest_state* (None: never ran) does.

    *rerun* is why the caller wants an EXECUTED result run again (``--force``,
    a lapsed ``--ttl``), or None to replay it.  The table:

    ============================  ==============  =====================
    latest state                  --replay-only   otherwise
    ============================  ==============  =====================
    none                          refuse          run ("first run")
    EXECUTED                      replay          replay, or run if *rerun*
    RUNNING                       refuse          wait
    FAILED, INTERRUPTED,          refuse          run ("retry after …")
    ABANDONED, FORGOTTEN, other
    ============================  ==============  =====================
    """
    if replay_only:
        return Decision(REPLAY if latest_state == EXECUTED else REFUSE)
    if latest_state == RUNNING:
        return Decision(WAIT)
    if latest_state == EXECUTED:
        return Decision(RUN, f"{rerun} after {EXECUTED}") if rerun else Decision(REPLAY)
    if latest_state is None:
        return Decision(RUN, "first run")
    return Decision(RUN, f"retry after {latest_state}")
