"""Running a SQL cell: its statements, the transactions around them, and
what comes back (:class:`SQLResult`, or :class:`SQLExecutionError`).

:func:`run_sql` runs the statements one by one (to know which one returned
the rows to show) inside one transaction, rolled back if any statement
fails (DDL included: both engines roll back ``CREATE``/``DROP``/``ALTER``,
and DuckDB an ``ATTACH``; PostgreSQL rolls back nearly everything).  Two
kinds of cells can't be one transaction:

* a cell with its own ``BEGIN``/``COMMIT``/``ROLLBACK``/``SAVEPOINT``: run
  as written; after a failure whatever transaction it left open is rolled
  back, and a cell that ends inside a transaction it opened is an error
  (rolled back), because a cell recorded as run must have its effects
  committed;
* statements that can't run inside a transaction — SQLite ``VACUUM`` and
  ``PRAGMA journal_mode/synchronous/foreign_keys = …`` (the last is
  silently ignored inside one), DuckDB ``CHECKPOINT`` / ``FORCE
  CHECKPOINT``, PostgreSQL ``VACUUM``, ``CREATE/DROP DATABASE``, ``ALTER
  SYSTEM``, ``… CONCURRENTLY`` — run on their own, in autocommit; the
  statements between them are grouped into transactions, so a failure
  undoes only its group.

Whatever the engine keeps outside transactions is never undone: settings
(DuckDB ``SET``/``USE``/``PRAGMA x=…``, SQLite ``PRAGMA cache_size`` …),
SQLite ``ATTACH``/``DETACH`` and DuckDB ``DETACH``, sequence values
(DuckDB and PostgreSQL ``nextval``), files written by ``COPY … TO`` or ``EXPORT
DATABASE``, installed/loaded extensions.  A target that already has an
open transaction is refused before anything runs: the cell's effects would
be committed (or not) by someone else.
"""

from __future__ import annotations

import sqlite3
import sys
from dataclasses import dataclass
from typing import Any, Mapping

from .key import bind_tokens
from .lexer import SQLUsageError, Statement, first_word, parse_statements, statement_source
from .locks import describe_lock_error
from .target import engine_of


class SQLExecutionError(Exception):
    """A statement failed; carries the engine's own message.

    ``index`` is 0-based; ``rolled_back`` says whether the failing
    statement's transaction was rolled back; ``committed`` lists the
    (0-based) statements whose effects stay (committed before the failure).
    """

    def __init__(
        self,
        message: str,
        *,
        engine: str,
        index: int,
        statement: str,
        total: int,
        rolled_back: bool,
        committed: tuple[int, ...] = (),
        engine_message: str | None = None,
        error_type: str | None = None,
        headline: str | None = None,
    ):
        self.message = message
        self.headline = headline
        self.engine = engine
        self.index = index
        self.statement = statement
        self.total = total
        self.rolled_back = rolled_back
        self.committed = tuple(committed)
        self.engine_message = engine_message if engine_message is not None else message
        self.error_type = error_type
        super().__init__(self.describe())

    def outcome(self) -> str:
        """What the failure left behind, in words."""
        if not self.committed:
            return "rolled back: the cell changed nothing" if self.rolled_back else "nothing was committed"
        plural = "s" if len(self.committed) > 1 else ""
        kept = f"statement{plural} {_ranges(self.committed)} had already been committed"
        return f"rolled back; {kept}" if self.rolled_back else f"not rolled back: {kept}"

    def describe(self) -> str:
        if self.headline:
            return f"{self.headline} ({self.outcome()})"
        where = f"statement {self.index + 1} of {self.total}" if self.total > 1 else "the statement"
        return f"{where} failed ({self.outcome()}):\n{self.message}"

    def as_dict(self) -> dict:
        """JSON-able form, for the RSSD's ``transition_result``."""
        return {
            "engine": self.engine,
            "index": self.index,
            "statement": self.statement,
            "message": self.message,
            "error_type": self.error_type,
            "rolled_back": self.rolled_back,
            "committed": list(self.committed),
            "summary": self.describe(),
        }


def _ranges(indexes: tuple[int, ...]) -> str:
    """``(0, 1, 2, 4)`` → ``"1-3, 5"`` (1-based, as users count statements)."""
    runs: list[list[int]] = []  # [first, last] of each run of consecutive indexes
    for i in sorted(indexes):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a + 1}" if a == b else f"{a + 1}-{b + 1}" for a, b in runs)



_TXN_CONTROL = {"BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT", "RELEASE"}
# Settings that SQLite refuses (or, for foreign_keys, silently ignores) inside
# a transaction.
_SQLITE_OUTSIDE_PRAGMAS = {"JOURNAL_MODE", "SYNCHRONOUS", "FOREIGN_KEYS"}
_READ_FIRST = {"SELECT", "VALUES", "EXPLAIN"}
_WRITE_WORDS = {"INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "DROP", "ALTER"}


#: PostgreSQL statements that refuse to run inside a transaction block.
_PG_OUTSIDE = {("VACUUM",), ("CREATE", "DATABASE"), ("DROP", "DATABASE"), ("CREATE", "TABLESPACE"),
               ("DROP", "TABLESPACE"), ("ALTER", "SYSTEM"), ("REINDEX", "SYSTEM"), ("REINDEX", "DATABASE")}  # fmt: skip


def _outside_transaction(engine: str, toks: Statement) -> bool:
    """Must this statement run on its own, outside any transaction?"""
    words = [t.text.upper() for t in toks[:3] if t.kind == "word"]
    if engine == "postgresql":
        # ... and CREATE INDEX CONCURRENTLY, DROP INDEX CONCURRENTLY, REINDEX … CONCURRENTLY
        head = [t.text.upper() for t in toks[:6] if t.kind == "word"]
        concurrently = head[:1] in (["CREATE"], ["DROP"], ["REINDEX"]) and "CONCURRENTLY" in head
        return tuple(words[:1]) in _PG_OUTSIDE or tuple(words[:2]) in _PG_OUTSIDE or concurrently
    if engine == "duckdb":
        return words[:1] == ["CHECKPOINT"] or words[:2] == ["FORCE", "CHECKPOINT"]
    if words[:1] == ["VACUUM"]:
        return True
    if words[:1] != ["PRAGMA"]:
        return False
    # PRAGMA [schema.]name = value | (value)
    rest = toks[1:]
    if len(rest) > 2 and rest[1].text == ".":
        rest = rest[2:]
    if len(rest) < 2 or rest[0].kind != "word":
        return False
    return rest[0].text.upper() in _SQLITE_OUTSIDE_PRAGMAS and rest[1].text in ("=", "(")


def _is_read(toks: Statement) -> bool:
    word = first_word(toks)
    if word == "WITH":
        return not any(t.kind == "word" and t.text.upper() in _WRITE_WORDS for t in toks)
    return word in _READ_FIRST


@dataclass(frozen=True)
class StatementOutcome:
    """How one statement went: ``kind`` is ``rows`` (it returned a table),
    ``changes`` (``rowcount`` rows inserted/updated/deleted) or ``status``."""

    index: int
    sql: str
    kind: str
    rowcount: int | None = None


@dataclass
class SQLResult:
    """What :func:`run_sql` did; ``frame`` is the last table returned."""

    frame: Any  # pandas.DataFrame | None
    frame_index: int | None
    statements: list[StatementOutcome]
    mode: str  # "transaction", "split" or "as-written"
    engine: str

    @property
    def rows_changed(self) -> int:
        return sum(s.rowcount or 0 for s in self.statements if s.kind == "changes")

    def summary(self) -> str:
        """One line: ``3 statements, 2 rows changed; result: 5 rows × 2 columns``."""
        n = len(self.statements)
        parts = [f"{n} statement{'s' if n != 1 else ''}"]
        if any(s.kind == "changes" for s in self.statements):
            parts.append(f"{self.rows_changed} row{'s' if self.rows_changed != 1 else ''} changed")
        text = ", ".join(parts)
        if self.frame is not None:
            r, c = self.frame.shape
            text += f"; result: {r} row{'s' if r != 1 else ''} × {c} column{'s' if c != 1 else ''}"
        return text

    def as_dict(self) -> dict:
        """JSON-able form (without the frame), for ``transition_result``."""
        return {
            "engine": self.engine,
            "mode": self.mode,
            "frame_index": self.frame_index,
            "rows_changed": self.rows_changed,
            "statements": [
                {"index": s.index, "kind": s.kind, "rowcount": s.rowcount} for s in self.statements
            ],
        }


def _is_engine_error(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        return True
    duckdb = sys.modules.get("duckdb")
    if duckdb is not None and isinstance(exc, duckdb.Error):
        return True
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and isinstance(exc, psycopg.Error)


class _Runner:
    """Engine-specific steps; the control flow lives in :func:`run_sql`."""

    engine = ""

    def __init__(self, conn: Any):
        self.conn = conn

    def execute(self, sql: str, params: dict) -> tuple[str, Any, int | None]:
        raise NotImplementedError

    def in_transaction(self) -> bool:
        raise NotImplementedError

    def begin(self, read_only: bool) -> None:
        self.conn.execute("BEGIN TRANSACTION")

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> bool:
        """Roll back whatever transaction is open; True if one was."""
        try:
            self.conn.execute("ROLLBACK")
            return True
        except Exception as exc:  # noqa: BLE001 - "no transaction is active"
            if _is_engine_error(exc):
                return False
            raise

    def close(self) -> None:
        pass


class _SQLiteRunner(_Runner):
    engine = "sqlite"

    def __init__(self, conn: sqlite3.Connection):
        super().__init__(conn)
        if getattr(conn, "autocommit", None) is False:
            # Python 3.12+ PEP 249 mode: a transaction is always open, so the
            # cell's effects could not be committed apart from the user's.
            raise SQLUsageError(
                "the sqlite3 connection has autocommit=False (a transaction is always open); "
                "use autocommit=True or the default isolation_level for SQL cells"
            )
        if conn.in_transaction:
            raise SQLUsageError(
                "the SQLite connection has an open transaction: commit or roll it back first "
                "(a cell recorded as run must have its effects committed)"
            )
        # Python's sqlite3 would open and commit transactions behind our back
        # (implicit BEGIN before DML); with None it leaves them to us.
        self._saved = conn.isolation_level
        conn.isolation_level = None

    def close(self) -> None:
        self.conn.isolation_level = self._saved

    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def begin(self, read_only: bool) -> None:
        # IMMEDIATE takes the write lock up front, where the busy timeout
        # applies; a deferred transaction that reads then writes can fail
        # with "database is locked" without waiting.
        self.conn.execute("BEGIN" if read_only else "BEGIN IMMEDIATE")

    def rollback(self) -> bool:
        if not self.conn.in_transaction:
            return False
        self.conn.execute("ROLLBACK")
        return True

    def execute(self, sql: str, params: dict) -> tuple[str, Any, int | None]:
        cur = self.conn.execute(sql, params) if params else self.conn.execute(sql)
        try:
            if cur.description is None:
                if cur.rowcount >= 0:
                    return "changes", None, cur.rowcount
                return "status", None, None
            names = [d[0] for d in cur.description]
            rows = cur.fetchall()
            return "rows", _sqlite_frame(names, rows), len(rows)
        finally:
            cur.close()


class _DuckDBRunner(_Runner):
    engine = "duckdb"

    def __init__(self, conn: Any):
        super().__init__(conn)
        if self.in_transaction():
            raise SQLUsageError(
                "the DuckDB connection has an open transaction: commit or roll it back first "
                "(a cell recorded as run must have its effects committed)"
            )

    def in_transaction(self) -> bool:
        # DuckDB has no "in transaction" flag; BEGIN tells, and is undone.
        try:
            self.conn.execute("BEGIN TRANSACTION")
        except Exception as exc:  # noqa: BLE001
            if _is_engine_error(exc) and "within a transaction" in str(exc):
                return True
            raise
        self.conn.execute("ROLLBACK")
        return False

    def execute(self, sql: str, params: dict) -> tuple[str, Any, int | None]:
        import duckdb

        conn = self.conn
        conn.execute(sql, params or None)
        desc = conn.description or []
        names = [d[0] for d in desc]
        st = duckdb.extract_statements(sql)
        expected = {t.name for t in st[0].expected_result_type} if st else {"QUERY_RESULT"}
        stype = st[0].type.name if st else ""
        if not desc or expected == {"NOTHING"}:
            conn.fetchall()
            return "status", None, None
        if "CHANGED_ROWS" in expected and names == ["Count"]:
            rows = conn.fetchall()
            return ("changes", None, int(rows[0][0])) if rows else ("status", None, None)
        if stype == "CALL" and names == ["Success"]:  # CHECKPOINT and friends
            conn.fetchall()
            return "status", None, None
        frame = conn.df()
        return "rows", frame, len(frame)


class _PostgresRunner(_Runner):
    """A psycopg connection, switched to autocommit while the cell runs so
    that BEGIN/COMMIT are ours (psycopg would otherwise open a transaction
    of its own before the first statement); restored afterwards."""

    engine = "postgresql"

    def __init__(self, conn: Any):
        super().__init__(conn)
        if conn.closed or conn.broken:
            raise SQLUsageError("the PostgreSQL connection can't be used: it is closed")
        if self.in_transaction():
            raise SQLUsageError(
                "the PostgreSQL connection has an open transaction: commit or roll it back first "
                "(a cell recorded as run must have its effects committed)"
            )
        self._saved = conn.autocommit
        conn.autocommit = True

    def close(self) -> None:
        if not self.conn.closed and not self.in_transaction():
            self.conn.autocommit = self._saved

    def in_transaction(self) -> bool:
        return self.conn.info.transaction_status != 0  # psycopg.pq.TransactionStatus.IDLE

    def begin(self, read_only: bool) -> None:
        # Never READ ONLY: a SELECT may call nextval() or a function that writes.
        self.conn.execute("BEGIN")

    def rollback(self) -> bool:
        if self.conn.closed or not self.in_transaction():
            return False
        self.conn.execute("ROLLBACK")
        return True

    def execute(self, sql: str, params: dict) -> tuple[str, Any, int | None]:
        with self.conn.cursor() as cur:
            # Parameters were written %(name)s by bind_tokens(style="pyformat");
            # without any, the text goes as it is (no % processing).
            cur.execute(sql, params or None)
            if cur.description is None:
                if cur.rowcount >= 0:
                    return "changes", None, cur.rowcount
                return "status", None, None
            names = [d.name for d in cur.description]
            rows = cur.fetchall()
            return "rows", _sqlite_frame(names, rows), len(rows)


def _sqlite_frame(names: list[str], rows: list[tuple]) -> Any:
    """A DataFrame from SQLite rows: integer columns with NULLs become
    nullable ``Int64`` (pandas would make them float and lose big values)."""
    import pandas as pd

    columns = list(zip(*rows)) if rows else [() for _ in names]
    data: dict[int, Any] = {}
    for i, values in enumerate(columns):
        kinds = {type(v) for v in values if v is not None}
        if kinds == {int} and None in values:
            data[i] = pd.array(values, dtype="Int64")
        elif not values:
            data[i] = pd.Series([], dtype=object)
        else:
            data[i] = pd.Series(values)
    frame = pd.DataFrame(data, index=pd.RangeIndex(len(rows)))
    frame.columns = pd.Index(names)
    return frame


_RUNNERS: dict[str, type[_Runner]] = {"sqlite": _SQLiteRunner, "duckdb": _DuckDBRunner, "postgresql": _PostgresRunner}


def run_sql(conn: Any, sql: str, params: Mapping[str, Any] | None = None) -> SQLResult:
    """Run every statement of *sql* on *conn*; see the module docstring for
    how they are grouped into transactions.

    *params* maps names to values (the second item of :func:`bind`, or any
    namespace: each statement takes only the names it uses).  Parameters
    and the target are checked before anything runs (:class:`SQLUsageError`);
    a failing statement raises :class:`SQLExecutionError` after the rollback.
    """
    statements = parse_statements(sql)
    if not statements:
        raise SQLUsageError("the cell has no SQL statements")
    engine = engine_of(conn)
    texts = [statement_source(sql, toks) for toks in statements]
    style = "pyformat" if engine == "postgresql" else "dollar"
    bound = [bind_tokens(sql, toks, params or {}, toks[0].start, toks[-1].end, style) for toks in statements]
    if engine == "duckdb":
        for _, p in bound:
            _check_duckdb_names(p)
    mode, groups = _plan(engine, statements)
    as_written = mode == "as-written"

    runner = _RUNNERS[engine](conn)
    outcomes: list[StatementOutcome] = []
    frame, frame_index = None, None
    committed: list[int] = []
    pending: list[int] = []  # done, in a transaction not yet committed
    current = -1
    is_open = False  # as-written cells: inside a transaction they opened
    try:
        for transactional, indexes in groups:
            if transactional:
                runner.begin(read_only=all(_is_read(statements[i]) for i in indexes))
            for i in indexes:
                current = i
                kind, result, rowcount = runner.execute(*bound[i])
                outcomes.append(StatementOutcome(i, texts[i], kind, rowcount))
                if kind == "rows":
                    frame, frame_index = result, i
                pending.append(i)
                if not transactional:
                    is_open = _open_after(runner, statements[i], is_open)
                    if not is_open:
                        committed.extend(pending)
                        pending.clear()
            if transactional:
                current = indexes[-1]
                runner.commit()
                committed.extend(pending)
                pending.clear()
        current = len(statements) - 1
        if as_written and runner.in_transaction():
            rolled_back = runner.rollback()
            message = "the cell ended inside a transaction it opened (BEGIN without COMMIT)"
            raise SQLExecutionError(
                message,
                headline=message,
                engine=engine,
                index=current,
                statement=texts[current],
                total=len(statements),
                rolled_back=rolled_back,
                committed=tuple(committed),
            )
    except (SQLExecutionError, SQLUsageError):
        raise
    except BaseException as exc:
        try:
            rolled_back = runner.rollback()
        except Exception:  # noqa: BLE001 - the original error matters more
            rolled_back = False
        if not _is_engine_error(exc):
            raise
        raw = str(exc)
        raise SQLExecutionError(
            describe_lock_error(exc) or raw,
            engine=engine,
            index=current,
            statement=texts[current] if current >= 0 else "",
            total=len(statements),
            rolled_back=rolled_back,
            committed=tuple(committed),
            engine_message=raw,
            error_type=f"{type(exc).__module__.lstrip('_')}.{type(exc).__name__}",
        ) from None
    finally:
        runner.close()
    return SQLResult(frame, frame_index, outcomes, mode, engine)


def _check_duckdb_names(params: Mapping[str, Any]) -> None:
    """Refuse names DuckDB would take for one parameter (it ignores case)."""
    lowered: dict[str, str] = {}
    for name in params:
        other = lowered.setdefault(name.lower(), name)
        if other != name:
            raise SQLUsageError(
                f"DuckDB parameter names ignore case: ${other} and ${name} would be the same parameter"
            )


def _plan(engine: str, statements: tuple[Statement, ...]) -> tuple[str, list[tuple[bool, list[int]]]]:
    """``(mode, groups)``: how :func:`run_sql` runs the statements.

    Each group is ``(transactional, statement indexes)``: one transaction,
    or statements run one by one without one of ours (as written, or alone
    because they can't run inside a transaction).
    """
    as_written = any(first_word(toks) in _TXN_CONTROL for toks in statements)
    alone = [as_written or _outside_transaction(engine, toks) for toks in statements]
    groups: list[tuple[bool, list[int]]] = []
    for i, by_itself in enumerate(alone):
        if by_itself:
            groups.append((False, [i]))
        elif groups and groups[-1][0]:
            groups[-1][1].append(i)
        else:
            groups.append((True, [i]))
    mode = "as-written" if as_written else ("split" if any(alone) else "transaction")
    return mode, groups


def _open_after(runner: _Runner, toks: Statement, was_open: bool) -> bool:
    """After an as-written statement: is a transaction open now?"""
    if runner.engine in ("sqlite", "postgresql"):
        return runner.in_transaction()
    # DuckDB has no flag and probing costs a BEGIN per statement; the
    # keywords tell (DuckDB has no savepoints).
    word = first_word(toks)
    if word in ("BEGIN", "START"):
        return True
    if word in ("COMMIT", "END", "ROLLBACK", "ABORT"):
        return False
    return was_open
