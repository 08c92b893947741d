"""When a recorded result is too old to replay (``--ttl``)."""

from __future__ import annotations

import re
from datetime import datetime, timezone

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_duration(text: str) -> float:
    """Seconds in ``30m``, ``12h``, ``7d`` (units s, m, h, d, w); ValueError otherwise."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration like 45s, 30m, 12h, 7d or 2w")
    return float(match.group(1)) * _UNITS[match.group(2)]


def age_s(transitioned_at: str, now: float) -> float:
    """Seconds from an RSSD timestamp ('YYYY-MM-DD HH:MM:SS', UTC) to *now* (epoch seconds)."""
    then = datetime.strptime(transitioned_at, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
    return now - then.timestamp()
