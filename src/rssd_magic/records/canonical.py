"""One way to write things down: JSON as stored, canonical JSON for digests,
the timestamp text, and the byte sizes and durations people read.

Two JSON forms, on purpose:

* :func:`dumps` is how a value is **stored** (``transition_result``,
  ``elaboration``): compact UTF-8 text, dict order kept (outputs read in the
  order they happened), no NaN (SQLite's ``json_valid`` and PostgreSQL refuse
  it).
* :func:`canonical` is how a value is **hashed** (keys, input digests,
  signatures): the same, with keys sorted, so equal values give equal bytes
  whatever order a dict was built in.  ``CANONICAL_VERSION`` names this form;
  whoever folds it into a digest folds the version in too, so a change of
  form can never alias an old digest.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

CANONICAL_VERSION = "rssd_magic.records.canonical.v1"

#: The text form of SQLite's CURRENT_TIMESTAMP (UTC, whole seconds), which
#: surveilr's own rows use; ours match so the columns sort and compare alike.
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"


def dumps(obj: Any) -> str:
    """Compact JSON as we store it (UTF-8 text, dict order kept, no NaN)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical(obj: Any) -> str:
    """Canonical JSON text: :func:`dumps` with sorted keys."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_bytes(obj: Any) -> bytes:
    """:func:`canonical` encoded as UTF-8 (lone surrogates kept, escaped by
    ``surrogatepass``, so any Python string has bytes to hash)."""
    return canonical(obj).encode("utf-8", "surrogatepass")


def loads_object(text: str | bytes | None) -> dict:
    """A JSON object written by anyone (another tool, an older version):
    ``{}`` when *text* is empty, not JSON, too deep, or not an object."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def utc_now() -> str:
    """Now, as SQLite's CURRENT_TIMESTAMP writes it (UTC, seconds)."""
    return datetime.now(timezone.utc).strftime(TIMESTAMP_FORMAT)


def fmt_bytes(n: int | float | None) -> str:
    """``812 B``, ``1.2 kB``, ``200.0 MB``: decimal units (1 kB = 1000 B), as
    disks and ``ls -h --si`` count, one form everywhere."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"  # pragma: no cover - the loop always returns


def fmt_duration(seconds: float | int | None) -> str:
    """``0.9 ms``, ``17.6 ms``, ``3.2 s``, ``2 min``, ``3 h 5 min``: one form
    for banners, listings and messages."""
    if seconds is None:
        return "-"
    s = float(seconds)
    if s < 0.1:
        return f"{s * 1000:.1f} ms" if s < 0.0995 else "0.1 s"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        minutes = s / 60
        return f"{minutes:.0f} min" if minutes >= 10 else f"{minutes:.1f} min".replace(".0 min", " min")
    hours, rest = divmod(int(round(s)), 3600)
    if hours >= 48:
        return f"{hours / 24:.1f} d".replace(".0 d", " d")
    return f"{hours} h {rest // 60} min" if rest >= 60 else f"{hours} h"


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 time``, ``2 times``: no ``time(s)`` in anything a person reads."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def printable(text: str, width: int = 60) -> str:
    """*text* from a record, safe to print on one line: a name, digest or
    MIME type another tool wrote may hold newlines, record separators or
    terminal escapes (then it is shown as its ``repr``); at most *width*
    characters."""
    text = text if text.isprintable() else repr(text)
    return text if len(text) <= width else text[: width - 1] + "…"
