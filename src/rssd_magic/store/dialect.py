"""The SQL a store speaks, as far as the code written once above the stores
needs it: the shared rows (rows.py), the journal (journal.py), the reports,
gc and transfer all write one text of each statement, a *template*, and a
store's :class:`Dialect` renders it once.

A template names our tables ``{table}``, takes its parameters as ``?``,
and may say:

* ``{states}`` — transitions ``s`` together with their store order, for a
  FROM clause; ``{seq}`` that order (SQLite's rowid, PostgreSQL's
  ``rssd_magic_state_seq``); ``{entry}`` the entry column to filter them by
  (the one the order's index starts with);
* ``{C}`` — appended to ``ingest_src`` in comparisons: code-point order
  whatever the database's collation;
* ``{now}`` — the store's clock as surveilr's timestamp text;
* ``{silent}`` — seconds since a claim row's last heartbeat by the store's
  one clock (NULL where there is none: a file shared by hosts);
* ``{cross}`` — a join whose left side the planner must keep outside;
* ``{beat}`` — what a heartbeat sets on a claim row (and the store's clock).

What differs beyond text — how a list is passed, how a JSON field is read
from text another tool may have written, which values a column can hold —
are methods.  :class:`Tx` runs rendered statements on a connection.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator


class Dialect:
    """How one store writes the shared statements (see the module)."""

    #: ``sqlite`` or ``postgresql``.
    name = "?"
    #: Rows each sum of the tally is spread over (tally.py): writers that
    #: commit side by side would queue on one.
    tally_shards = 1

    def __init__(self, names: dict[str, str], tokens: dict[str, str]):
        self.names = {**names, **tokens}
        self._rendered: dict[str, str] = {}

    def __call__(self, template: str) -> str:
        """*template* in this store's SQL (rendered once)."""
        try:
            return self._rendered[template]
        except KeyError:
            text = self._rendered[template] = self._render(template)
            return text

    def _render(self, template: str) -> str:
        return template.format_map(self.names)

    def json_text(self, column: str, *path: str) -> str:
        """The text at *path* of the JSON in *column* (NULL where the column
        is not JSON: another tool's row)."""
        raise NotImplementedError

    def json_number(self, column: str, *path: str) -> str:
        """The number at *path* of the JSON in *column*, NULL unless it is one."""
        raise NotImplementedError

    def in_list(self, column: str) -> str:
        """``column`` is one of a list passed as one parameter (:meth:`listed`)."""
        raise NotImplementedError

    def state_at(self, alias: str, seq: str) -> str:
        """What follows ``LEFT JOIN`` to name the transition whose store order
        is *seq* as *alias*."""
        raise NotImplementedError

    def octets(self, expr: str) -> str:
        """The UTF-8 length of a text, in bytes."""
        raise NotImplementedError

    def contains(self, expr: str) -> str:
        """*expr* holds the text given as the next parameter."""
        raise NotImplementedError

    def listed(self, values: Iterable[Any]) -> Any:
        """*values* as the parameter :meth:`in_list` takes."""
        raise NotImplementedError

    def text(self, value: Any) -> Any:
        """A text value as this store can hold it."""
        return value

    def fit(self, table: str, row: dict) -> str | None:
        """Why *row* (from another store) can't be stored in *table* here, or
        None; may convert values in place (a number SQLite kept for text)."""
        return None


class SqliteDialect(Dialect):
    name = "sqlite"

    def __init__(self, tables: Iterable[str]):
        super().__init__(
            {t: f'"{t}"' for t in tables},
            {"states": '"orchestration_session_state" AS s', "seq": "s.rowid", "entry": "s.session_entry_id",
             "C": "", "now": "CURRENT_TIMESTAMP", "silent": "NULL", "cross": "CROSS JOIN",
             "beat": "beat = beat + 1"},
        )  # fmt: skip

    def json_text(self, column: str, *path: str) -> str:
        return f"CASE WHEN json_valid({column}) THEN json_extract({column}, '$.{'.'.join(path)}') END"

    def json_number(self, column: str, *path: str) -> str:
        where = f"'$.{'.'.join(path)}'"
        return (f"CASE WHEN json_valid({column}) AND json_type({column}, {where}) IN ('integer', 'real') "
                f"THEN json_extract({column}, {where}) END")  # fmt: skip

    def in_list(self, column: str) -> str:
        return f"{column} IN (SELECT value FROM json_each(?))"

    def state_at(self, alias: str, seq: str) -> str:
        return f'"orchestration_session_state" AS {alias} ON {alias}.rowid = {seq}'

    def octets(self, expr: str) -> str:
        return f"length(CAST({expr} AS BLOB))"

    def contains(self, expr: str) -> str:
        return f"instr({expr}, ?) > 0"

    def listed(self, values: Iterable[Any]) -> Any:
        return json.dumps(list(values))


class Tx:
    """Rendered statements on one connection, inside a transaction (or one
    consistent read) the store opened.  SQLite's and psycopg's connections
    both execute and return cursors; only ``executemany`` and streaming
    differ."""

    __slots__ = ("conn", "d", "tally")

    def __init__(self, conn: Any, dialect: Dialect, *, deferred: bool = False):
        self.conn = conn
        self.d = dialect
        #: With *deferred*, the tally's sums this transaction adds, written
        #: in one statement at its end (tally.settle).
        self.tally: dict[tuple[int, str], float] | None = {} if deferred else None

    def run(self, template: str, params: Any = ()) -> Any:
        return self.conn.execute(self.d(template), params)

    def one(self, template: str, params: Any = ()) -> tuple | None:
        return self.run(template, params).fetchone()

    def all(self, template: str, params: Any = ()) -> list[tuple]:
        return self.run(template, params).fetchall()

    def many(self, template: str, rows: list) -> None:
        if not rows:
            return
        if hasattr(self.conn, "executemany"):  # sqlite3
            self.conn.executemany(self.d(template), rows)
        else:
            with self.conn.cursor() as cur:
                cur.executemany(self.d(template), rows)

    def stream(self, template: str, params: Any = ()) -> Iterator[tuple]:
        """Rows as they come, never the whole result in memory (psycopg:
        rows in chunks where libpq has chunked mode, else one at a time)."""
        if hasattr(self.conn, "executemany"):
            yield from self.conn.execute(self.d(template), params)
        else:
            with self.conn.cursor() as cur:
                yield from cur.stream(self.d(template), params, size=STREAM_CHUNK if _chunked() else 1)


#: Rows a server sends at a time while streaming (libpq 17's chunked mode).
STREAM_CHUNK = 1000


def _chunked() -> bool:
    from psycopg import pq  # only a PostgreSQL store streams through psycopg

    return pq.version() >= 170000

