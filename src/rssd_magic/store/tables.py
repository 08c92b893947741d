"""What the reports read from a store, written once for every store: each
statement one template (store/dialect.py renders it), run through the
store's contract — one consistent read (``_read``), one streamed statement
(``_each``), one write (``_write``).

Set-based, one pass: a listing groups every transition of our cells once
(``rssd_magic_*`` entries, found by a range of the ``ingest_src`` index;
entries with one ``ingest_src`` are one cell, as two merged RSSDs leave
them) and joins each cell's latest transition by store order; ``stats``
and ``gc --dry-run`` read the tally kept as the journal is written
(tally.py), and gc, which deletes, reads the current records that can
name a blob (their text holds a kind whose codec has blobs, or an escape).
Fields are read out of a record with the store's JSON functions, by the
names record.py gives them, so a listing never loads outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from .base import Transition
from .journal import StateBackend
from .dialect import Dialect, Tx
from . import tally
from .rows import ENTRIES
from ..engine.keys import OURS
from ..records.canonical import loads_object
from ..records.record import FIELD_PATHS, blob_markers, digests_in


@dataclass
class CellRow:
    """One cell: its entry (the first, when RSSDs were merged), what its
    entry says (``key``, ``name``, ``scope``, ``kind``, ``source``), counts
    over all its transitions, its latest transition, and ``source``: the
    code of its latest run (the latest transition with an elaboration, a
    RUNNING: a ``--name`` cell may have been edited since), else its entry's."""

    ingest_src: str
    elaboration: dict
    entry_id: str
    transitions: int
    hits_total: int
    latest: Transition | None = None
    latest_host: str | None = None
    latest_duration_s: float | None = None
    latest_hits: int = 0
    source: str | None = None


@dataclass
class HistoryRow:
    """One transition of a cell, as ``show`` lists it."""

    id: str
    from_state: str
    to_state: str
    at: str | None
    reason: str | None
    session: str | None
    host: str | None
    duration_s: float | None
    hits: int | None
    error: dict | None = None


@dataclass
class Counts(tally.Sums):
    """What ``stats`` counts: the tally's sums (cells by latest state,
    transitions, the bytes of their records, replays and the time they
    saved), the blobs, and what gc would free now."""

    blobs: int = 0
    blob_bytes: int = 0
    #: ``(digest, size)`` of what gc would free now.
    garbage: list[tuple[str, int]] = field(default_factory=list)


def _number(value: Any) -> float | int | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# -- the cells ------------------------------------------------------------------------


def _cells_sql(d: Dialect, where: str, with_results: bool, executed: bool) -> str:
    """One statement: every cell *where* allows, newest (latest transition)
    first, with what a listing shows."""
    field_ = lambda column, name: d.json_text(column, *FIELD_PATHS[name])  # noqa: E731
    result = "l.transition_result" if with_results else "NULL"
    return f"""
        WITH c AS (
            SELECT e.ingest_src AS src, min(e.orchestration_session_entry_id) AS entry,
                   count(s.orchestration_session_state_id) AS n, max({{seq}}) AS last,
                   max(CASE WHEN s.elaboration IS NOT NULL THEN {{seq}} END) AS ran,
                   coalesce(sum(h.hits), 0) AS hits
            FROM {{orchestration_session_entry}} AS e
            LEFT JOIN {{states}} ON {{entry}} = e.orchestration_session_entry_id
            LEFT JOIN {{rssd_magic_hit}} AS h ON h.state_id = s.orchestration_session_state_id
            WHERE {where}
            GROUP BY e.ingest_src)
        SELECT c.src, c.entry, c.n, c.hits, e.elaboration,
               l.orchestration_session_state_id, l.session_entry_id, l.session_id, l.from_state, l.to_state,
               {result}, l.transition_reason, l.transitioned_at, c.last,
               {field_('l.transition_result', 'host')}, {d.json_number('l.transition_result', *FIELD_PATHS['duration_s'])},
               lh.hits, {d.json_text('r.elaboration', 'source')}
        FROM c
        JOIN {{orchestration_session_entry}} AS e ON e.orchestration_session_entry_id = c.entry
        LEFT JOIN {d.state_at('l', 'c.last')}
        LEFT JOIN {{rssd_magic_hit}} AS lh ON lh.state_id = l.orchestration_session_state_id
        LEFT JOIN {d.state_at('r', 'c.ran')}
        {"WHERE l.to_state = 'EXECUTED'" if executed else ""}
        ORDER BY c.last IS NULL, c.last DESC"""


def _cell(row: tuple) -> CellRow:
    src, entry, n, hits, entry_json = row[:5]
    latest = Transition(*row[5:14]) if row[5] is not None else None
    host, duration, latest_hits, ran_source = row[14:18]
    said = loads_object(entry_json)  # parsed once here: cheaper than one JSON read per field in SQL
    elaboration = {k: _text(said.get(k)) for k in ("key", "name", "scope", "kind", "source")}
    return CellRow(
        src, elaboration, entry, int(n), int(hits or 0), latest, _text(host), _number(duration), int(latest_hits or 0),
        _text(ran_source) if ran_source is not None else elaboration["source"],
    )


def cells(
    store: StateBackend, *, limit: int | None = None, srcs: Iterable[str] | None = None,
    with_results: bool = False, executed: bool = False,
) -> Iterator[CellRow]:  # fmt: skip
    """The ``%%stateful`` cells, newest first (by their latest transition;
    cells that never ran last), streamed: all of them, the *limit* newest,
    or those filed under *srcs*.  *with_results*: the latest transitions
    carry their records; *executed*: only cells whose latest state is
    EXECUTED (what replays, what gc keeps and trust signs)."""
    d = store.dialect
    if limit is not None:
        srcs = newest(store, limit)
    if srcs is not None:
        wanted = list(dict.fromkeys(srcs))
        if not wanted:
            return
        sql = _cells_sql(d, d.in_list("e.ingest_src{C}"), with_results, executed)
        params: tuple = (d.listed(wanted),)
    else:
        sql = _cells_sql(d, "e.ingest_src{C} >= ? AND e.ingest_src{C} < ?", with_results, executed)
        params = OURS
    for row in store.each(sql, params):
        yield _cell(row)


def newest(store: StateBackend, limit: int) -> list[str]:
    """The ``ingest_src`` of the *limit* cells with the newest transitions,
    newest first: a walk back along the store order, in growing windows,
    until it has them, then cells that never ran, if there is room."""
    out: dict[str, None] = {}
    window = max(4 * limit, 64)
    while True:
        # The entry looked up per transition (NULL: not one of ours), not
        # joined: for a join, SQLite builds a Bloom filter over every entry
        # first (30 ms at 100,000 cells, for a screenful).
        found = store.query(
            """SELECT (SELECT e.ingest_src FROM {orchestration_session_entry} AS e
                       WHERE e.orchestration_session_entry_id = {entry}
                         AND e.ingest_src{C} >= ? AND e.ingest_src{C} < ?)
               FROM {states} ORDER BY {seq} DESC LIMIT ?""",
            (*OURS, window),
        )
        for (src,) in found:
            if src is None:
                continue
            out.setdefault(src)
            if len(out) >= limit:
                return list(out)
        if len(found) < window:
            break
        window *= 8
    if len(out) < limit:  # entries without a transition
        for (src,) in store.query(
            """SELECT e.ingest_src FROM {orchestration_session_entry} AS e
                WHERE e.ingest_src{C} >= ? AND e.ingest_src{C} < ?
                  AND NOT EXISTS (SELECT 1 FROM {orchestration_session_state} AS s
                                  WHERE s.session_entry_id = e.orchestration_session_entry_id)
                LIMIT ?""",
            (*OURS, limit - len(out)),
        ):
            out.setdefault(src)
    return list(out)[:limit]


def keys(store: StateBackend) -> list[tuple[str, str | None, str | None]]:
    """``(ingest_src, key, name)`` of every cell's entries: what a key
    prefix or a ``--name`` is matched against."""
    d = store.dialect
    return store.query(
        f"""SELECT e.ingest_src, {d.json_text('e.elaboration', 'key')}, {d.json_text('e.elaboration', 'name')}
            FROM {{orchestration_session_entry}} AS e WHERE e.ingest_src{{C}} >= ? AND e.ingest_src{{C}} < ?""",
        OURS,
    )


def history(store: StateBackend, cell: CellRow) -> list[HistoryRow]:
    """Every transition of *cell* (all its entries), in store order."""
    d = store.dialect
    path = lambda name: FIELD_PATHS[name]  # noqa: E731
    found = store.query(
        f"""SELECT s.orchestration_session_state_id, s.from_state, s.to_state, s.transitioned_at,
                   s.transition_reason, s.session_id,
                   coalesce(dv.name, {d.json_text('s.transition_result', *path('host'))}),
                   {d.json_number('s.transition_result', *path('duration_s'))},
                   {d.json_text('s.transition_result', *path('ename'))},
                   {d.json_text('s.transition_result', *path('evalue'))}, h.hits
            FROM {{states}}
            LEFT JOIN {{orchestration_session}} AS o ON o.orchestration_session_id = s.session_id
            LEFT JOIN {{device}} AS dv ON dv.device_id = o.device_id
            LEFT JOIN {{rssd_magic_hit}} AS h ON h.state_id = s.orchestration_session_state_id
            WHERE {{entry}} IN ({ENTRIES})
            ORDER BY {{seq}}""",
        (cell.ingest_src,),
    )
    out = []
    for sid, frm, to, at, reason, session, host, duration, ename, evalue, hits in found:
        error = None if ename is None else {"ename": str(ename), "evalue": str(evalue) if evalue is not None else ""}
        hits = int(hits) if hits is not None else None
        out.append(HistoryRow(sid, frm, to, at, reason, session, _text(host), _number(duration), hits, error))
    return out


def result_of(store: StateBackend, state_id: str) -> str | None:
    """The ``transition_result`` text of one transition."""
    found = store.query(
        "SELECT transition_result FROM {orchestration_session_state} WHERE orchestration_session_state_id = ?",
        (state_id,),
    )
    return found[0][0] if found else None


# -- counting -----------------------------------------------------------------------------


def counts(store: StateBackend) -> Counts:
    """What ``stats`` counts, and the blobs gc would free, in one consistent
    read: the tally's sums (tally.py; counted from the records when it
    can't be used), then the blobs."""

    def read(t: Tx) -> Counts:
        sums, keep = tally.read(t), None
        if sums is None:
            sums, named = tally.count_all(t)
            keep = set().union(*named.values())
        out = Counts(**vars(sums))
        out.saved_s = round(sums.saved_s, 6)
        out.blobs, out.blob_bytes = (int(v) for v in t.one("SELECT count(*), coalesce(sum(size), 0) FROM {rssd_magic_blob}"))
        out.garbage = sum(unnamed(t, store, keep), [])
        return out

    return store.read(read)


# -- blobs the records name -------------------------------------------------------------------


def unnamed(
    t: Tx, store: StateBackend, keep: set[str] | None = None
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """``(digest, size)`` of the blobs no current record names, and of what
    writes cut short left that none names: by the tally's refs (one
    anti-join in the store, however many cells name the rest), or, given
    *keep* (what the records name, read from them), all but those."""
    if keep is not None:
        stored, partial = store.blobs.listing(t)
        return ([(dg, int(s or 0)) for dg, s in stored if dg not in keep],
                [(dg, int(s or 0)) for dg, s in partial if dg not in keep])  # fmt: skip
    rows = t.all("""SELECT b.digest, b.size FROM {rssd_magic_blob} AS b
                    WHERE NOT EXISTS (SELECT 1 FROM {rssd_magic_ref} AS r WHERE r.digest = b.digest)""")
    partial = store.blobs.partial(t)
    if partial:
        named = {dg for (dg,) in t.all("SELECT digest FROM {rssd_magic_ref} WHERE " + t.d.in_list("digest"),
                                       (t.d.listed(dg for dg, _ in partial),))}  # fmt: skip
        partial = [(dg, s) for dg, s in partial if dg not in named]
    return [(dg, int(s or 0)) for dg, s in rows], [(dg, int(s or 0)) for dg, s in partial]


def referenced(t: Tx, digests_of: Callable[[str], set[str]] | None = None) -> set[str]:
    """The blobs the current EXECUTED records name.  Without *digests_of*,
    only records whose text can name one are read (record.blob_markers)."""
    d = t.d
    if digests_of is None:
        where, params, digests_of = tally.marked(d), (*blob_markers(), *OURS), digests_in
    else:
        where, params = "l.to_state = 'EXECUTED'", OURS
    out: set[str] = set()
    for (text,) in t.all(f"SELECT CASE WHEN {where} THEN l.transition_result END FROM {tally.latest_per_cell(d, 'e.ingest_src')}",
                         params):  # fmt: skip
        if text:
            out |= digests_of(text)
    return out


def bucket_refs(store: StateBackend) -> dict[str, set[str]]:
    """``{bucket URL: blobs}``: every blob any EXECUTED record that names a
    bucket (``blob_store``) ever named there, current or not.  A bucket's
    gc sweeps only what this store wrote there (buckets.py)."""

    return store.read(tally.buckets_named)


def buckets(store: StateBackend) -> set[str]:
    """The buckets EXECUTED records ever named (the tally's, when current)."""

    def read(t: Tx) -> set[str]:
        sums = tally.read(t)
        return sums.buckets if sums is not None else set(tally.buckets_named(t))

    return store.read(read)


def gc(
    store: StateBackend, digests_of: Callable[[str], set[str]] | None = None, dry_run: bool = False,
    named: set[str] | None = None, buckets: set[str] | None = None,
) -> tuple[list[tuple[str, int]], int, int]:
    """Blobs no current EXECUTED record names, deleted (unless *dry_run*) in
    the transaction that found them: a kernel finishing a run at the same
    moment can't lose a blob it just named (it checks its blobs again
    inside its own transaction, and a store whose writers don't exclude
    each other takes its blob lock: ``blobs.exclusive``).  Returns
    ``(deleted [(digest, size)], kept, kept_bytes)``; what a write cut
    short left (SQLite's chunks without their blob row) counts as one
    blob per digest.  *named*, when given, receives what the current
    records name (a bucket's sweep keeps the same: sweep.py); *buckets*
    the buckets records ever named (:func:`buckets`, read alike)."""

    def work(t: Tx, _retrying: bool = False) -> tuple[list[tuple[str, int]], int, int]:
        if not dry_run:
            store.blobs.exclusive(t)
        sums = tally.read(t) if digests_of is None else None
        current = sums is not None
        if buckets is not None:
            buckets.update(sums.buckets if sums is not None else tally.buckets_named(t))
        if dry_run and current:  # what the records name, as the tally's refs keep it
            keep = {dg for (dg,) in t.all("SELECT DISTINCT digest FROM {rssd_magic_ref}")} if named is not None else set()
            rows, partial = unnamed(t, store)
        else:
            keep = referenced(t, digests_of)  # a deletion is decided from the records themselves
            if not dry_run and digests_of is None and not current:
                tally.rebuild(t)  # rows came that no tally counted: gc reads every record anyway
            rows, partial = unnamed(t, store, keep)
        if named is not None:
            named.clear()
            named.update(keep)
        if not dry_run and rows + partial:
            store.blobs.drop(t, [d for d, _ in rows + partial])
        kept, kept_bytes = t.one("SELECT count(*), coalesce(sum(size), 0) FROM {rssd_magic_blob}")
        if dry_run:
            return rows + partial, int(kept) - len(rows), int(kept_bytes) - sum(s for _, s in rows)
        return rows + partial, int(kept), int(kept_bytes)

    return store.read(work) if dry_run else store.write(work)
