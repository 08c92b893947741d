"""The tables on a PostgreSQL server: surveilr's, as an RSSD has them, and ours.

Everything lives in one schema, chosen when the store is opened: the first
existing one on the connection's ``search_path`` (a URL's ``options=-c
search_path=…``, or the role's default — which is how a schema is chosen
behind PgBouncer, which drops ``options``), so a team can give each
project a schema of its own.  Every statement names our objects
schema-qualified (postgres_conn.Sql), so that choice holds for the life of
the store whatever search_path a later connection has.

Tables are only created when missing, inside one transaction under a
transaction-level advisory lock (two kernels opening a fresh database at
once would otherwise race in ``CREATE TABLE IF NOT EXISTS``).  What is
there is checked before anything is written, and refused with one line:

* a table of ours with other columns;
* one of our names taken by something that is not a plain table (a view,
  a foreign table, a sequence …: writes would go wherever it points);
* a trigger or rule on one of our ``rssd_magic_*`` tables (ours have none:
  someone else's would run with every claim).

Our objects are versioned in ``rssd_magic_meta``; a store made by a newer
version is opened read-only (:attr:`Layout.read_only`): replays of what this
version can read go on, nothing is written.

How surveilr's SQLite columns map, so rows round-trip byte-identical between
an RSSD file and the server (store/transfer.py):

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

import json
import re

import psycopg
from psycopg import sql

from ..store import tally
from ..store.dialect import Dialect, Tx
from ..store.schema import SET_VERSION, VERSION, columns_differ, newer, statements, version_of
from .sqlite_schema import SURVEILR_DDL as RSSD_DDL
from .postgres_conn import NOW, SEARCH_PATH, Sql, quote

#: Version of our own objects on PostgreSQL.  1: the first layout.  2: the
#: tally and refs ``stats`` and ``gc --dry-run`` read (store/tally.py), kept
#: by every writer of this version — which is why an older one may no
#: longer write.
SCHEMA_VERSION = 2

#: SQLite's declared types that PostgreSQL spells otherwise (timestamps stay
#: surveilr's text; SQLite integers are 64-bit).
_PG_TYPES = {"INTEGER": "BIGINT", "TIMESTAMPTZ": "TEXT"}


def _from_rssd(ddl: str) -> str:
    """surveilr's SQLite DDL (orchestration.sql) as a template
    (postgres_conn.Sql) of the same tables here: ``{name}`` for our
    objects, ``{now}`` the server's clock as SQLite's CURRENT_TIMESTAMP
    text, ``json_valid`` checks as a ``::json`` cast, types as above; one
    column per line, comments dropped."""
    out = []
    for line in ddl.splitlines():
        line = line.split("--", 1)[0].rstrip()
        if not line.strip():
            continue
        line = re.sub(r'^CREATE TABLE IF NOT EXISTS "(\w+)"', r"CREATE TABLE IF NOT EXISTS {\1}", line)
        line = re.sub(r'REFERENCES "(\w+)"\(', r"REFERENCES {\1} (", line)
        line = re.sub(r"CHECK\(json_valid\((\w+)\) OR \1 IS NULL\)", r'CHECK ("\1" IS NULL OR "\1"::json IS NOT NULL)', line)
        line = re.sub(r"CHECK\(json_valid\((\w+)\)\)", r'CHECK ("\1"::json IS NOT NULL)', line)
        line = re.sub(r'^(\s+"\w+" )([A-Z]+)', lambda m: m.group(1) + _PG_TYPES.get(m.group(2), m.group(2)), line)
        out.append(line.replace("DEFAULT CURRENT_TIMESTAMP", "DEFAULT {now}").replace("KEY(", "KEY (").replace("UNIQUE(", "UNIQUE ("))
    return "\n".join(out) + "\n"


#: surveilr's tables, as an RSSD has them.
SURVEILR_DDL = _from_rssd(RSSD_DDL)

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
OWN_TABLES_DDL = """
CREATE TABLE IF NOT EXISTS {rssd_magic_meta} (
    "key" TEXT PRIMARY KEY NOT NULL,
    "value" TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS {rssd_magic_state_seq} (
    "seq" BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    "state_id" VARCHAR NOT NULL UNIQUE,
    "entry_id" VARCHAR
);
CREATE TABLE IF NOT EXISTS {rssd_magic_claim} (
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
CREATE TABLE IF NOT EXISTS {rssd_magic_blob} (
    "digest" TEXT PRIMARY KEY NOT NULL,
    "size" BIGINT NOT NULL,
    "chunks" INTEGER NOT NULL,
    "created_at" TEXT DEFAULT {now}
);
CREATE TABLE IF NOT EXISTS {rssd_magic_blob_chunk} (
    "digest" TEXT NOT NULL REFERENCES {rssd_magic_blob} ("digest") ON DELETE CASCADE,
    "n" INTEGER NOT NULL,
    "data" BYTEA NOT NULL,
    PRIMARY KEY ("digest", "n")
);
CREATE TABLE IF NOT EXISTS {rssd_magic_signature} (
    "payload_id" TEXT NOT NULL,
    "key_id" TEXT NOT NULL,
    "signature" TEXT NOT NULL,
    "created_at" TEXT DEFAULT {now},
    PRIMARY KEY ("payload_id", "key_id")
);
CREATE TABLE IF NOT EXISTS {rssd_magic_hit} (
    "state_id" VARCHAR PRIMARY KEY NOT NULL,
    "hits" BIGINT NOT NULL,
    "last_hit_at" TEXT
);
CREATE TABLE IF NOT EXISTS {rssd_magic_tally} (
    "shard" INTEGER NOT NULL,
    "name" TEXT NOT NULL,
    "value" DOUBLE PRECISION NOT NULL,
    PRIMARY KEY ("shard", "name")
);
CREATE TABLE IF NOT EXISTS {rssd_magic_ref} (
    "entry_id" VARCHAR NOT NULL,
    "digest" TEXT NOT NULL,
    PRIMARY KEY ("digest", "entry_id")
);
"""

OWN_INDEXES_DDL = """
CREATE INDEX IF NOT EXISTS "rssd_magic_entry_src_idx"
    ON {orchestration_session_entry} ("ingest_src" COLLATE "C");
CREATE INDEX IF NOT EXISTS "rssd_magic_state_entry_idx"
    ON {orchestration_session_state} ("session_entry_id");
CREATE INDEX IF NOT EXISTS "rssd_magic_state_seq_entry_idx"
    ON {rssd_magic_state_seq} ("entry_id", "seq");
CREATE INDEX IF NOT EXISTS "rssd_magic_ref_entry_idx"
    ON {rssd_magic_ref} ("entry_id");
-- Chunks are read whole and never updated: no compression attempt (the
-- values are mostly incompressible arrays and pickles) and no TOAST rewrite.
ALTER TABLE {rssd_magic_blob_chunk} ALTER COLUMN "data" SET STORAGE EXTERNAL;
"""

# Our functions: (signature and attributes, body).  The body refers to our
# table qualified and the function pins its search_path, so it works (and
# can't be redirected) whatever search_path the inserting tool has.  The
# body is passed as a quoted literal, never spliced between dollar quotes:
# a schema name can hold anything, "$fn$" included.
FUNCTIONS = {
    "rssd_magic_state_seq_fn": (
        "() RETURNS trigger LANGUAGE plpgsql",
        """
BEGIN
    INSERT INTO {rssd_magic_state_seq} ("state_id", "entry_id")
    VALUES (NEW."orchestration_session_state_id", NEW."session_entry_id")
    ON CONFLICT ("state_id") DO NOTHING;
    RETURN NULL;
END""",
    ),
    # A row another tool wrote may hold anything: JSON that is not JSON reads
    # as NULL in the listings instead of failing them.
    "rssd_magic_json": (
        "(t TEXT) RETURNS json LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL RESTRICTED",
        """
BEGIN
    RETURN t::json;
EXCEPTION WHEN others THEN
    RETURN NULL;
END""",
    ),
    # A cell's latest transition (rows.LATEST), for the replay's one
    # read.  Without prepared statements (poolers) the query was planned on
    # every replay, three times its run time; PL/pgSQL keeps its plan in the
    # server session, where no pooler can lose it (a missing plan is made
    # again).  A store without this function is read with LATEST itself.
    "rssd_magic_latest": (
        """(src TEXT) RETURNS TABLE (state_id VARCHAR, entry_id VARCHAR, session_id VARCHAR, from_state TEXT,
    to_state TEXT, transition_result TEXT, transition_reason TEXT, transitioned_at TEXT, seq BIGINT)
LANGUAGE plpgsql STABLE""",
        """
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT s.orchestration_session_state_id, s.session_entry_id, s.session_id, s.from_state, s.to_state,
           s.transition_result, s.transition_reason, s.transitioned_at, q.seq
    FROM {rssd_magic_state_seq} AS q
    JOIN {orchestration_session_state} AS s ON s.orchestration_session_state_id = q.state_id
    WHERE q.entry_id IN (SELECT e.orchestration_session_entry_id FROM {orchestration_session_entry} AS e
                         WHERE e.ingest_src COLLATE "C" = src)
    ORDER BY q.seq DESC LIMIT 1;
END""",
    ),
}
TRIGGER_DDL = """CREATE TRIGGER "rssd_magic_state_seq" AFTER INSERT ON {orchestration_session_state}
FOR EACH ROW EXECUTE FUNCTION {rssd_magic_state_seq_fn}()"""
#: Rows that existed before our trigger get a seq in their most likely order.
BACKFILL = """
INSERT INTO {rssd_magic_state_seq} ("state_id", "entry_id")
SELECT s."orchestration_session_state_id", s."session_entry_id" FROM {orchestration_session_state} AS s
WHERE NOT EXISTS (SELECT 1 FROM {rssd_magic_state_seq} AS q WHERE q."state_id" = s."orchestration_session_state_id")
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
_TABLE = re.compile(r"^CREATE TABLE IF NOT EXISTS \{(\w+)\}")
_COLUMN = re.compile(r'^\s+"(\w+)" (DOUBLE PRECISION|[A-Z]+)\b')
_KINDS = {"v": "a view", "m": "a materialized view", "f": "a foreign table", "S": "a sequence", "i": "an index",
          "I": "an index", "c": "a composite type", "t": "a TOAST table"}  # fmt: skip


def _columns(ddl: str) -> tuple[dict[str, list[tuple[str, str]]], set[tuple[str, str]]]:
    """``{table: [(column, type as format_type() writes it)]}`` of a DDL text
    written one column per line (as above), and the ``(table, column)``
    pairs it checks as JSON."""
    out: dict[str, list[tuple[str, str]]] = {}
    checked, table = set(), None
    for line in ddl.splitlines():
        if m := _TABLE.match(line):
            table = m.group(1)
            out[table] = []
        elif table and (m := _COLUMN.match(line)):
            out[table].append((m.group(1), _TYPES[m.group(2)]))
            if "::json" in line:
                checked.add((table, m.group(1)))
    return out, checked


#: The columns of every table we use, in order; an existing table must have
#: exactly these or it is refused.
(SURVEILR_COLUMNS, JSON), (OWN_COLUMNS, _) = _columns(SURVEILR_DDL), _columns(OWN_TABLES_DDL)
EXPECTED_COLUMNS = SURVEILR_COLUMNS | OWN_COLUMNS
INDEXES = ["rssd_magic_entry_src_idx", "rssd_magic_state_entry_idx", "rssd_magic_state_seq_entry_idx",
           "rssd_magic_ref_entry_idx"]
#: Every name a template may use (postgres_conn.Sql).
OBJECTS = [*EXPECTED_COLUMNS, *FUNCTIONS]


#: Columns that hold integers (JSON: surveilr's columns with a ``::json`` check).
INTEGER = {(t, c) for t, cols in EXPECTED_COLUMNS.items() for c, ty in cols if ty == "bigint"}


class PgDialect(Dialect):
    """The shared statements (dialect.py) in this store's SQL: our objects
    schema-qualified, ``%s`` parameters, the order from ``rssd_magic_state_seq``."""

    name = "postgresql"
    tally_shards = 16

    def __init__(self, q: Sql):
        states = q("({rssd_magic_state_seq} AS q JOIN {orchestration_session_state} AS s "
                   "ON s.orchestration_session_state_id = q.state_id)")  # fmt: skip
        super().__init__(q.names, {"states": states, "seq": "q.seq", "entry": "q.entry_id", "C": ' COLLATE "C"',
                                   "now": NOW, "silent": "extract(epoch FROM clock_timestamp() - heartbeat_at)::float8",
                                   "cross": "JOIN",
                                   "beat": "beat = beat + 1, heartbeat_at = clock_timestamp()"})  # fmt: skip

    def _render(self, template: str) -> str:
        # Placeholders first: our names may hold "?" or "%" (doubled by quote()).
        return template.replace("%", "%%").replace("?", "%s").format_map(self.names)

    def _path(self, column: str, path: tuple[str, ...], last: str) -> str:
        steps = "".join(f" -> '{p}'" for p in path[:-1])
        return f"{{rssd_magic_json}}({column}){steps} {last} '{path[-1]}'"

    def json_text(self, column: str, *path: str) -> str:
        return self._path(column, path, "->>")

    def json_number(self, column: str, *path: str) -> str:
        return (f"CASE WHEN json_typeof({self._path(column, path, '->')}) = 'number' "
                f"THEN ({self._path(column, path, '->>')})::float8 END")  # fmt: skip

    def in_list(self, column: str) -> str:
        return f"{column} = ANY(?)"

    def listed(self, values):
        return list(values)

    def state_at(self, alias: str, seq: str) -> str:
        return (f"({{rssd_magic_state_seq}} AS {alias}_q JOIN {{orchestration_session_state}} AS {alias} "
                f"ON {alias}.orchestration_session_state_id = {alias}_q.state_id) ON {alias}_q.seq = {seq}")  # fmt: skip

    def octets(self, expr: str) -> str:
        return f"octet_length({expr})"

    def contains(self, expr: str) -> str:
        return f"strpos({expr}, ?) > 0"

    def text(self, value):
        """PostgreSQL text can't hold NUL: it is stored as U+FFFD (JSON
        columns never have one, ``dumps`` escapes it)."""
        return value.replace("\x00", "\ufffd") if isinstance(value, str) and "\x00" in value else value

    def fit(self, table: str, row: dict) -> str | None:
        for column, value in row.items():
            if value is None:
                continue
            if (table, column) in INTEGER:
                if isinstance(value, str) and value.lstrip("-").isdigit():
                    row[column] = int(value)
                elif not isinstance(value, int):
                    return f"{column} is not an integer"
                continue
            if isinstance(value, (int, float)):
                row[column] = value = str(value)  # SQLite's NUMERIC affinity turned text into a number
            elif isinstance(value, bytes):
                try:
                    row[column] = value = value.decode("utf-8")
                except UnicodeDecodeError:
                    return f"{column} holds bytes that are not UTF-8 text"
            if "\x00" in value:
                return f"{column} holds a NUL character, which PostgreSQL text can't"
            if (table, column) in JSON:
                try:
                    json.loads(value, parse_constant=_no_constant)
                except (ValueError, RecursionError):
                    return f"{column} is not valid JSON"
        return None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def stand_in(table: str) -> str:
    """An empty subquery with *table*'s columns: what a read-only store
    reads where one of our tables is missing (a temporary table would be
    session state, which a pooler does not keep)."""
    cols = ", ".join(f"NULL::{t} AS {quote(c)}" for c, t in EXPECTED_COLUMNS[table])
    return f"(SELECT {cols} WHERE false)"


class Layout:
    """What the chosen schema holds of ours, read from the catalog once
    (inside a transaction of :meth:`Sql.tx`: nothing resolves through the
    caller's search_path)."""

    def __init__(self, conn: psycopg.Connection, schema: str, search_path: str, q: Sql):
        self.schema, self.search_path = schema, search_path
        self.columns: dict[str, list[tuple[str, str]]] = {}
        self.others: list[str] = []  # our names taken by what we can't use
        for table, kind, column, type_ in conn.execute(
            """SELECT c.relname, c.relkind, a.attname, format_type(a.atttypid, a.atttypmod)
               FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
               LEFT JOIN pg_attribute AS a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                                          AND c.relkind IN ('r', 'p')
               WHERE n.nspname = %s AND c.relname = ANY(%s)
               ORDER BY c.relname, a.attnum""",
            (schema, list(EXPECTED_COLUMNS)),
        ):
            if kind in ("r", "p"):
                self.columns.setdefault(table, []).append((column, type_))
            else:
                self.others.append(f"{schema}.{table} is {_KINDS.get(kind, 'not a table')}, not a table")
        own = [t for t in OWN_COLUMNS if t in self.columns]
        for table, what, name in conn.execute(
            """SELECT c.relname, 'trigger', t.tgname FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
               JOIN pg_namespace AS n ON n.oid = c.relnamespace
               WHERE n.nspname = %s AND c.relname = ANY(%s) AND NOT t.tgisinternal
               UNION ALL
               SELECT c.relname, 'rule', r.rulename FROM pg_rewrite AS r JOIN pg_class AS c ON c.oid = r.ev_class
               JOIN pg_namespace AS n ON n.oid = c.relnamespace
               WHERE n.nspname = %s AND c.relname = ANY(%s)""",
            (schema, own, schema, own),
        ):
            self.others.append(f"table {schema}.{table} has a {what} ({name}) that is not ours")
        self.indexes = {
            name
            for (name,) in conn.execute(
                """SELECT c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
                   WHERE n.nspname = %s AND c.relkind = 'i' AND c.relname = ANY(%s)""",
                (schema, INDEXES),
            )
        }
        self.functions = {
            name
            for (name,) in conn.execute(
                """SELECT p.proname FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
                   WHERE n.nspname = %s AND p.proname = ANY(%s)""",
                (schema, list(FUNCTIONS)),
            )
        }
        self.trigger = "orchestration_session_state" in self.columns and bool(
            conn.execute(
                """SELECT 1 FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
                   JOIN pg_namespace AS n ON n.oid = c.relnamespace
                   WHERE n.nspname = %s AND c.relname = 'orchestration_session_state'
                     AND t.tgname = 'rssd_magic_state_seq'""",
                (schema,),
            ).fetchone()
        )
        self.version: int | None = None
        if "rssd_magic_meta" in self.columns and not self.others:
            self.version = version_of(conn.execute(q(VERSION), ()).fetchone())

    @property
    def newer(self) -> bool:
        return self.version is not None and self.version > SCHEMA_VERSION

    @property
    def read_only(self) -> str | None:
        """Why this version must not write here (None: it may)."""
        return newer(self.version, SCHEMA_VERSION)

    def problems(self) -> list[str]:
        """Every reason the schema can't be used: names taken by what is not
        a table of ours, tables of ours with another shape (a newer version
        may have added columns)."""
        out = list(self.others)
        for table, actual in self.columns.items():
            expected = EXPECTED_COLUMNS[table]
            if actual != expected and not (self.newer and set(expected) <= set(actual)):
                out.append(columns_differ(f"{self.schema}.{table}", actual, expected))
        return out

    def complete(self) -> bool:
        return (
            set(EXPECTED_COLUMNS) <= set(self.columns)
            and set(INDEXES) <= self.indexes
            and set(FUNCTIONS) <= self.functions
            and self.trigger
            and self.version == SCHEMA_VERSION
        )


def _checked(conn: psycopg.Connection, schema: str, search_path: str, q: Sql) -> Layout:
    layout = Layout(conn, schema, search_path, q)
    problems = layout.problems()
    if problems:
        raise ValueError("incompatible schema: " + "; ".join(problems))
    return layout


def ensure_schema(conn: psycopg.Connection, *, readonly: bool = False, timeout_s: float = 30.0) -> tuple[Layout, Sql]:
    """Choose the schema, check it and create what is missing (ValueError
    with the reason when it can't be used; nothing is written then).
    Returns the layout and the store's statements.

    *readonly* (or a store of a newer version): nothing is created; our
    tables, when missing, are read as empty (:func:`stand_in`)."""
    schema, search_path = conn.execute(
        "SELECT pg_catalog.current_schema(), pg_catalog.current_setting('search_path')"  # the caller's path, on purpose
    ).fetchone()
    if schema is None:
        raise ValueError(f"no schema to keep the tables in: search_path ({search_path}) names no existing schema")
    q = Sql(schema, OBJECTS, timeout_s)
    with q.tx(conn):
        layout = _checked(conn, schema, search_path, q)
    if readonly or layout.newer:
        if "orchestration_session_state" not in layout.columns:
            raise ValueError(f"not an RSSD store: schema {schema} has no orchestration_session_state table")
        missing = {t: stand_in(t) for t in OWN_COLUMNS if t not in layout.columns}
        return layout, (Sql(schema, OBJECTS, timeout_s, missing) if missing else q)
    if layout.complete():
        return layout, q
    with q.tx(conn):
        # Transaction-level: released at COMMIT, so pools can't keep it.
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"rssd_magic.ddl:{schema}",))
        layout = _checked(conn, schema, search_path, q)  # again under the lock: another kernel may have done it
        if not layout.complete():
            for statement in statements(SURVEILR_DDL + OWN_TABLES_DDL + OWN_INDEXES_DDL):
                conn.execute(q(statement), ())
            for name, (signature, body) in FUNCTIONS.items():
                conn.execute(
                    f"CREATE OR REPLACE FUNCTION {q('{' + name + '}')}{signature} SET search_path = {SEARCH_PATH} "
                    f"AS {sql.Literal(q(body)).as_string(conn)}",
                    (),
                )
            if not layout.trigger:
                conn.execute(q(BACKFILL), ())
                conn.execute(q(TRIGGER_DDL), ())
            tx = Tx(conn, PgDialect(q))
            if tally.read(tx) is None:
                tally.rebuild(tx)  # a new schema's zeros, or what an older version wrote, counted once
            conn.execute(PgDialect(q)(SET_VERSION), (str(SCHEMA_VERSION),))
        layout = Layout(conn, schema, search_path, q)
    return layout, q
