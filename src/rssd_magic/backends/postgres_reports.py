"""The listings ``%stateful list/show/stats/gc`` need, in PostgreSQL's SQL.

The same answers as sqlite_reports.py: our cells are the entries whose
``ingest_src`` starts with ``rssd-magic:`` (a range of the "C"-collated
index); entries with one ``ingest_src`` are one cell, first seen with its
smallest store order; a cell's state is its latest transition by
``rssd_magic_state_seq``.  Host and duration are pulled out of a record on
the server (``rssd_magic_json``, NULL for text that is not JSON), so a
listing never ships outputs to the client.

Each function runs in the caller's transaction (postgres_conn.Sql.tx: its
timeouts bound a listing too) and renders its statements with ``q``.
"""

from __future__ import annotations

from typing import Callable

import psycopg

from ..keys import URI_PREFIX
from ..lifecycle import EXECUTED
from .base import CellRow, HistoryRow, StorageStats, Transition, executed_results, group_cells
from .postgres_conn import Sql

_LO, _HI = URI_PREFIX, URI_PREFIX[:-1] + chr(ord(URI_PREFIX[-1]) + 1)

#: The columns of a Transition, in its field order (s: state, q: its seq row).
STATE_COLUMNS = """s.orchestration_session_state_id, s.session_entry_id, s.session_id, s.from_state, s.to_state,
       s.transition_result, s.transition_reason, s.transitioned_at, q.seq"""


def cells(conn: psycopg.Connection, q: Sql) -> list[CellRow]:
    rows = conn.execute(
        q("""SELECT e.orchestration_session_entry_id, e.ingest_src, e.elaboration,
                  (SELECT count(*) FROM {orchestration_session_state} AS s
                    WHERE s.session_entry_id = e.orchestration_session_entry_id),
                  (SELECT min(q.seq) FROM {rssd_magic_state_seq} AS q
                    WHERE q.entry_id = e.orchestration_session_entry_id),
                  (SELECT max(q.seq) FROM {rssd_magic_state_seq} AS q
                    WHERE q.entry_id = e.orchestration_session_entry_id),
                  (SELECT coalesce(sum(h.hits), 0) FROM {orchestration_session_state} AS s
                     JOIN {rssd_magic_hit} AS h ON h.state_id = s.orchestration_session_state_id
                    WHERE s.session_entry_id = e.orchestration_session_entry_id)
           FROM {orchestration_session_entry} AS e
           WHERE e.ingest_src COLLATE "C" >= %s AND e.ingest_src COLLATE "C" < %s"""),
        (_LO, _HI),
    ).fetchall()
    # First seen: the entry's first transition in store order (an entry is
    # written with its first transition); entries without any come last.
    rows.sort(key=lambda r: (r[4] is None, r[4] or 0, r[0]))
    groups, latest_seq = group_cells((e, src, el, n, latest, hits) for e, src, el, n, _, latest, hits in rows)
    for src, cell in groups.items():
        if src in latest_seq:
            _fill_latest(conn, q, cell, latest_seq[src])
        cell.source = _latest_source(conn, q, cell)
    return list(groups.values())


def _fill_latest(conn: psycopg.Connection, q: Sql, cell: CellRow, seq: int) -> None:
    row = conn.execute(
        q("SELECT " + STATE_COLUMNS + """,
                  {rssd_magic_json}(s.transition_result) ->> 'host',
                  {rssd_magic_json}(s.transition_result) -> 'duration_s',
                  (SELECT h.hits FROM {rssd_magic_hit} AS h WHERE h.state_id = s.orchestration_session_state_id)
           FROM {rssd_magic_state_seq} AS q
           JOIN {orchestration_session_state} AS s ON s.orchestration_session_state_id = q.state_id
           WHERE q.seq = %s"""),
        (seq,),
    ).fetchone()
    cell.latest = Transition(*row[:9])
    host, duration, hits = row[9:]
    cell.latest_host = host if isinstance(host, str) else None
    cell.latest_duration_s = _number(duration)
    cell.latest_hits = int(hits or 0)


def _number(value) -> float | int | None:
    # ``-> 'duration_s'`` is JSON: a number comes back as int or float, a
    # string or an object (someone else's record) as something else.
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _latest_source(conn: psycopg.Connection, q: Sql, cell: CellRow) -> str | None:
    """The code of the cell's latest run (a ``--name`` cell may have been
    edited since its entry was made), else the entry's."""
    row = conn.execute(
        q("""SELECT {rssd_magic_json}(s.elaboration) ->> 'source'
           FROM {rssd_magic_state_seq} AS q
           JOIN {orchestration_session_state} AS s ON s.orchestration_session_state_id = q.state_id
           WHERE q.entry_id = ANY(%s) AND {rssd_magic_json}(s.elaboration) ->> 'source' IS NOT NULL
           ORDER BY q.seq DESC LIMIT 1"""),
        (cell.entry_ids,),
    ).fetchone()
    source = row[0] if row else cell.elaboration.get("source")
    return source if isinstance(source, str) else None


def history(conn: psycopg.Connection, q: Sql, cell: CellRow) -> list[HistoryRow]:
    rows = conn.execute(
        q("""SELECT s.orchestration_session_state_id, s.from_state, s.to_state, s.transitioned_at,
                  s.transition_reason, s.session_id,
                  coalesce(d.name, {rssd_magic_json}(s.transition_result) ->> 'host'),
                  {rssd_magic_json}(s.transition_result) -> 'duration_s',
                  {rssd_magic_json}(s.transition_result) -> 'error' ->> 'ename',
                  {rssd_magic_json}(s.transition_result) -> 'error' ->> 'evalue',
                  (SELECT h.hits FROM {rssd_magic_hit} AS h WHERE h.state_id = s.orchestration_session_state_id)
           FROM {rssd_magic_state_seq} AS q
           JOIN {orchestration_session_state} AS s ON s.orchestration_session_state_id = q.state_id
           LEFT JOIN {orchestration_session} AS o ON o.orchestration_session_id = s.session_id
           LEFT JOIN {device} AS d ON d.device_id = o.device_id
           WHERE q.entry_id = ANY(%s)
           ORDER BY q.seq"""),
        (cell.entry_ids,),
    ).fetchall()
    out = []
    for sid, frm, to, at, reason, session, host, duration, ename, evalue, hits in rows:
        error = None if ename is None else {"ename": str(ename), "evalue": str(evalue) if evalue is not None else ""}
        hits = int(hits) if hits is not None else None
        out.append(HistoryRow(sid, frm, to, at, reason, session, host, _number(duration), hits, error))
    return out


def storage(conn: psycopg.Connection, q: Sql, location: str) -> StorageStats:
    schema = q.schema
    transitions, json_bytes = conn.execute(
        q("""SELECT count(*), coalesce(sum(octet_length(s.transition_result)), 0)
           FROM {orchestration_session_entry} AS e
           JOIN {orchestration_session_state} AS s ON s.session_entry_id = e.orchestration_session_entry_id
           WHERE e.ingest_src COLLATE "C" >= %s AND e.ingest_src COLLATE "C" < %s"""),
        (_LO, _HI),
    ).fetchone()
    hits, saved = conn.execute(
        q("""SELECT coalesce(sum(h.hits), 0),
                  coalesce(sum(h.hits * coalesce(
                      CASE WHEN json_typeof({rssd_magic_json}(s.transition_result) -> 'duration_s') = 'number'
                           THEN ({rssd_magic_json}(s.transition_result) ->> 'duration_s')::float8 END, 0)), 0)
           FROM {rssd_magic_hit} AS h
           JOIN {orchestration_session_state} AS s ON s.orchestration_session_state_id = h.state_id
           WHERE s.to_state = %s"""),
        (EXECUTED,),
    ).fetchone()
    blobs, blob_bytes = conn.execute(q("SELECT count(*), coalesce(sum(size), 0) FROM {rssd_magic_blob}"), ()).fetchone()
    # What the tables of this schema take on the server's disk (with their
    # indexes and TOAST): the nearest thing to an RSSD's file size.
    (on_disk,) = conn.execute(
        """SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class AS c
           JOIN pg_namespace AS n ON n.oid = c.relnamespace
           WHERE n.nspname = %s AND c.relkind IN ('r', 'p')
             AND (c.relname LIKE 'rssd\\_magic\\_%%' OR c.relname LIKE 'orchestration\\_%%' OR c.relname = 'device')""",
        (schema,),
    ).fetchone()
    return StorageStats(
        location=location,
        transitions=int(transitions),
        result_json_bytes=int(json_bytes),
        hits=int(hits),
        time_saved_s=round(float(saved), 6),
        blobs=int(blobs),
        blob_bytes=int(blob_bytes),
        file_bytes=int(on_disk),
        wal_bytes=0,
        extra={"schema": schema},
    )


def _referenced(conn: psycopg.Connection, q: Sql, digests_of: Callable[[str], set[str]]) -> set[str]:
    return set().union(*(digests_of(result) for _, result in executed_results(cells(conn, q))))


def gc(conn: psycopg.Connection, q: Sql, lock: int, digests_of: Callable[[str], set[str]], dry_run: bool):
    """Blobs no current EXECUTED record refers to, deleted (unless *dry_run*)
    in the caller's transaction, holding the blob lock exclusively: a run that
    skipped uploading a blob because it was stored holds the lock shared
    until its record commits, so gc sees that record or runs before it."""
    if not dry_run:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
    keep = _referenced(conn, q, digests_of)
    doomed = [(d, int(s)) for d, s in conn.execute(q("SELECT digest, size FROM {rssd_magic_blob}"), ()) if d not in keep]
    if not dry_run and doomed:
        conn.execute(q("DELETE FROM {rssd_magic_blob} WHERE digest = ANY(%s)"), ([d for d, _ in doomed],))
    kept, kept_bytes = conn.execute(q("SELECT count(*), coalesce(sum(size), 0) FROM {rssd_magic_blob}"), ()).fetchone()
    if dry_run:
        freed = sum(s for _, s in doomed)
        return doomed, int(kept) - len(doomed), int(kept_bytes) - freed
    return doomed, int(kept), int(kept_bytes)
