"""Getting the right to run a cell, or the result of whoever had it.

:meth:`StateBackend.claim` decides in one transaction; this module adds
time.  While another kernel holds the cell: wait (one indexed read per
poll), replay its result as soon as it is committed, report its failure, or
— once :class:`~rssd_magic.engine.claims.Watch` judges it dead — ask the backend
to take over that very claim (a claim that moved on meanwhile is not taken).
A waiter never runs the cell itself after the holder *failed*: the user
asked for at-most-once, so re-running is their call.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

from ..store.base import Claim, ClaimOutcome, ClaimRequest
from ..store.journal import StateBackend
from .claims import Watch
from .lifecycle import EXECUTED, FAILED, INTERRUPTED

#: Seconds between two looks at a held cell: how late a waiter can notice
#: the holder's commit when the store can't wake it.
POLL_S = 0.05


class WaitTimeout(Exception):
    """The holder still runs the cell after the caller's --wait."""

    def __init__(self, holder: Claim, waited: float):
        super().__init__(f"gave up after waiting {waited:.1f}s: the cell is still being run by {holder.describe()}")
        self.holder = holder


class HolderFailed(Exception):
    """The run we waited for ended without EXECUTED."""

    def __init__(self, holder: Claim | None, state: str, reason: str | None):
        who = holder.describe() if holder else "another kernel"
        super().__init__(
            f"the run by {who} ended {state}: {reason or 'no reason recorded'}. "
            "The cell was not run here; run it again to retry"
        )


def acquire(
    backend: StateBackend,
    request: ClaimRequest,
    *,
    wait_s: float | None = None,
    on_wait: Callable[[Claim, float], None] = lambda holder, waited: None,
    watch: Watch | None = None,
    wait_for_change: Callable[[float], None] | None = None,
) -> ClaimOutcome:
    """Claim the cell (``run``) or get its committed result (``done``).

    *on_wait(claim, seconds_waited)* is called about every POLL_S while
    another kernel holds the cell, for a status line.  Raises WaitTimeout
    after *wait_s* seconds (None: as long as the holder lives) and
    HolderFailed when the awaited run fails.  *wait_for_change(timeout)*
    sleeps until the store signals a change (or *timeout* passes); the
    default is to sleep.
    """
    started = time.monotonic()
    watch = watch or Watch()
    sleep = wait_for_change or time.sleep
    request = replace(request, takeover=None, dead_because="")
    while True:
        outcome = backend.claim(request)
        if outcome.kind != "held":
            return outcome
        awaited, holder = outcome.previous, outcome.claim
        request = replace(request, takeover=None, dead_because="")
        while True:
            dead = watch.verdict(holder) if holder is not None else "no holder is recorded for it"
            if dead is not None:
                request = replace(request, takeover=holder, dead_because=dead)
                break  # claim again: the transaction records the takeover
            waited = time.monotonic() - started
            if wait_s is not None and waited >= wait_s:
                raise WaitTimeout(holder, waited)
            on_wait(holder, waited)
            sleep(POLL_S if wait_s is None else max(0.0, min(POLL_S, wait_s - waited)))
            latest = backend.latest(request.key)
            if latest is not None and latest.state_id == awaited.state_id:
                holder = backend.claim_of(latest)
                continue
            if latest is not None and latest.to_state == EXECUTED:
                return ClaimOutcome("done", latest)
            if latest is not None and latest.to_state in (FAILED, INTERRUPTED):
                raise HolderFailed(holder, latest.to_state, latest.reason)
            break  # a takeover by a third kernel, or history we don't know: ask again
