"""The RSSD tables rssd_magic reads and writes, and the check that an existing
file has them in the shape we expect.

The ``orchestration_*`` and ``device`` DDL is surveilr's, verbatim in column
names, types, defaults and constraints (``orchestration.sql`` beside this
module is a copy of the project's shared/rssd/orchestration.sql):
tables are only created when missing, never altered.  Everything else is ours
and carries the ``rssd_magic_`` prefix: indexes for our lookups and the
content-addressed blob table that keeps large values out of JSON.
"""

from __future__ import annotations

from importlib import resources

# Loaded from the packaged copy of surveilr's DDL, so there is one text of it.
SURVEILR_DDL = (resources.files(__package__) / "orchestration.sql").read_text("utf-8")

# Our own objects, all prefixed ``rssd_magic_``:
#   blob       large values as raw bytes, keyed by their digest (stored once,
#              checked when read back);
#   claim      who holds a cell's RUNNING transition (claims.py): mutable
#              (heartbeats), so kept apart from the append-only history;
#   signature  HMACs of payloads, one row per payload and key (trust.py);
#   hit        replay counts per EXECUTED transition (a mutable counter).
# The indexes make the per-cell lookup a B-tree probe however many cells
# (ours or surveilr's) the file holds.
OWN_DDL = """
CREATE INDEX IF NOT EXISTS "rssd_magic_entry_src_idx"
    ON "orchestration_session_entry"("ingest_src");
CREATE INDEX IF NOT EXISTS "rssd_magic_state_entry_idx"
    ON "orchestration_session_state"("session_entry_id", "orchestration_session_state_id");
CREATE TABLE IF NOT EXISTS "rssd_magic_blob" (
    "digest" TEXT PRIMARY KEY NOT NULL,
    "size" INTEGER NOT NULL,
    "data" BLOB NOT NULL,
    "created_at" TIMESTAMPTZ DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE IF NOT EXISTS "rssd_magic_claim" (
    "entry_id" VARCHAR PRIMARY KEY NOT NULL,
    "state_id" VARCHAR NOT NULL,
    "session_id" VARCHAR NOT NULL,
    "host" TEXT NOT NULL,
    "pid" INTEGER NOT NULL,
    "pid_started" REAL NOT NULL,
    "claimed_at" REAL NOT NULL,
    "heartbeat_at" REAL NOT NULL,
    "lease_s" REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS "rssd_magic_signature" (
    "payload_id" TEXT NOT NULL,
    "key_id" TEXT NOT NULL,
    "signature" TEXT NOT NULL,
    "created_at" TIMESTAMPTZ DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY ("payload_id", "key_id")
);
CREATE TABLE IF NOT EXISTS "rssd_magic_hit" (
    "state_id" VARCHAR PRIMARY KEY NOT NULL,
    "hits" INTEGER NOT NULL,
    "last_hit_at" TIMESTAMPTZ
);
"""

#: The columns we read or write, per table, in declared order.  An existing
#: table must have exactly these (name and declared type) or we refuse the file.
EXPECTED_COLUMNS: dict[str, list[tuple[str, str]]] = {}


def _parse_expected() -> None:
    import sqlite3

    mem = sqlite3.connect(":memory:")
    mem.executescript(SURVEILR_DDL + OWN_DDL)
    for (table,) in mem.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
    ).fetchall():
        EXPECTED_COLUMNS[table] = [
            (row[1], row[2]) for row in mem.execute(f'PRAGMA table_info("{table}")')
        ]
    mem.close()


_parse_expected()


def schema_problems(conn) -> list[str]:
    """Describe every table of ours that exists in *conn* with another shape.

    Missing tables are not problems (they get created); a table with other
    columns is, because writing into it would corrupt another tool's data.
    """
    problems = []
    for table, expected in EXPECTED_COLUMNS.items():
        actual = [(row[1], row[2]) for row in conn.execute(f'PRAGMA table_info("{table}")')]
        if actual and actual != expected:
            want = ", ".join(f"{n} {t}" for n, t in expected)
            got = ", ".join(f"{n} {t}" for n, t in actual)
            problems.append(f"table {table} has columns ({got}); expected ({want})")
    return problems
