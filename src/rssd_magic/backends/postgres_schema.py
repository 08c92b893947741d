"""The tables on a PostgreSQL server: surveilr's, as an RSSD has them, and ours.

Everything lives in the connection's current schema (the first existing one
on its ``search_path``), so a team can give each project a schema of its
own.  Tables are only created when missing, inside one transaction under a
transaction-level advisory lock (two kernels opening a fresh database at
once would otherwise race in ``CREATE TABLE IF NOT EXISTS``); an existing
table with other columns is refused with one line before anything is
written.  Our objects are versioned in ``rssd_magic_meta``.

How surveilr's SQLite columns map, so rows round-trip byte-identical between
an RSSD file and the server (``postgres_transfer.py``):

* names, NOT NULL, UNIQUE, primary and foreign keys as surveilr declares;
* JSON stays **TEXT** (not jsonb, which would reorder keys and respace it),
  checked with a cast to ``json``, which validates without rewriting;
* timestamps stay **TEXT** in SQLite's ``CURRENT_TIMESTAMP`` form
  (``YYYY-MM-DD HH:MM:SS``, UTC), written from the server's clock: an RSSD
  holds them as text, and text is what comes back;
* ``INTEGER`` becomes ``BIGINT`` (SQLite integers are 64-bit).

Store order (``Transition.seq``) is ``rssd_magic_state_seq``: an identity
column keyed by state id.  We write it in the statement that appends a
transition; a trigger gives one to rows other tools insert, so "latest" is
what the server wrote last, whoever wrote it.
"""

from __future__ import annotations

import re

import psycopg
from psycopg import sql

#: Version of our own objects on PostgreSQL.  1: the first layout.
SCHEMA_VERSION = 1

#: SQLite's CURRENT_TIMESTAMP text, from the server's clock.
NOW = "to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')"


def _json(column: str, required: bool = False) -> str:
    if required:
        return f'CHECK ("{column}"::json IS NOT NULL)'
    return f'CHECK ("{column}" IS NULL OR "{column}"::json IS NOT NULL)'


# surveilr's tables (shared/rssd/orchestration.sql), one column per line.
SURVEILR_DDL = f"""
CREATE TABLE IF NOT EXISTS "device" (
    "device_id" VARCHAR PRIMARY KEY NOT NULL,
    "name" TEXT NOT NULL,
    "state" TEXT NOT NULL {_json("state", True)},
    "boundary" TEXT NOT NULL,
    "segmentation" TEXT {_json("segmentation")},
    "state_sysinfo" TEXT {_json("state_sysinfo")},
    "elaboration" TEXT {_json("elaboration")},
    "created_at" TEXT DEFAULT {NOW},
    "created_by" TEXT DEFAULT 'UNKNOWN',
    "updated_at" TEXT,
    "updated_by" TEXT,
    "deleted_at" TEXT,
    "deleted_by" TEXT,
    "activity_log" TEXT,
    UNIQUE ("name", "state", "boundary")
);
CREATE TABLE IF NOT EXISTS "orchestration_nature" (
    "orchestration_nature_id" TEXT PRIMARY KEY NOT NULL,
    "nature" TEXT NOT NULL,
    "elaboration" TEXT {_json("elaboration")},
    "created_at" TEXT DEFAULT {NOW},
    "created_by" TEXT DEFAULT 'UNKNOWN',
    "updated_at" TEXT,
    "updated_by" TEXT,
    "deleted_at" TEXT,
    "deleted_by" TEXT,
    "activity_log" TEXT,
    UNIQUE ("orchestration_nature_id", "nature")
);
CREATE TABLE IF NOT EXISTS "orchestration_session" (
    "orchestration_session_id" VARCHAR PRIMARY KEY NOT NULL,
    "device_id" VARCHAR NOT NULL REFERENCES "device" ("device_id"),
    "orchestration_nature_id" TEXT NOT NULL REFERENCES "orchestration_nature" ("orchestration_nature_id"),
    "version" TEXT NOT NULL,
    "orch_started_at" TEXT DEFAULT {NOW},
    "orch_finished_at" TEXT,
    "elaboration" TEXT {_json("elaboration")},
    "args_json" TEXT {_json("args_json")},
    "diagnostics_json" TEXT {_json("diagnostics_json")},
    "diagnostics_md" TEXT
);
CREATE TABLE IF NOT EXISTS "orchestration_session_entry" (
    "orchestration_session_entry_id" VARCHAR PRIMARY KEY NOT NULL,
    "session_id" VARCHAR NOT NULL REFERENCES "orchestration_session" ("orchestration_session_id"),
    "ingest_src" TEXT NOT NULL,
    "ingest_table_name" TEXT,
    "elaboration" TEXT {_json("elaboration")}
);
CREATE TABLE IF NOT EXISTS "orchestration_session_state" (
    "orchestration_session_state_id" VARCHAR PRIMARY KEY NOT NULL,
    "session_id" VARCHAR NOT NULL REFERENCES "orchestration_session" ("orchestration_session_id"),
    "session_entry_id" VARCHAR REFERENCES "orchestration_session_entry" ("orchestration_session_entry_id"),
    "from_state" TEXT NOT NULL,
    "to_state" TEXT NOT NULL,
    "transition_result" TEXT {_json("transition_result")},
    "transition_reason" TEXT,
    "transitioned_at" TEXT DEFAULT {NOW},
    "elaboration" TEXT {_json("elaboration")},
    UNIQUE ("orchestration_session_state_id", "from_state", "to_state")
);
CREATE TABLE IF NOT EXISTS "orchestration_session_exec" (
    "orchestration_session_exec_id" VARCHAR PRIMARY KEY NOT NULL,
    "exec_nature" TEXT NOT NULL,
    "session_id" VARCHAR NOT NULL REFERENCES "orchestration_session" ("orchestration_session_id"),
    "session_entry_id" VARCHAR REFERENCES "orchestration_session_entry" ("orchestration_session_entry_id"),
    "parent_exec_id" VARCHAR REFERENCES "orchestration_session_exec" ("orchestration_session_exec_id"),
    "namespace" TEXT,
    "exec_identity" TEXT,
    "exec_code" TEXT NOT NULL,
    "exec_status" BIGINT NOT NULL,
    "input_text" TEXT,
    "exec_error_text" TEXT,
    "output_text" TEXT,
    "output_nature" TEXT {_json("output_nature")},
    "narrative_md" TEXT,
    "elaboration" TEXT {_json("elaboration")}
);
"""

# Our own tables:
#   meta        our schema version;
#   state_seq   store order of every transition (identity), and its cell;
#   claim       who runs a cell now: one row per cell (ingest_src), kept
#               after release so its fencing token keeps growing; claims
#               lock this row (SELECT … FOR UPDATE), so claims and ends of
#               one cell are serialized while other cells go on;
#               heartbeat_at is the server's clock (Claim.silent_s);
#   blob        one row per content-addressed value, its bytes in
#               blob_chunk (a 200 MB value is never one parameter);
#   signature   HMACs of payloads (trust.py);  hit  replay counts.
# ingest_src is indexed in the "C" collation so that prefix ranges mean
# code-point order whatever the database's collation.
OWN_TABLES_DDL = f"""
CREATE TABLE IF NOT EXISTS "rssd_magic_meta" (
    "key" TEXT PRIMARY KEY NOT NULL,
    "value" TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS "rssd_magic_state_seq" (
    "seq" BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    "state_id" VARCHAR NOT NULL UNIQUE,
    "entry_id" VARCHAR
);
CREATE TABLE IF NOT EXISTS "rssd_magic_claim" (
    "ingest_src" TEXT PRIMARY KEY NOT NULL,
    "token" BIGINT NOT NULL DEFAULT 0,
    "entry_id" VARCHAR,
    "state_id" VARCHAR UNIQUE,
    "session_id" VARCHAR,
    "host" TEXT,
    "machine" TEXT,
    "boot" TEXT,
    "pidns" TEXT,
    "pid" BIGINT,
    "started" BIGINT,
    "beat" BIGINT NOT NULL DEFAULT 0,
    "lease_s" DOUBLE PRECISION,
    "claimed_at" TEXT,
    "heartbeat_at" TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS "rssd_magic_blob" (
    "digest" TEXT PRIMARY KEY NOT NULL,
    "size" BIGINT NOT NULL,
    "chunks" INTEGER NOT NULL,
    "created_at" TEXT DEFAULT {NOW}
);
CREATE TABLE IF NOT EXISTS "rssd_magic_blob_chunk" (
    "digest" TEXT NOT NULL REFERENCES "rssd_magic_blob" ("digest") ON DELETE CASCADE,
    "n" INTEGER NOT NULL,
    "data" BYTEA NOT NULL,
    PRIMARY KEY ("digest", "n")
);
CREATE TABLE IF NOT EXISTS "rssd_magic_signature" (
    "payload_id" TEXT NOT NULL,
    "key_id" TEXT NOT NULL,
    "signature" TEXT NOT NULL,
    "created_at" TEXT DEFAULT {NOW},
    PRIMARY KEY ("payload_id", "key_id")
);
CREATE TABLE IF NOT EXISTS "rssd_magic_hit" (
    "state_id" VARCHAR PRIMARY KEY NOT NULL,
    "hits" BIGINT NOT NULL,
    "last_hit_at" TEXT
);
"""

OWN_INDEXES_DDL = """
CREATE INDEX IF NOT EXISTS "rssd_magic_entry_src_idx"
    ON "orchestration_session_entry" ("ingest_src" COLLATE "C");
CREATE INDEX IF NOT EXISTS "rssd_magic_state_entry_idx"
    ON "orchestration_session_state" ("session_entry_id");
CREATE INDEX IF NOT EXISTS "rssd_magic_state_seq_entry_idx"
    ON "rssd_magic_state_seq" ("entry_id", "seq");
-- Chunks are read whole and never updated: no compression attempt (the
-- values are mostly incompressible arrays and pickles) and no TOAST rewrite.
ALTER TABLE "rssd_magic_blob_chunk" ALTER COLUMN "data" SET STORAGE EXTERNAL;
"""

# Functions are created schema-qualified and refer to our table qualified,
# so the trigger works whatever search_path the inserting tool has.
FUNCTIONS_DDL = """
CREATE OR REPLACE FUNCTION {schema}."rssd_magic_state_seq_fn"() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO {schema}."rssd_magic_state_seq" ("state_id", "entry_id")
    VALUES (NEW."orchestration_session_state_id", NEW."session_entry_id")
    ON CONFLICT ("state_id") DO NOTHING;
    RETURN NULL;
END
$fn$;
-- A row another tool wrote may hold anything: JSON that is not JSON reads
-- as NULL in the listings instead of failing them.
CREATE OR REPLACE FUNCTION {schema}."rssd_magic_json"(t TEXT) RETURNS json
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $fn$
BEGIN
    RETURN t::json;
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$fn$;
"""
TRIGGER_DDL = """
CREATE TRIGGER "rssd_magic_state_seq" AFTER INSERT ON {schema}."orchestration_session_state"
FOR EACH ROW EXECUTE FUNCTION {schema}."rssd_magic_state_seq_fn"()
"""
#: Rows that existed before our trigger get a seq in their most likely order.
BACKFILL = """
INSERT INTO "rssd_magic_state_seq" ("state_id", "entry_id")
SELECT s."orchestration_session_state_id", s."session_entry_id" FROM "orchestration_session_state" AS s
WHERE NOT EXISTS (SELECT 1 FROM "rssd_magic_state_seq" AS q WHERE q."state_id" = s."orchestration_session_state_id")
ORDER BY s."transitioned_at", s."orchestration_session_state_id"
"""

_TYPES = {
    "VARCHAR": "character varying",
    "TEXT": "text",
    "BIGINT": "bigint",
    "INTEGER": "integer",
    "BYTEA": "bytea",
    "DOUBLE PRECISION": "double precision",
    "TIMESTAMPTZ": "timestamp with time zone",
}
_COLUMN = re.compile(r'^\s+"(\w+)" (DOUBLE PRECISION|[A-Z]+)\b')


def _columns(ddl: str) -> dict[str, list[tuple[str, str]]]:
    """``{table: [(column, type as format_type() writes it)]}`` of a DDL text
    written one column per line (as above)."""
    out: dict[str, list[tuple[str, str]]] = {}
    table = None
    for line in ddl.splitlines():
        if line.startswith("CREATE TABLE"):
            table = line.split('"')[1]
            out[table] = []
        elif table and (m := _COLUMN.match(line)):
            out[table].append((m.group(1), _TYPES[m.group(2)]))
    return out


#: The columns of every table we use, in order; an existing table must have
#: exactly these or it is refused.
EXPECTED_COLUMNS = _columns(SURVEILR_DDL) | _columns(OWN_TABLES_DDL)
OWN_TABLES = [t for t in _columns(OWN_TABLES_DDL)]
INDEXES = ["rssd_magic_entry_src_idx", "rssd_magic_state_entry_idx", "rssd_magic_state_seq_entry_idx"]
FUNCTIONS = ["rssd_magic_state_seq_fn", "rssd_magic_json"]


def statements(script: str) -> list[str]:
    """A DDL script as single statements: split where a line ends with
    ``;`` outside a ``$fn$`` function body; comment lines dropped."""
    out, pending, in_body = [], [], False
    for line in script.splitlines():
        if line.strip().startswith("--") and not in_body:
            continue
        pending.append(line)
        if line.count("$fn$") % 2:
            in_body = not in_body
        if line.rstrip().endswith(";") and not in_body:
            text = "\n".join(pending).strip().rstrip(";")
            if text:
                out.append(text)
            pending = []
    tail = "\n".join(pending).strip().rstrip(";")
    return out + ([tail] if tail else [])


class Layout:
    """What the current schema holds of ours, read from the catalog once."""

    def __init__(self, conn: psycopg.Connection):
        row = conn.execute("SELECT current_schema(), current_setting('search_path')").fetchone()
        self.schema, self.search_path = row
        self.columns: dict[str, list[tuple[str, str]]] = {}
        self.indexes: set[str] = set()
        self.functions: set[str] = set()
        self.trigger = False
        self.version: int | None = None
        if self.schema is None:
            return
        for table, column, type_ in conn.execute(
            """SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod)
               FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
               JOIN pg_attribute AS a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
               WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND c.relname = ANY(%s)
               ORDER BY c.relname, a.attnum""",
            (list(EXPECTED_COLUMNS),),
        ):
            self.columns.setdefault(table, []).append((column, type_))
        self.indexes = {
            name
            for (name,) in conn.execute(
                """SELECT c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
                   WHERE n.nspname = current_schema() AND c.relkind = 'i' AND c.relname = ANY(%s)""",
                (INDEXES,),
            )
        }
        self.functions = {
            name
            for (name,) in conn.execute(
                """SELECT p.proname FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
                   WHERE n.nspname = current_schema() AND p.proname = ANY(%s)""",
                (FUNCTIONS,),
            )
        }
        if "orchestration_session_state" in self.columns:
            self.trigger = bool(
                conn.execute(
                    """SELECT 1 FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
                       JOIN pg_namespace AS n ON n.oid = c.relnamespace
                       WHERE n.nspname = current_schema() AND c.relname = 'orchestration_session_state'
                         AND t.tgname = 'rssd_magic_state_seq'"""
                ).fetchone()
            )
        if "rssd_magic_meta" in self.columns:
            row = conn.execute("SELECT value FROM rssd_magic_meta WHERE key = 'schema_version'").fetchone()
            self.version = int(row[0]) if row and str(row[0]).isdigit() else None

    def problems(self) -> list[str]:
        """Every table of ours that exists with another shape."""
        out = []
        for table, actual in self.columns.items():
            expected = EXPECTED_COLUMNS[table]
            if actual != expected:
                want = ", ".join(f"{n} {t}" for n, t in expected)
                got = ", ".join(f"{n} {t}" for n, t in actual)
                out.append(f"table {self.schema}.{table} has columns ({got}); expected ({want})")
        if self.version is not None and self.version > SCHEMA_VERSION:
            out.append(
                f"its rssd_magic tables are of schema version {self.version}, made by a newer rssd_magic "
                f"(this one knows version {SCHEMA_VERSION}): upgrade rssd_magic"
            )
        return out

    def complete(self) -> bool:
        return (
            set(EXPECTED_COLUMNS) <= set(self.columns)
            and set(INDEXES) <= self.indexes
            and set(FUNCTIONS) <= self.functions
            and self.trigger
            and self.version == SCHEMA_VERSION
        )


def ensure_schema(conn: psycopg.Connection, readonly: bool = False) -> Layout:
    """Check the current schema and create what is missing (ValueError with
    the reason when the schema can't be used; nothing is written then).

    *readonly*: nothing is created on the server; our tables, when missing,
    are stood in for by empty temporary tables, so listings read alike."""
    layout = Layout(conn)
    if layout.schema is None:
        raise ValueError(
            f"no schema to keep the tables in: search_path ({layout.search_path}) names no existing schema"
        )
    problems = layout.problems()
    if problems:
        raise ValueError("incompatible schema: " + "; ".join(problems))
    if readonly:
        if "orchestration_session_state" not in layout.columns:
            raise ValueError(f"not an RSSD store: schema {layout.schema} has no orchestration_session_state table")
        for statement in statements(OWN_TABLES_DDL):
            table = statement.split('"')[1]
            if table not in layout.columns:  # a temp table would shadow a real one
                conn.execute(statement.replace("CREATE TABLE IF NOT EXISTS", "CREATE TEMP TABLE", 1))
        return layout
    if layout.complete():
        return layout
    schema = sql.Identifier(layout.schema).as_string(conn)
    with conn.transaction():
        # Transaction-level: released at COMMIT, so pools can't keep it.
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"rssd_magic.ddl:{layout.schema}",))
        layout = Layout(conn)  # decided again under the lock: another kernel may have done it
        problems = layout.problems()
        if problems:
            raise ValueError("incompatible schema: " + "; ".join(problems))
        if not layout.complete():
            had_trigger = layout.trigger
            for statement in statements(SURVEILR_DDL + OWN_TABLES_DDL + OWN_INDEXES_DDL):
                conn.execute(statement)
            for statement in statements(FUNCTIONS_DDL.replace("{schema}", schema)):
                conn.execute(statement)
            if not had_trigger:
                conn.execute(BACKFILL)
                conn.execute(TRIGGER_DDL.replace("{schema}", schema))
            conn.execute(
                """INSERT INTO rssd_magic_meta (key, value) VALUES ('schema_version', %s)
                   ON CONFLICT (key) DO UPDATE SET value = excluded.value""",
                (str(SCHEMA_VERSION),),
            )
    return Layout(conn)
