"""Moving ``%%stateful`` records between a PostgreSQL store and RSSD files.

``export``: the cells of a schema (or of one scope) into an RSSD file —
surveilr's DDL (through :class:`SqliteBackend`), their device, nature,
session, entry, state and exec rows, the blobs their EXECUTED records name,
signatures and hit counts — so any kernel replays them with ``--db FILE``
and surveilr reads them.  ``import``: the same rows of an RSSD file into
the server.

Both are a merge by id, the same code in both directions:

* a row whose id is missing is inserted, **byte for byte** (TEXT and JSON
  columns are TEXT on both sides);
* a row already there with the same content is left (so a second run
  changes nothing);
* a row already there with other content is a **conflict**: reported with
  the differing columns, never overwritten, and the cell's rows that hang on
  it are left out;
* a device is one host: a device row with another id but the same
  ``(name, state, boundary)`` is that one (surveilr's own upsert), and the
  sessions are filed under it; a device or nature row is the same row when
  it names the same thing, whenever each side wrote it.

Rows come from another tool's file, so nothing is trusted: a value the
target can't hold (text with NUL, JSON that is not JSON) is reported instead
of failing the rest, and every blob's bytes are checked against its digest
while they are copied.  Nor is a blob trusted for being there already: the
target's copy is checked (the server's compared with the file's bytes, the
file's against its digest) and replaced when it is not right.  The server's
side runs with the store's statements and deadlines (postgres_conn.Sql; a
blob's stream is given time for its size); a file that can't be written is
a StoreError naming it.  Transitions are copied in their store order, so the
target's order (rowid, or the identity seq) agrees with the source's.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import psycopg

from ..keys import URI_PREFIX, cell_key
from ..trust import IntegrityError, Verifier
from .base import StoreError
from .postgres_blobs import HEAD, PgBlobs
from .postgres_conn import Sql, settings
from .postgres_schema import EXPECTED_COLUMNS, SURVEILR_DDL
from .sqlite import SqliteBackend
from .sqlite_file import check_path, connect

#: Tables in the order rows must arrive (foreign keys), with their keys.
TABLES = [
    ("device", ("device_id",)),
    ("orchestration_nature", ("orchestration_nature_id",)),
    ("orchestration_session", ("orchestration_session_id",)),
    ("orchestration_session_entry", ("orchestration_session_entry_id",)),
    ("orchestration_session_state", ("orchestration_session_state_id",)),
    ("orchestration_session_exec", ("orchestration_session_exec_id",)),
    ("rssd_magic_signature", ("payload_id", "key_id")),
    ("rssd_magic_hit", ("state_id",)),
]
KEYS = dict(TABLES)
#: Rows that name a thing every store has its own row for (this host, our
#: nature label): equal when they name the same thing, whenever each store
#: wrote its row (created_at and the like are the store's bookkeeping).
SAME_WHEN = {
    "device": ("device_id", "name", "state", "boundary"),
    "orchestration_nature": ("orchestration_nature_id", "nature"),
}
COLUMNS = {t: [c for c, _ in EXPECTED_COLUMNS[t]] for t, _ in TABLES}
INTEGER = {(t, c) for t, _ in TABLES for c, ty in EXPECTED_COLUMNS[t] if ty == "bigint"}
#: surveilr's JSON columns (checked with a ::json cast in our DDL).
JSON = set()
for _line in SURVEILR_DDL.splitlines():
    if _m := re.match(r"CREATE TABLE IF NOT EXISTS \{(\w+)\}", _line):
        _table = _m.group(1)
    elif "::json" in _line:
        JSON.add((_table, _line.split('"')[1]))


def _prefix(scope: str | None) -> tuple[str, str]:
    """``[lo, hi)`` of the ``ingest_src`` of our cells (of *scope*)."""
    lo = URI_PREFIX if scope is None else cell_key("", scope).base_src.partition("#")[0] + "#"
    return lo, lo[:-1] + chr(ord(lo[-1]) + 1)


class _Target:
    """Where rows go: insert-if-missing and read-back by key."""

    def __init__(self, conn: Any):
        self.conn = conn

    def _sql(self, text: str, table: str) -> str:
        """*text* with ``@T`` naming *table* (here: unqualified, in the file)."""
        return text.replace("@T", f'"{table}"')

    def insert(self, table: str, row: dict) -> bool:
        cols = COLUMNS[table]
        names = ", ".join(f'"{c}"' for c in cols)
        marks = ", ".join("?" * len(cols))
        cur = self.conn.execute(
            self._sql(f"INSERT INTO @T ({names}) VALUES ({marks}) ON CONFLICT DO NOTHING", table),
            [row[c] for c in cols],
        )
        return cur.rowcount == 1

    def get(self, table: str, row: dict) -> dict | None:
        cols, keys = COLUMNS[table], KEYS[table]
        where = " AND ".join(f'"{k}" = ?' for k in keys)
        found = self.conn.execute(
            self._sql(f'SELECT {", ".join(chr(34) + c + chr(34) for c in cols)} FROM @T WHERE {where}', table),
            [row[k] for k in keys],
        ).fetchone()
        return dict(zip(cols, found)) if found is not None else None

    def device_like(self, row: dict) -> str | None:
        found = self.conn.execute(
            self._sql('SELECT "device_id" FROM @T WHERE "name" = ? AND "state" = ? AND "boundary" = ?', "device"),
            (row["name"], row["state"], row["boundary"]),
        ).fetchone()
        return found[0] if found else None

    def fit(self, table: str, row: dict) -> str | None:
        """Why *row* can't be stored here, or None."""
        return None


class _PgTarget(_Target):
    def __init__(self, conn: psycopg.Connection, q: Sql):
        super().__init__(conn)
        self.q = q

    def _sql(self, text: str, table: str) -> str:
        # Placeholders first: a schema name may hold a "?" (its "%" are doubled by q).
        return text.replace("?", "%s").replace("@T", self.q("{" + table + "}"))

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


class _Merge:
    """Rows into a target by id: inserted, unchanged, or a conflict."""

    def __init__(self, target: _Target):
        self.target = target
        self.inserted: dict[str, int] = {}
        self.unchanged = 0
        self.devices_merged = 0
        self.conflicts: list[dict] = []
        self._device: dict[str, str] = {}
        self.absent: set[tuple[str, str]] = set()  # (table, id) that could not be stored
        self.differing: set[tuple[str, str]] = set()  # (table, id) there with other values

    def add(self, table: str, row: dict) -> bool:
        """True when *row* is in the target now (inserted, or there already)."""
        key = "/".join(str(row[k]) for k in KEYS[table])
        if table == "orchestration_session":
            row["device_id"] = self._device.get(row["device_id"], row["device_id"])
        why = self.target.fit(table, row)
        if why is not None:
            self.absent.add((table, key))
            return self._conflict(table, key, [], why)
        if table == "device" and self.target.get(table, row) is None:
            other = self.target.device_like(row)
            if other is not None:
                self._device[row["device_id"]] = other
                self.devices_merged += 1
                return True
        if self.target.insert(table, row):
            self.inserted[table] = self.inserted.get(table, 0) + 1
            return True
        there = self.target.get(table, row)
        if there is None:  # refused by another constraint (a UNIQUE of surveilr's)
            self.absent.add((table, key))
            return self._conflict(table, key, [], "another row has the same unique values")
        differ = [c for c in SAME_WHEN.get(table, COLUMNS[table]) if there[c] != row[c]]
        if differ:
            self.differing.add((table, key))
            return self._conflict(table, key, differ, "already there with other values; left as it is")
        self.unchanged += 1
        return True

    def _conflict(self, table: str, key: str, columns: list[str], why: str) -> bool:
        self.conflicts.append({"table": table, "id": key, "columns": columns, "why": why})
        return False

    def summary(self) -> dict:
        return {
            "inserted": self.inserted,
            "rows_inserted": sum(self.inserted.values()),
            "unchanged": self.unchanged,
            "devices_merged": self.devices_merged,
            "conflicts": self.conflicts,
        }


#: What each table's rows hang on: (column, parent table).
PARENTS = {
    "orchestration_session": [("device_id", "device"), ("orchestration_nature_id", "orchestration_nature")],
    "orchestration_session_entry": [("session_id", "orchestration_session")],
    "orchestration_session_state": [("session_id", "orchestration_session"), ("session_entry_id", "orchestration_session_entry")],
    "orchestration_session_exec": [("session_id", "orchestration_session"), ("session_entry_id", "orchestration_session_entry")],
}


def _copy_rows(merge: _Merge, rows: Callable[[str], Iterable[dict]]) -> None:
    """Every table's rows (from *rows(table)*) into the target, in foreign-key
    order.  Rows whose parent could not be stored are left out (the target
    would refuse them), and so are a conflicting entry's transitions: a
    cell's history is never mixed from two sources."""
    for table, _ in TABLES:
        for row in rows(table):
            blocked = [
                (parent, row[column])
                for column, parent in PARENTS.get(table, ())
                if row[column] is not None
                and ((parent, row[column]) in merge.absent
                     or (parent == "orchestration_session_entry" and (parent, row[column]) in merge.differing))
            ]  # fmt: skip
            if blocked:
                parent, key = blocked[0]
                merge.conflicts.append({"table": table, "id": "/".join(str(row[k]) for k in KEYS[table]),
                                        "columns": [], "why": f"left out: its {parent} {key} is in conflict"})  # fmt: skip
                merge.absent.add((table, "/".join(str(row[k]) for k in KEYS[table])))
                continue
            merge.add(table, row)


# -- export: server -> RSSD file --------------------------------------------------------


def export_rssd(conn: psycopg.Connection, q: Sql, path: str, scope: str | None, digests_of: Callable[[str], set[str]],
                blobs: PgBlobs) -> dict:  # fmt: skip
    """Write the cells of *scope* (all when None) into the RSSD at *path*
    (created when missing, merged into when it exists).  Runs in the
    caller's transaction (one consistent read of the server)."""
    lo, hi = _prefix(scope)
    entries = [r[0] for r in conn.execute(q(
        """SELECT orchestration_session_entry_id FROM {orchestration_session_entry}
           WHERE ingest_src COLLATE "C" >= %s AND ingest_src COLLATE "C" < %s"""), (lo, hi)
    )]  # fmt: skip
    sessions = [r[0] for r in conn.execute(q(
        """SELECT session_id FROM {orchestration_session_entry} WHERE orchestration_session_entry_id = ANY(%(e)s)
           UNION SELECT session_id FROM {orchestration_session_state} WHERE session_entry_id = ANY(%(e)s)
           UNION SELECT session_id FROM {orchestration_session_exec} WHERE session_entry_id = ANY(%(e)s)"""),
        {"e": entries},
    )]  # fmt: skip
    digests: set[str] = set()
    for (text,) in conn.execute(
        q("""SELECT transition_result FROM {orchestration_session_state}
             WHERE session_entry_id = ANY(%s) AND to_state = 'EXECUTED'"""),
        (entries,),
    ):
        if text:
            digests |= digests_of(text)

    def rows(table: str) -> Iterator[dict]:
        cols = ", ".join(f'x."{c}"' for c in COLUMNS[table])
        queries = {
            "device": """SELECT @C FROM {device} AS x WHERE x.device_id IN
                         (SELECT device_id FROM {orchestration_session} WHERE orchestration_session_id = ANY(%(s)s))""",
            "orchestration_nature": """SELECT @C FROM {orchestration_nature} AS x WHERE x.orchestration_nature_id IN
                         (SELECT orchestration_nature_id FROM {orchestration_session}
                          WHERE orchestration_session_id = ANY(%(s)s))""",
            "orchestration_session": """SELECT @C FROM {orchestration_session} AS x
                         WHERE x.orchestration_session_id = ANY(%(s)s)""",
            "orchestration_session_entry": """SELECT @C FROM {orchestration_session_entry} AS x
                         WHERE x.orchestration_session_entry_id = ANY(%(e)s)""",
            "orchestration_session_state": """SELECT @C FROM {rssd_magic_state_seq} AS q
                         JOIN {orchestration_session_state} AS x ON x.orchestration_session_state_id = q.state_id
                         WHERE x.session_entry_id = ANY(%(e)s)
                            OR (x.session_entry_id IS NULL AND x.session_id = ANY(%(s)s))
                         ORDER BY q.seq""",
            "orchestration_session_exec": """SELECT @C FROM {orchestration_session_exec} AS x
                         WHERE x.session_entry_id = ANY(%(e)s)""",
            "rssd_magic_signature": "SELECT @C FROM {rssd_magic_signature} AS x ORDER BY x.payload_id, x.key_id",
            "rssd_magic_hit": """SELECT @C FROM {rssd_magic_hit} AS x JOIN {orchestration_session_state} AS s
                         ON s.orchestration_session_state_id = x.state_id WHERE s.session_entry_id = ANY(%(e)s)""",
        }
        with conn.cursor() as cur:
            for row in cur.stream(q(queries[table]).replace("@C", cols), {"e": entries, "s": sessions}):
                yield dict(zip(COLUMNS[table], row))

    target = SqliteBackend.open(path)  # surveilr's DDL and ours; refuses a file it can't use
    try:
        copied = _export_blobs(conn, q, target.conn, sorted(digests), blobs)
        merge = _Merge(_Target(target.conn))
        with target.db.write():
            _copy_rows(merge, rows)
    except sqlite3.Error as exc:
        raise StoreError(f"RSSD {Path(path).absolute()}: {exc}") from None
    finally:
        target.close()
    return {"from": None, "to": str(Path(path).absolute()), "scope": scope, "cells": len(entries),
            **merge.summary(), "blobs": copied}  # fmt: skip


def _file_blob_ok(lite: sqlite3.Connection, rowid: int, digest: str) -> bool:
    """True when the file's blob row holds the bytes of its digest."""
    try:
        verifier = Verifier(digest)
        with lite.blobopen("rssd_magic_blob", "data", rowid, readonly=True) as blob:
            while chunk := blob.read(4 << 20):
                verifier.update(chunk)
        verifier.check()
        return True
    except (IntegrityError, sqlite3.Error):
        return False


def _export_blobs(conn: psycopg.Connection, q: Sql, lite: sqlite3.Connection, digests: list[str], blobs: PgBlobs) -> dict:
    """Copy blobs into the RSSD's ``rssd_magic_blob``, each in a transaction
    of its own, streamed and checked against its digest.  A blob the file
    has already is checked too, and replaced when it is not right."""
    out = {"copied": 0, "present": 0, "missing": [], "bad": []}
    for digest in digests:
        there = lite.execute("SELECT rowid FROM rssd_magic_blob WHERE digest = ?", (digest,)).fetchone()
        if there is not None and _file_blob_ok(lite, there[0], digest):
            out["present"] += 1
            continue
        row = conn.execute(q(HEAD), (digest,)).fetchone()
        if row is None:
            out["missing"].append(digest)
            continue
        size, chunks, stored, stored_bytes = int(row[0]), int(row[1]), int(row[2]), int(row[3])
        if stored != chunks or stored_bytes != size:  # before the file is given room for it
            out["bad"].append({"digest": digest, "why": f"incomplete ({stored_bytes} of {size} bytes stored)"})
            continue
        verifier = Verifier(digest)
        conn.execute(settings(blobs.deadline(size)))  # for this blob's stream
        lite.execute("BEGIN IMMEDIATE")
        try:
            if there is not None:
                lite.execute("DELETE FROM rssd_magic_blob WHERE rowid = ?", (there[0],))
            cur = lite.execute("INSERT INTO rssd_magic_blob (digest, size, data) VALUES (?, ?, zeroblob(?))", (digest, size, size))
            offset = 0
            with lite.blobopen("rssd_magic_blob", "data", cur.lastrowid) as blob:
                for chunk in blobs.chunks(conn, digest):
                    if offset + len(chunk) > size:
                        raise IntegrityError("more bytes than its recorded size")
                    verifier.update(chunk)
                    blob.write(chunk)
                    offset += len(chunk)
            if offset != size:
                raise IntegrityError(f"incomplete ({offset} of {size} bytes stored)")
            verifier.check()
            lite.execute("COMMIT")
            out["copied"] += 1
        except (IntegrityError, sqlite3.Error) as exc:
            lite.execute("ROLLBACK")
            out["bad"].append({"digest": digest, "why": str(exc)})
        except BaseException:
            lite.execute("ROLLBACK")
            raise
    conn.execute(q.setup)  # back to the store's deadlines
    return out


# -- import: RSSD file -> server --------------------------------------------------------


def import_rssd(conn: psycopg.Connection, q: Sql, path: str, blobs: PgBlobs) -> dict:
    """Bring every ``%%stateful`` cell of the RSSD at *path* into the server
    (rows in one transaction, after the blobs, each in its own)."""
    file = Path(path).expanduser().absolute()
    if not file.is_file():
        raise StoreError(f"RSSD {file}: no such file")
    try:
        # Read-write where the file may be written (nothing is: temp tables
        # live apart), so SQLite removes its -wal and -shm files at close:
        # an import leaves nothing beside its source.
        lite = connect(file, check_path(file, readonly=True), timeout=30)
        tables = {name for (name,) in lite.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except ValueError as exc:
        raise StoreError(f"RSSD {file}: {exc}") from None
    except sqlite3.Error as exc:
        raise StoreError(f"RSSD {file}: not a usable SQLite database ({exc})") from None
    try:
        missing = [t for t, _ in TABLES[:6] if t not in tables]
        if missing:
            raise StoreError(f"RSSD {file}: not an RSSD (it has no {', '.join(missing)} table)")
        lo, hi = _prefix(None)
        lite.execute("CREATE TEMP TABLE rssd_magic_export_entry (id TEXT PRIMARY KEY)")
        lite.execute(
            """INSERT INTO temp.rssd_magic_export_entry SELECT orchestration_session_entry_id
               FROM orchestration_session_entry WHERE ingest_src >= ? AND ingest_src < ?""",
            (lo, hi),
        )
        cells = lite.execute("SELECT count(*) FROM temp.rssd_magic_export_entry").fetchone()[0]
        lite.execute("CREATE TEMP TABLE rssd_magic_export_session (id TEXT PRIMARY KEY)")
        lite.execute(
            """INSERT OR IGNORE INTO temp.rssd_magic_export_session
               SELECT session_id FROM orchestration_session_entry WHERE orchestration_session_entry_id IN temp.rssd_magic_export_entry
               UNION SELECT session_id FROM orchestration_session_state WHERE session_entry_id IN temp.rssd_magic_export_entry
               UNION SELECT session_id FROM orchestration_session_exec WHERE session_entry_id IN temp.rssd_magic_export_entry"""
        )
        copied = _import_blobs(lite, conn, q, blobs) if "rssd_magic_blob" in tables else {"copied": 0, "present": 0, "bad": []}

        def rows(table: str) -> Iterator[dict]:
            if table not in tables:
                return
            cols = ", ".join(f'x."{c}"' for c in COLUMNS[table])
            entry_of = "x.session_entry_id IN temp.rssd_magic_export_entry"
            where = {
                "device": "x.device_id IN (SELECT device_id FROM orchestration_session WHERE orchestration_session_id IN temp.rssd_magic_export_session)",
                "orchestration_nature": "x.orchestration_nature_id IN (SELECT orchestration_nature_id FROM orchestration_session WHERE orchestration_session_id IN temp.rssd_magic_export_session)",
                "orchestration_session": "x.orchestration_session_id IN temp.rssd_magic_export_session",
                "orchestration_session_entry": "x.orchestration_session_entry_id IN temp.rssd_magic_export_entry",
                "orchestration_session_state": f"{entry_of} OR (x.session_entry_id IS NULL AND x.session_id IN temp.rssd_magic_export_session)",
                "orchestration_session_exec": entry_of,
                "rssd_magic_signature": "1",
                "rssd_magic_hit": "x.state_id IN (SELECT orchestration_session_state_id FROM orchestration_session_state AS x WHERE " + entry_of + ")",
            }[table]  # fmt: skip
            for row in lite.execute(f"SELECT {cols} FROM {table} AS x WHERE {where} ORDER BY x.rowid"):
                yield dict(zip(COLUMNS[table], row))

        merge = _Merge(_PgTarget(conn, q))
        with q.tx(conn):
            _copy_rows(merge, rows)
    except sqlite3.Error as exc:
        raise StoreError(f"RSSD {file}: {exc}") from None
    finally:
        lite.close()
    return {"from": str(file), "to": None, "scope": None, "cells": cells, **merge.summary(), "blobs": copied}


def _import_blobs(lite: sqlite3.Connection, conn: psycopg.Connection, q: Sql, blobs: PgBlobs) -> dict:
    """Every blob of the file into the server, each in a transaction of its
    own: checked against its digest while it is read, and a digest the
    server has already proven to hold the same bytes (else rewritten)."""
    out = {"copied": 0, "present": 0, "bad": []}
    for rowid, digest, size in lite.execute("SELECT rowid, digest, size FROM rssd_magic_blob ORDER BY rowid").fetchall():
        try:
            if not isinstance(digest, str) or not isinstance(size, int):
                raise IntegrityError("not a blob row of ours (digest or size of another type)")
            with lite.blobopen("rssd_magic_blob", "data", rowid, readonly=True) as blob:
                if len(blob) != size:  # before the size decides anything on the server
                    raise IntegrityError(f"{len(blob)} bytes for a recorded size of {size}")

            def chunks(rowid: int = rowid, size: int = size, digest: str = digest) -> Iterator[bytes]:
                verifier = Verifier(digest)
                with lite.blobopen("rssd_magic_blob", "data", rowid, readonly=True) as blob:
                    if len(blob) != size:
                        raise IntegrityError(f"{len(blob)} bytes for a recorded size of {size}")
                    while chunk := blob.read(blobs.chunk):
                        verifier.update(chunk)
                        yield chunk
                verifier.check()  # before the transaction commits: a bad blob is rolled back

            with q.tx(conn, blobs.deadline(size)):
                written = blobs.put_stream(conn, digest, size, chunks)
            out["copied" if written else "present"] += 1
        except (IntegrityError, sqlite3.Error) as exc:
            out["bad"].append({"digest": str(digest), "why": str(exc)})
    return out
