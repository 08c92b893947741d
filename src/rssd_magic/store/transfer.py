"""Moving ``%%stateful`` records from one store to another — an RSSD into
an RSSD (a merge), an RSSD into a PostgreSQL store, a server into an RSSD —
through the store contract only: rows read with the source's dialect,
written with the target's, blobs through each one's ``blobs``.

It is a merge by id, the same in every direction:

* a row whose id is missing is inserted, **byte for byte** (TEXT and JSON
  are text in every store);
* a row already there with the same content is left (so a second run
  changes nothing);
* a row already there with other content is a **conflict**: reported with
  the differing columns, never overwritten, and the cell's rows that hang on
  it are left out;
* a device is one host: a device row with another id but the same
  ``(name, state, boundary)`` is that one (surveilr's own upsert), and the
  sessions are filed under it; a device or nature row is the same row when
  it names the same thing, whenever each side wrote it.

Rows come from another tool's store, so nothing is trusted: a value the
target can't hold (text with NUL on a server, JSON that is not JSON) is
reported instead of failing the rest (the target's ``dialect.fit``), and
every blob is read back from the source against its digest.  Nor is a blob
trusted for being there already: the target's copy is checked and
replaced when it is not right.  Transitions are copied in the source's
store order, so the target's order agrees with it.  The rows go in one
transaction of the target (read in one snapshot of the source), after the
blobs, each in its own.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from . import buckets, tables, tally
from .base import StoreError
from .journal import StateBackend
from .dialect import Tx
from ..backends.sqlite_schema import EXPECTED_COLUMNS
from ..engine.keys import URI_PREFIX, cell_key, src_range
from ..records.record import digests_in
from ..records.trust import IntegrityError

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
#: The columns copied: every store has surveilr's and ours under these names.
COLUMNS = {t: [c for c, _ in EXPECTED_COLUMNS[t]] for t, _ in TABLES}
#: What each table's rows hang on: (column, parent table).
PARENTS = {
    "orchestration_session": [("device_id", "device"), ("orchestration_nature_id", "orchestration_nature")],
    "orchestration_session_entry": [("session_id", "orchestration_session")],
    "orchestration_session_state": [("session_id", "orchestration_session"), ("session_entry_id", "orchestration_session_entry")],
    "orchestration_session_exec": [("session_id", "orchestration_session"), ("session_entry_id", "orchestration_session_entry")],
}
#: Which rows of each table belong to the cells copied (E: their entries,
#: S: the sessions that wrote them), in the source's order.
WHERE = {
    "device": "x.device_id IN (SELECT device_id FROM {orchestration_session} WHERE @S(orchestration_session_id))",
    "orchestration_nature": """x.orchestration_nature_id IN (SELECT orchestration_nature_id FROM {orchestration_session}
                                                           WHERE @S(orchestration_session_id))""",
    "orchestration_session": "@S(x.orchestration_session_id)",
    "orchestration_session_entry": "@E(x.orchestration_session_entry_id)",
    "orchestration_session_exec": "@E(x.session_entry_id)",
    "rssd_magic_signature": "1 = 1",
    "rssd_magic_hit": """x.state_id IN (SELECT orchestration_session_state_id FROM {orchestration_session_state}
                                       WHERE @E(session_entry_id))""",
}


def _prefix(scope: str | None) -> tuple[str, str]:
    """``[lo, hi)`` of the ``ingest_src`` of our cells (of *scope*)."""
    return src_range(URI_PREFIX if scope is None else cell_key("", scope).base_src.partition("#")[0] + "#")


class _Source:
    """The rows of the cells being copied, from one snapshot of the source."""

    def __init__(self, t: Tx, scope: str | None):
        self.t, d = t, t.d
        self.entries = [r[0] for r in t.all(
            "SELECT orchestration_session_entry_id FROM {orchestration_session_entry} "
            "WHERE ingest_src{C} >= ? AND ingest_src{C} < ?", _prefix(scope))]  # fmt: skip
        e = d.listed(self.entries)
        self.sessions = list(dict.fromkeys(r[0] for r in t.all(
            f"""SELECT session_id FROM {{orchestration_session_entry}} WHERE {d.in_list('orchestration_session_entry_id')}
                UNION SELECT session_id FROM {{orchestration_session_state}} WHERE {d.in_list('session_entry_id')}
                UNION SELECT session_id FROM {{orchestration_session_exec}} WHERE {d.in_list('session_entry_id')}""",
            (e, e, e))))  # fmt: skip

    def _where(self, text: str) -> tuple[str, list]:
        """*text* with its ``@E(col)``/``@S(col)`` made list tests, and their parameters."""
        d, params, out = self.t.d, [], ""
        while "@" in text:
            before, _, rest = text.partition("@")
            kind, column, text = rest[0], rest[2 : rest.index(")")], rest[rest.index(")") + 1 :]
            out += before + d.in_list(column)
            params.append(d.listed(self.entries if kind == "E" else self.sessions))
        return out + text, params

    def rows(self, table: str) -> Iterator[dict]:
        cols = ", ".join(f'x."{c}"' for c in COLUMNS[table])
        if table == "orchestration_session_state":
            where, params = self._where("(@E(s.session_entry_id) OR (s.session_entry_id IS NULL AND @S(s.session_id)))")
            sql = f"SELECT {cols.replace('x.', 's.')} FROM {{states}} WHERE {where} ORDER BY {{seq}}"
        else:
            where, params = self._where(WHERE[table])
            sql = f"SELECT {cols} FROM {{{table}}} AS x WHERE {where}"
        for row in self.t.stream(sql, params):
            yield dict(zip(COLUMNS[table], row))

    def digests(self) -> set[str]:
        """The blobs named by the EXECUTED records of the cells copied."""
        out: set[str] = set()
        for (text,) in self.t.stream(
            f"SELECT transition_result FROM {{orchestration_session_state}} WHERE {self.t.d.in_list('session_entry_id')} "
            "AND to_state = 'EXECUTED'", (self.t.d.listed(self.entries),)):  # fmt: skip
            if text:
                out |= digests_in(text)
        return out


class _Merge:
    """Rows into a target by id: inserted, unchanged, or a conflict."""

    def __init__(self, t: Tx):
        self.t = t
        self.inserted: dict[str, int] = {}
        self.unchanged = 0
        self.devices_merged = 0
        self.conflicts: list[dict] = []
        self._device: dict[str, str] = {}
        self.absent: set[tuple[str, str]] = set()  # (table, id) that could not be stored
        self.differing: set[tuple[str, str]] = set()  # (table, id) there with other values

    def _get(self, table: str, row: dict) -> dict | None:
        cols, keys = COLUMNS[table], KEYS[table]
        found = self.t.one(
            f"SELECT {', '.join(f'{chr(34)}{c}{chr(34)}' for c in cols)} FROM {{{table}}} "
            f"WHERE {' AND '.join(f'{chr(34)}{k}{chr(34)} = ?' for k in keys)}",
            [row[k] for k in keys],
        )
        return dict(zip(cols, found)) if found is not None else None

    def add(self, table: str, row: dict) -> bool:
        """True when *row* is in the target now (inserted, or there already)."""
        key = "/".join(str(row[k]) for k in KEYS[table])
        if table == "orchestration_session":
            row["device_id"] = self._device.get(row["device_id"], row["device_id"])
        why = self.t.d.fit(table, row)
        if why is not None:
            self.absent.add((table, key))
            return self._conflict(table, key, [], why)
        if table == "device" and self._get(table, row) is None:
            other = self.t.one(
                'SELECT "device_id" FROM {device} WHERE "name" = ? AND "state" = ? AND "boundary" = ?',
                (row["name"], row["state"], row["boundary"]),
            )
            if other is not None:
                self._device[row["device_id"]] = other[0]
                self.devices_merged += 1
                return True
        cols = COLUMNS[table]
        names = ", ".join(f'"{c}"' for c in cols)
        if self.t.run(f"INSERT INTO {{{table}}} ({names}) VALUES ({', '.join('?' * len(cols))}) ON CONFLICT DO NOTHING",
                      [row[c] for c in cols]).rowcount == 1:  # fmt: skip
            self.inserted[table] = self.inserted.get(table, 0) + 1
            return True
        there = self._get(table, row)
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

    def copy(self, rows: Callable[[str], Iterable[dict]]) -> None:
        """Every table's rows (from *rows(table)*) in foreign-key order.  Rows
        whose parent could not be stored are left out (the target would
        refuse them), and so are a conflicting entry's transitions: a cell's
        history is never mixed from two sources."""
        for table, keys in TABLES:
            for row in rows(table):
                blocked = [
                    (parent, row[column])
                    for column, parent in PARENTS.get(table, ())
                    if row[column] is not None
                    and ((parent, row[column]) in self.absent
                         or (parent == "orchestration_session_entry" and (parent, row[column]) in self.differing))
                ]  # fmt: skip
                if blocked:
                    parent, key = blocked[0]
                    me = "/".join(str(row[k]) for k in keys)
                    self._conflict(table, me, [], f"left out: its {parent} {key} is in conflict")
                    self.absent.add((table, me))
                    continue
                self.add(table, row)

    def summary(self) -> dict:
        return {
            "inserted": self.inserted,
            "rows_inserted": sum(self.inserted.values()),
            "unchanged": self.unchanged,
            "devices_merged": self.devices_merged,
            "conflicts": self.conflicts,
        }


def _blobs(source: StateBackend, target: StateBackend, digests: Iterable[str], far: dict[str, str]) -> dict:
    """Each blob the target lacks (or holds wrong), read from the source —
    or from the bucket *far* says a source record names for it — checked
    against its digest on the way, and written, one at a time: the target
    holds the bytes itself (an exported RSSD replays with no bucket)."""
    out = {"copied": 0, "present": 0, "missing": [], "bad": []}
    for digest in sorted(digests):
        if target.blobs.check(digest) is None:
            out["present"] += 1
            continue
        try:
            try:
                data = source.blobs.get(digest)
            except KeyError:
                if digest not in far:
                    raise
                data = buckets.bucket(far[digest]).get(digest)
        except KeyError:
            out["missing"].append(digest)
            continue
        except (IntegrityError, StoreError) as exc:
            out["bad"].append({"digest": digest, "why": str(exc)})
            continue
        target.blobs.put_many([(digest, data)])
        out["copied"] += 1
    return out


def transfer(source: StateBackend, target: StateBackend, scope: str | None = None) -> dict:
    """Copy the cells of *source* (of *scope*, or all) into *target*; what
    was done: ``from``, ``to``, ``scope``, ``cells``, ``inserted`` (rows per
    table), ``rows_inserted``, ``unchanged``, ``devices_merged``,
    ``conflicts`` (``{table, id, columns, why}``) and ``blobs``
    (``copied``, ``present``, ``missing``: named but in neither store,
    ``bad``: ``{digest, why}``).  The blobs copied are those the cells'
    EXECUTED records name and, when all cells move (no *scope*), every
    other blob of the source too."""
    if source.scheme == target.scheme and source.location == target.location:
        raise StoreError(f"{target.location}: import and export need two stores; this is the same one")
    target._writable()  # a read-only or newer target: said before anything is read
    source_digests = set(source.blobs.sizes()) if scope is None else set()
    digests = source.read(lambda t: _Source(t, scope).digests())
    far = {d: url for url, named in tables.bucket_refs(source).items() for d in named}
    blobs = _blobs(source, target, digests | {d for d in source_digests if isinstance(d, str)}, far)

    def rows(t: Tx) -> dict:
        src = _Source(t, scope)

        def copy(w: Tx, _retrying: bool) -> dict:
            merge = _Merge(w)
            merge.copy(src.rows)
            tally.rebuild(w)  # rows came in that no append counted
            return {"cells": len(src.entries), **merge.summary()}

        return target.write(copy)

    summary = source.read(rows)
    return {"from": source.location, "to": target.location, "scope": scope, **summary, "blobs": blobs}
