"""Getting the right to run a cell, or the result of whoever had it.

:meth:`Store.claim` decides in one transaction; this module adds time: when
another live kernel holds the cell, wait (polling one indexed read), then
replay its result as soon as it is committed, take over if the holder dies,
or report its failure.  A waiter never runs the cell itself after the holder
*failed*: the user asked for at-most-once, so re-running is their call.
"""

from __future__ import annotations

import time
from typing import Callable

from .claims import DEFAULT_LEASE_S, Claim
from .keys import CellKey
from .store import EXECUTED, FAILED, INTERRUPTED, ClaimOutcome, Store

#: Seconds between two looks at a held cell: the bound on how late a waiter
#: notices the holder's commit.
POLL_S = 0.05


class WaitTimeout(Exception):
    """The holder still runs the cell after the caller's --wait."""

    def __init__(self, holder: Claim, waited: float):
        super().__init__(
            f"gave up after waiting {waited:.1f}s: the cell is still being run by {holder.describe()}"
        )
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
    store: Store,
    key: CellKey,
    source: str,
    elaboration: dict,
    *,
    rerun_of: str | None = None,
    rerun_reason: str = "",
    wait_s: float | None = None,
    lease_s: float = DEFAULT_LEASE_S,
    first_reason: str = "first run",
    on_wait: Callable[[Claim, float], None] = lambda holder, waited: None,
) -> ClaimOutcome:
    """Claim the cell (``run``) or get its committed result (``done``).

    *on_wait(holder, seconds_waited)* is called about every POLL_S while
    another kernel holds the cell, for a status line.  Raises WaitTimeout
    after *wait_s* seconds (None: wait as long as the holder lives) and
    HolderFailed when the awaited run fails.
    """
    started = time.monotonic()
    while True:
        outcome = store.claim(
            key,
            source,
            elaboration,
            rerun_of=rerun_of,
            rerun_reason=rerun_reason,
            lease_s=lease_s,
            first_reason=first_reason,
        )
        if outcome.kind != "held":
            return outcome
        awaited, holder = outcome.previous, outcome.holder
        while True:
            waited = time.monotonic() - started
            if wait_s is not None and waited >= wait_s:
                raise WaitTimeout(holder, waited)
            on_wait(holder, waited)
            time.sleep(POLL_S if wait_s is None else max(0.0, min(POLL_S, wait_s - waited)))
            latest = store.latest(key)
            if latest.state_id == awaited.state_id:
                current = store.claim_of(latest)
                if current is None or current.dead_because() is not None:
                    break  # claim again: the transaction records the takeover
                holder = current
                continue
            if latest.to_state == EXECUTED:
                return ClaimOutcome("done", latest)
            if latest.to_state in (FAILED, INTERRUPTED):
                raise HolderFailed(holder, latest.to_state, latest.reason)
            break  # a takeover by a third kernel, or history we don't know: ask again
