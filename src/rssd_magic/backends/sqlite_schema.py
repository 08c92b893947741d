"""The tables of an RSSD: may we use this file's schema, and the tables we
need in it.

The ``orchestration_*`` and ``device`` DDL is surveilr's, verbatim
(``orchestration.sql`` beside this module is the project's
shared/rssd/orchestration.sql): those tables are only created when missing,
never altered.  Everything else is ours, prefixed ``rssd_magic_``, and
versioned in ``rssd_magic_meta`` so a later layout can migrate it.

A file is refused, before a byte of it changes (:func:`schema_problems`),
when it is not an RSSD — it holds tables, none of them surveilr's or ours
(an application's own database) — or when a table we use has other
columns, is a view or a virtual table, or one of ours carries a trigger:
whoever can write the file could otherwise make our reads never end or our
writes do something else.  A schema newer than this version knows is
never written (:func:`newer_schema`): records may still be replayed.
"""

from __future__ import annotations

import sqlite3
from importlib import resources
from typing import Callable

from ..store import tally
from ..store.dialect import SqliteDialect, Tx
from ..store.schema import SET_VERSION, VERSION, columns_differ, newer, statements, version_of

#: surveilr's DDL, loaded from the packaged copy so there is one text of it.
SURVEILR_DDL = (resources.files(__package__) / "orchestration.sql").read_text("utf-8")

#: Version of our own objects (``rssd_magic_*``).  1 and 2: the unpublished
#: development versions (version 1's claims are not read: a file with them is
#: refused, its claim table having other columns).  3: values larger than a chunk are kept as several rows of ``blob_chunk``
#: (SQLite refuses a row over 1 GB); single-row blobs read as before.
#: 4: claims are found by their RUNNING state through an index (a heartbeat
#: touches one row however many cells the file holds).  5: the tally and
#: refs ``stats`` and ``gc --dry-run`` read (store/tally.py), kept by every
#: writer of this version — which is why an older one may no longer write;
#: a heartbeat finds its claim by entry (rows.beat), and the state index
#: goes: each claim and release wrote a page of it.
SCHEMA_VERSION = 5

# Our own objects:
#   meta       our schema version (and later settings);
#   blob       large values as raw bytes, keyed by digest (stored once,
#              checked when read back); a value larger than a chunk has an
#              empty ``data`` here and its bytes in
#   blob_chunk, one row per chunk keyed by (digest, byte offset): each row
#              well under SQLite's length limit, reassembled on read;
#   claim      who runs a cell now: one row per entry, kept after release so
#              the fencing token keeps growing; mutable (heartbeats), hence
#              apart from the append-only history;
#   signature  HMACs of payloads, one row per payload and key (trust.py);
#   hit        replay counts per EXECUTED transition (a mutable counter);
#   tally      sums over our cells, kept by each append (store/tally.py);
#   ref        the blobs each cell's current EXECUTED record names.
# The two derived tables are WITHOUT ROWID: one B-tree each, so an append
# dirties one more page, not two.  What gc would free is then one pass over
# an index of the blobs (digest, size: not their bytes), each probed in the
# refs by digest.
# The indexes make the per-cell lookup a B-tree probe however many cells
# (ours or surveilr's) the file holds; an index on session_entry_id alone
# ends in the rowid, so "latest by store order" is a backwards index scan.
OWN_DDL = """
CREATE INDEX IF NOT EXISTS "rssd_magic_entry_src_idx"
    ON "orchestration_session_entry"("ingest_src");
CREATE INDEX IF NOT EXISTS "rssd_magic_state_entry_seq_idx"
    ON "orchestration_session_state"("session_entry_id");
CREATE TABLE IF NOT EXISTS "rssd_magic_meta" (
    "key" TEXT PRIMARY KEY NOT NULL,
    "value" TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS "rssd_magic_blob" (
    "digest" TEXT PRIMARY KEY NOT NULL,
    "size" INTEGER NOT NULL,
    "data" BLOB NOT NULL,
    "created_at" TIMESTAMPTZ DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE IF NOT EXISTS "rssd_magic_blob_chunk" (
    "digest" TEXT NOT NULL,
    "offset" INTEGER NOT NULL,
    "data" BLOB NOT NULL,
    PRIMARY KEY ("digest", "offset")
);
CREATE TABLE IF NOT EXISTS "rssd_magic_claim" (
    "entry_id" VARCHAR PRIMARY KEY NOT NULL,
    "state_id" VARCHAR,
    "token" INTEGER NOT NULL,
    "session_id" VARCHAR NOT NULL,
    "host" TEXT NOT NULL,
    "machine" TEXT NOT NULL,
    "boot" TEXT NOT NULL,
    "pidns" TEXT NOT NULL,
    "pid" INTEGER NOT NULL,
    "started" INTEGER NOT NULL,
    "beat" INTEGER NOT NULL,
    "lease_s" REAL NOT NULL,
    "claimed_at" TEXT NOT NULL
);
DROP INDEX IF EXISTS "rssd_magic_claim_state_idx";
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
CREATE TABLE IF NOT EXISTS "rssd_magic_tally" (
    "shard" INTEGER NOT NULL,
    "name" TEXT NOT NULL,
    "value" NUMERIC NOT NULL,
    PRIMARY KEY ("shard", "name")
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS "rssd_magic_ref" (
    "entry_id" VARCHAR NOT NULL,
    "digest" TEXT NOT NULL,
    PRIMARY KEY ("digest", "entry_id")
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS "rssd_magic_ref_entry_idx"
    ON "rssd_magic_ref"("entry_id");
CREATE INDEX IF NOT EXISTS "rssd_magic_blob_size_idx"
    ON "rssd_magic_blob"("digest", "size");
"""

#: Every object we create, to tell at open whether the DDL must run at all.
OWN_OBJECTS = {
    "rssd_magic_entry_src_idx",
    "rssd_magic_state_entry_seq_idx",
    "rssd_magic_meta",
    "rssd_magic_blob",
    "rssd_magic_blob_chunk",
    "rssd_magic_claim",
    "rssd_magic_signature",
    "rssd_magic_hit",
    "rssd_magic_tally",
    "rssd_magic_ref",
    "rssd_magic_ref_entry_idx",
    "rssd_magic_blob_size_idx",
}


_DDL = statements(SURVEILR_DDL + OWN_DDL)


def own_tables_as_temp() -> dict[str, str]:
    """``{table: CREATE TEMP TABLE …}`` for our tables (not indexes), for a
    read-only connection to a file that lacks them."""
    out = {}
    for statement in statements(OWN_DDL):
        if statement.startswith("CREATE TABLE"):
            table = statement.split('"')[1]
            out[table] = statement.replace("CREATE TABLE IF NOT EXISTS", "CREATE TEMP TABLE", 1)
    return out


def _expected_columns() -> dict[str, list[tuple[str, str]]]:
    mem = sqlite3.connect(":memory:")
    try:
        mem.executescript(SURVEILR_DDL + OWN_DDL)
        tables = [t for (t,) in mem.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: [(r[1], r[2]) for r in mem.execute(f'PRAGMA table_info("{t}")')] for t in tables}
    finally:
        mem.close()


#: The columns we read or write, per table, in declared order.  An existing
#: table must have exactly these (name and declared type) or we refuse it.
EXPECTED_COLUMNS = _expected_columns()
#: The shared statements (store/rows.py, store/journal.py, the reports) as an RSSD runs them.
SQL = SqliteDialect(EXPECTED_COLUMNS)


#: The tables surveilr's own models define (shared/rssd's
#: surveilr-bootstrap-sql-models.js): a file holding tables, none of them
#: these nor ours, is somebody else's database, not an RSSD.
SURVEILR_TABLES = frozenset(
    """
    sqlean_define assurance_schema device code_notebook_kernel code_notebook_cell code_notebook_state
    sqlpage_files surveilr_table_size sqlpage_aide_navigation party_type party party_relation_type
    party_relation gender_type sex_type person_type person organization organization_role_type
    organization_role device_party_relationship behavior ur_ingest_session ur_ingest_session_fs_path
    uniform_resource uniform_resource_transform ur_ingest_session_task ur_ingest_session_plm_user
    ur_ingest_session_attachment ur_ingest_session_udi_pgp_sql orchestration_nature orchestration_session
    orchestration_session_entry orchestration_session_state orchestration_session_exec
    orchestration_session_issue orchestration_session_log uniform_resource_graph uniform_resource_edge
    surveilr_osquery_ms_node osquery_policy surveilr_osquery_ms_carve surveilr_snmp_device
    surveilr_snmp_collection surveilr_function_doc
    """.split()
)
OWN_PREFIX = "rssd_magic_"


def schema_problems(conn: sqlite3.Connection) -> list[str]:
    """Why this file can't be used as an RSSD, each in a few words (nothing
    is read but the schema; missing tables get created later, our indexes
    and version brought up to date).  Empty when it can."""
    objects = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
    tables = {name for kind, name, _, _ in objects if kind == "table" and not name.startswith("sqlite_")}
    if tables and not tables & SURVEILR_TABLES and not any(t.startswith(OWN_PREFIX) for t in tables):
        shown = ", ".join(sorted(tables)[:5]) + (f" and {len(tables) - 5} more" if len(tables) > 5 else "")
        return [f"not an RSSD: it holds tables ({shown}) and none of surveilr's; give --db an RSSD or a new file"]
    problems = []
    for kind, name, table, sql in objects:
        if name in EXPECTED_COLUMNS and (kind != "table" or (sql or "").lstrip().upper().startswith("CREATE VIRTUAL")):
            problems.append(f"{name} is a {'virtual table' if kind == 'table' else kind}, not a plain table")
        elif kind == "trigger" and table.startswith(OWN_PREFIX):
            problems.append(f"trigger {name} on our table {table} (our tables carry none)")
    for table, expected in EXPECTED_COLUMNS.items():
        if table not in tables:
            continue
        columns = list(conn.execute(f'PRAGMA table_xinfo("{table}")'))
        actual = [(row[1], row[2]) for row in columns]
        if any(row[6] for row in columns):  # hidden or generated columns compute on read
            problems.append(f"table {table} has generated or hidden columns")
        elif actual != expected:
            problems.append(columns_differ(table, actual, expected))
    return problems


def stored_version(conn: sqlite3.Connection) -> int | None:
    """Our schema version as the file records it (None: not recorded)."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'rssd_magic_meta'").fetchone():
        return None
    return version_of(conn.execute(SQL(VERSION)).fetchone())


def newer_schema(conn: sqlite3.Connection) -> str | None:
    """Why this version must not write the file — its tables were made by a
    newer rssd_magic — or None."""
    return newer(stored_version(conn), SCHEMA_VERSION)


def needs_ddl(conn: sqlite3.Connection) -> bool:
    """True when a table or index is missing or ours is of an older version
    (the common case, a prepared file, takes no write lock to open)."""
    have = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    if not (set(EXPECTED_COLUMNS) | OWN_OBJECTS) <= have:
        return True
    version = stored_version(conn)
    return version is None or version < SCHEMA_VERSION


def ensure_schema(conn: sqlite3.Connection, begin: Callable[[sqlite3.Connection], None]) -> None:
    """Create what is missing and migrate our own objects: one transaction
    (*begin* opens it with the write lock), decided inside the lock
    (another kernel may be doing the same)."""
    if not needs_ddl(conn):
        return
    begin(conn)
    try:
        if needs_ddl(conn):
            for statement in _DDL:
                conn.execute(statement)
            tx = Tx(conn, SQL)
            if tally.read(tx) is None:
                tally.rebuild(tx)  # a new file's zeros, or what an older version wrote, counted once
            conn.execute(SQL(SET_VERSION), (str(SCHEMA_VERSION),))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
