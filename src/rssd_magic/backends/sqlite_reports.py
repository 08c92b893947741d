"""The listings ``%stateful list/show/stats/gc`` need, in SQLite's SQL.

Our cells are the ``orchestration_session_entry`` rows whose ``ingest_src``
starts with ``rssd-magic:``, found by a range scan of the ``ingest_src``
index.  Entries with the same ``ingest_src`` (two RSSDs merged) are one
cell, first seen with its smallest rowid.  A cell's state is its latest
transition by rowid.  Host and duration are pulled out of a record with
``json_extract``, so listing 5,000 cells never loads their outputs.
"""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable

from ..keys import URI_PREFIX
from ..lifecycle import EXECUTED
from .base import CellRow, HistoryRow, StorageStats, Transition, executed_results, group_cells
from .sqlite_blobs import delete

_LO, _HI = URI_PREFIX, URI_PREFIX[:-1] + chr(ord(URI_PREFIX[-1]) + 1)


def _field(column: str, path: str) -> str:
    """``json_extract`` that reads NULL where another tool left text SQLite
    can't parse (written past the CHECK), instead of failing the query."""
    return f"CASE WHEN json_valid({column}) THEN json_extract({column}, '{path}') END"


_HOST, _DURATION = _field("s.transition_result", "$.host"), _field("s.transition_result", "$.duration_s")
_ENAME, _EVALUE = _field("s.transition_result", "$.error.ename"), _field("s.transition_result", "$.error.evalue")


def cells(conn: sqlite3.Connection) -> list[CellRow]:
    rows = conn.execute(
        """SELECT e.rowid, e.orchestration_session_entry_id, e.ingest_src, e.elaboration,
                  (SELECT count(*) FROM orchestration_session_state AS s
                    WHERE s.session_entry_id = e.orchestration_session_entry_id),
                  (SELECT s.rowid FROM orchestration_session_state AS s
                    WHERE s.session_entry_id = e.orchestration_session_entry_id
                    ORDER BY s.rowid DESC LIMIT 1),
                  (SELECT total(h.hits) FROM orchestration_session_state AS s
                     JOIN rssd_magic_hit AS h ON h.state_id = s.orchestration_session_state_id
                    WHERE s.session_entry_id = e.orchestration_session_entry_id)
           FROM orchestration_session_entry AS e
           WHERE e.ingest_src >= ? AND e.ingest_src < ?""",
        (_LO, _HI),
    ).fetchall()
    # Sorted here, not by ORDER BY: that would tempt the planner to walk the
    # whole table in rowid order instead of the ingest_src range.
    rows.sort(key=lambda r: r[0])
    groups, latest_seq = group_cells(row[1:] for row in rows)
    for src, cell in groups.items():
        if src in latest_seq:
            _fill_latest(conn, cell, latest_seq[src])
        cell.source = _latest_source(conn, cell)
    return list(groups.values())


def _fill_latest(conn: sqlite3.Connection, cell: CellRow, seq: int) -> None:
    row = conn.execute(
        f"""SELECT s.orchestration_session_state_id, s.session_entry_id, s.session_id, s.from_state,
                  s.to_state, s.transition_result, s.transition_reason, s.transitioned_at, s.rowid,
                  {_HOST}, {_DURATION},
                  (SELECT h.hits FROM rssd_magic_hit AS h WHERE h.state_id = s.orchestration_session_state_id)
           FROM orchestration_session_state AS s WHERE s.rowid = ?""",
        (seq,),
    ).fetchone()
    cell.latest = Transition(*row[:9])
    host, duration, hits = row[9:]
    cell.latest_host = host if isinstance(host, str) else None
    cell.latest_duration_s = duration if isinstance(duration, (int, float)) else None
    cell.latest_hits = int(hits or 0)


def _latest_source(conn: sqlite3.Connection, cell: CellRow) -> str | None:
    """The code of the cell's latest run (a ``--name`` cell may have been
    edited since its entry was made), else the entry's."""
    marks = ", ".join("?" * len(cell.entry_ids))
    row = conn.execute(
        f"""SELECT json_extract(s.elaboration, '$.source') FROM orchestration_session_state AS s
            WHERE s.session_entry_id IN ({marks}) AND json_valid(s.elaboration)
              AND json_extract(s.elaboration, '$.source') IS NOT NULL
            ORDER BY s.rowid DESC LIMIT 1""",
        cell.entry_ids,
    ).fetchone()
    source = row[0] if row else cell.elaboration.get("source")
    return source if isinstance(source, str) else None


def history(conn: sqlite3.Connection, cell: CellRow) -> list[HistoryRow]:
    marks = ", ".join("?" * len(cell.entry_ids))
    rows = conn.execute(
        f"""SELECT s.orchestration_session_state_id, s.from_state, s.to_state, s.transitioned_at,
                   s.transition_reason, s.session_id,
                   coalesce(d.name, {_HOST}), {_DURATION}, {_ENAME}, {_EVALUE},
                   (SELECT h.hits FROM rssd_magic_hit AS h WHERE h.state_id = s.orchestration_session_state_id)
            FROM orchestration_session_state AS s
            LEFT JOIN orchestration_session AS o ON o.orchestration_session_id = s.session_id
            LEFT JOIN device AS d ON d.device_id = o.device_id
            WHERE s.session_entry_id IN ({marks})
            ORDER BY s.rowid""",
        cell.entry_ids,
    ).fetchall()
    out = []
    for sid, frm, to, at, reason, session, host, duration, ename, evalue, hits in rows:
        error = None if ename is None else {"ename": str(ename), "evalue": str(evalue) if evalue is not None else ""}
        duration = duration if isinstance(duration, (int, float)) else None
        out.append(HistoryRow(sid, frm, to, at, reason, session, host, duration, hits, error))
    return out


def storage(conn: sqlite3.Connection, path: Path) -> StorageStats:
    transitions, json_bytes = conn.execute(
        """SELECT count(*), total(length(CAST(s.transition_result AS BLOB)))
           FROM orchestration_session_entry AS e
           JOIN orchestration_session_state AS s ON s.session_entry_id = e.orchestration_session_entry_id
           WHERE e.ingest_src >= ? AND e.ingest_src < ?""",
        (_LO, _HI),
    ).fetchone()
    # CROSS JOIN keeps the (small) hit table outside: one PK probe per hit.
    hits, saved = conn.execute(
        f"""SELECT total(h.hits),
                  total(h.hits * coalesce({_DURATION}, 0))
           FROM rssd_magic_hit AS h
           CROSS JOIN orchestration_session_state AS s ON s.orchestration_session_state_id = h.state_id
           WHERE s.to_state = ?""",
        (EXECUTED,),
    ).fetchone()
    blobs, blob_bytes = conn.execute("SELECT count(*), total(size) FROM rssd_magic_blob").fetchone()
    wal = path.with_name(path.name + "-wal")
    return StorageStats(
        location=str(path),
        transitions=int(transitions),
        result_json_bytes=int(json_bytes),
        hits=int(hits),
        time_saved_s=round(float(saved), 6),
        blobs=int(blobs),
        blob_bytes=int(blob_bytes),
        file_bytes=path.stat().st_size if path.exists() else 0,
        wal_bytes=wal.stat().st_size if wal.exists() else 0,
    )


def _referenced(conn: sqlite3.Connection, digests_of: Callable[[str], set[str]]) -> set[str]:
    return set().union(*(digests_of(result) for _, result in executed_results(cells(conn))))


def gc(
    conn: sqlite3.Connection,
    write: Callable[[], AbstractContextManager[sqlite3.Connection]],
    digests_of: Callable[[str], set[str]],
    dry_run: bool,
):
    """Blobs no current EXECUTED record refers to, deleted (unless
    *dry_run*) in the same transaction that found them (*write* opens it): a
    kernel finishing a run at the same moment can't lose a blob it just
    referenced (it checks its blobs again inside its own transaction).

    Chunks without a blob row — a large value whose writing was cut short
    (a crash, Ctrl-C, a run taken over) — count as one unreferenced blob per
    digest, of the bytes they hold."""

    def doomed_in(c: sqlite3.Connection) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        keep = _referenced(c, digests_of)
        rows = [(d, int(s or 0)) for d, s in c.execute("SELECT digest, size FROM rssd_magic_blob") if d not in keep]
        partial = c.execute(
            """SELECT k.digest, total(length(k.data)) FROM rssd_magic_blob_chunk AS k
               WHERE NOT EXISTS (SELECT 1 FROM rssd_magic_blob AS b WHERE b.digest = k.digest)
               GROUP BY k.digest"""
        )
        return rows, [(d, int(s)) for d, s in partial if d not in keep]

    if dry_run:
        conn.execute("BEGIN")  # one consistent snapshot, no write lock
        try:
            rows, partial = doomed_in(conn)
            kept, kept_bytes = conn.execute("SELECT count(*), total(size) FROM rssd_magic_blob").fetchone()
        finally:
            conn.execute("ROLLBACK")
        return rows + partial, int(kept) - len(rows), int(kept_bytes) - sum(s for _, s in rows)
    with write() as c:
        rows, partial = doomed_in(c)
        delete(c, [d for d, _ in rows + partial])
        kept, kept_bytes = c.execute("SELECT count(*), total(size) FROM rssd_magic_blob").fetchone()
    return rows + partial, int(kept), int(kept_bytes)
