"""What every store judges alike of the tables it finds, before it writes a
byte: a table of ours with other columns is refused with one line naming
both shapes, and tables made by a newer rssd_magic are never written (their
records may still replay).  A store reads its own catalog (sqlite_master,
pg_class) and says what it found in these words.

DDL scripts are split here too, one statement at a time, before names are
filled in (so a name can't split a statement): a driver runs one statement
per call, and SQLite's ``executescript`` would commit the transaction the
DDL must run in.
"""

from __future__ import annotations

import sqlite3
from typing import Any

#: Our objects' schema version as a store records it in ``rssd_magic_meta``,
#: and how it is recorded (a template, dialect.py).
VERSION = "SELECT value FROM {rssd_magic_meta} WHERE key = 'schema_version'"
SET_VERSION = """INSERT INTO {rssd_magic_meta} (key, value) VALUES ('schema_version', ?)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value"""


def statements(script: str) -> list[str]:
    """A DDL script as single statements, split where SQLite's tokenizer
    sees one end (quotes, comments and trigger bodies respected)."""
    out, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending.strip())
            pending = ""
    return [s for s in out if s.strip(" ;\n")]


def columns_differ(table: str, actual: list[tuple[str, str]], expected: list[tuple[str, str]]) -> str:
    """Why *table* can't be used: its ``(name, type)`` columns are not ours."""
    want = ", ".join(f"{n} {t}" for n, t in expected)
    got = ", ".join(f"{n} {t}" for n, t in actual)
    return f"table {table} has columns ({got}); expected ({want})"


def version_of(row: Any) -> int | None:
    """The version a :data:`VERSION` row holds (None: no row, or not a number)."""
    try:
        return int(row[0]) if row else None
    except (TypeError, ValueError):
        return None


def newer(version: int | None, known: int) -> str | None:
    """Why this version must not write tables of schema *version* (None: it may)."""
    if version is None or version <= known:
        return None
    from .. import __version__

    return (
        f"its rssd_magic tables are of schema version {version}, made by a newer rssd_magic (this one knows "
        f"version {known}: rssd_magic {__version__}); upgrade rssd_magic to write to it (pip install -U rssd_magic)"
    )
