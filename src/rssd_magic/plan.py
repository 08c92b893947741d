"""Deciding what a ``%%stateful`` cell does now: replay, or run — and why.

The rules, in order:

1. ``--replay-only``: replay the executed result, or refuse (never run);
2. an executed result replays, unless ``--force`` or ``--ttl`` (older than
   the TTL: stale) ask to run it again;
3. anything else runs: never ran, failed, interrupted, forgotten.  A cell
   whose *inputs* changed is a new key; when the same code ran on other
   inputs, the reason names what changed (deps.explain).

The reason is what the user is told in one line and what the RSSD stores
in ``transition_reason``.  Nothing here waits or writes: claiming the right
to run is acquire.py's job.
"""

from __future__ import annotations

from dataclasses import dataclass

from .deps import explain
from .keys import CellKey
from .store import EXECUTED, Store, Transition
from .ttl import age_s


class NothingToReplay(Exception):
    """``--replay-only`` on a cell with no executed result."""


@dataclass(frozen=True)
class Plan:
    """``replay`` is the transition to replay, or None to run the cell."""

    replay: Transition | None
    rerun_of: str | None = None  # the EXECUTED state being run again
    rerun_reason: str = ""
    first_reason: str = "first run"
    note: str | None = None  # one line for the user, when running again


def plan(
    store: Store,
    key: CellKey,
    latest: Transition | None,
    *,
    inputs: dict | None = None,
    force: bool = False,
    ttl_s: float | None = None,
    ttl_text: str = "",
    replay_only: bool = False,
    now: float = 0.0,
) -> Plan:
    """What to do with the cell whose latest transition is *latest*."""
    executed = latest is not None and latest.to_state == EXECUTED
    if replay_only:
        if not executed:
            state = latest.to_state if latest else "never run"
            raise NothingToReplay(
                f"this cell has no executed result in {store.path} (state: {state}, key {key.digest[:12]})"
            )
        return Plan(replay=latest)
    if executed:
        if force:
            return Plan(None, latest.state_id, f"forced (--force) after {EXECUTED}")
        if ttl_s is not None:
            age = age_s(latest.transitioned_at, now)
            if age > ttl_s:
                why = f"stale: executed {latest.transitioned_at} UTC, {age:.0f}s ago, older than --ttl {ttl_text}"
                return Plan(None, latest.state_id, f"{why} after {EXECUTED}", note=f"running again: result is {why}")
        return Plan(replay=latest)
    if latest is None and key.inputs:
        earlier = store.latest_variant(key)
        if earlier is not None:
            why = explain(_inputs_of(earlier), inputs or {}) or "inputs changed"
            return Plan(None, first_reason=f"inputs changed: {why}", note=f"running again: {why}")
    return Plan(None)


def _inputs_of(transition: Transition) -> dict | None:
    try:
        inputs = transition.result().get("inputs")
    except (ValueError, AttributeError):
        return None
    return inputs if isinstance(inputs, dict) else None
