"""The tally: what ``stats`` and ``gc --dry-run`` report, kept as the journal
is written, so they read a few rows however many cells a store holds.

Two derived tables of ours, written in the transaction that writes what
they count:

* ``rssd_magic_tally (shard, name, value)`` — sums: ``cells`` (cells with a
  transition), ``transitions`` and ``json_bytes`` (the UTF-8 bytes of their
  records), ``state:<S>`` (cells whose latest transition ends in S),
  ``hits`` and ``saved_s`` (replays, and replays × the record's duration),
  ``bucket:<url>`` (not zero once an EXECUTED record named that bucket).
  An append adds its delta: the transition names the state it leaves (its
  ``from_state``: the cell's latest, read under the cell's lock; INITIAL
  for a new cell).  A server's writers commit side by side, so its sums are
  spread over :attr:`Dialect.tally_shards` rows picked by entry (one row
  would be a lock every first run on a team server queues behind); an
  RSSD's writers take turns and keep one.
* ``rssd_magic_ref (digest, entry_id)`` — the blobs each cell's current
  EXECUTED record names, rewritten when its latest transition changes;
  what gc would free is one pass over an index of the blobs probing it.

On a server the sums a transaction adds are written last, in one
statement (:func:`settle`).  A transaction's cost on an RSSD: one upsert
and the page it dirties (+55-60 µs a first run, bench/bench_growth.py).

**Verified before use.**  Anyone who can write the store can append rows
that no tally counted (surveilr merging two RSSDs, a teammate's older
rssd_magic, a hand-written INSERT).  So a tally counts only once it says
it is complete (the ``built`` row :func:`replace` writes), and:

* on an RSSD, while no transition of our cells lies past ``upto`` (the
  store order of the last one counted; the writers take turns, so store
  order is commit order).  A writer that finds such rows recounts in its
  own transaction; a reader counts the old way (:func:`count_all`);
* on a server, whose writers commit out of store order, while the cell
  transitions it counted are as many as the server holds (an index-only
  count, a few ms at 100,000); otherwise readers count the old way until
  ``verify --repair`` (or gc) recounts.

gc never trusts the refs: it decides from the records themselves, in the
transaction that deletes (tables.gc).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..engine.keys import OURS
from ..engine.lifecycle import EXECUTED, INITIAL
from ..records.canonical import loads_object
from ..records.record import FIELD_PATHS, blob_markers, digests_in
from .dialect import Dialect, Tx

#: The rows a complete tally holds besides the sums.
BUILT, UPTO, SEEN = "built", "upto", "seen"
STATE, BUCKET = "state:", "bucket:"
#: ``{entry_id: digests}``: the blobs each cell's current EXECUTED record names.
Refs = dict[str, set[str]]

#: Sums added, ``upto`` moved (only from the store order just before its
#: new value: otherwise that row is left, and the statement changes one row
#: fewer) — one statement, the append's only one in the common case.
ADD = """INSERT INTO {{rssd_magic_tally}} AS x (shard, name, value) VALUES {rows}
         ON CONFLICT (shard, name) DO UPDATE
         SET value = CASE WHEN x.name = 'upto' THEN excluded.value ELSE x.value + excluded.value END
         WHERE x.name <> 'upto' OR x.value = excluded.value - 1"""
#: A transition of our cells after store order ? and before ?, looked for
#: among the rows between (few, unless surveilr wrote many since) ...
OURS_BETWEEN = """SELECT 1 FROM {states} WHERE {seq} > ? AND {seq} < ? AND EXISTS (
    SELECT 1 FROM {orchestration_session_entry} AS e
    WHERE e.orchestration_session_entry_id = s.session_entry_id AND e.ingest_src{C} >= ? AND e.ingest_src{C} < ?)
    LIMIT 1"""
#: ... or from our cells' side, one index probe each, when they are fewer.
OURS_AFTER = """SELECT 1 FROM {orchestration_session_entry} AS e
    {cross} {states} ON {entry} = e.orchestration_session_entry_id AND {seq} > ? AND {seq} < ?
    WHERE e.ingest_src{C} >= ? AND e.ingest_src{C} < ? LIMIT 1"""


@dataclass
class Sums:
    """What the tally counts (see the module)."""

    cells: int = 0
    by_state: dict[str, int] = field(default_factory=dict)
    transitions: int = 0
    json_bytes: int = 0
    hits: int = 0
    saved_s: float = 0.0
    #: The buckets EXECUTED records ever named (``blob_store``).
    buckets: set[str] = field(default_factory=set)


# -- keeping it ------------------------------------------------------------------------


def _add(t: Tx, shard: int, delta: dict[str, float]) -> bool:
    """Add *delta*'s sums (and move ``upto``); False when ``upto`` stayed.
    In a deferred transaction (a server's), only noted: :func:`settle`."""
    if t.tally is not None:
        for name, value in delta.items():
            t.tally[shard, name] = t.tally.get((shard, name), 0) + value
        return True
    return _write(t, sorted((shard, name, value) for name, value in delta.items() if value))


def _write(t: Tx, rows: list[tuple[int, str, float]]) -> bool:
    if not rows:
        return True
    cur = t.run(ADD.format(rows=", ".join(["(?, ?, ?)"] * len(rows))), [v for row in rows for v in row])
    return cur.rowcount == len(rows)


def settle(t: Tx) -> None:
    """Write what a deferred transaction noted, as its last statement.

    A server's writers commit side by side, and the rows an upsert changes
    stay locked until COMMIT.  Taken mid-transaction, in an order that
    depends on which statements each transaction runs (a claim's, the
    replay counts flushed with it, an abandoned run's), two transactions
    are one new statement away from a deadlock; taken last, in one
    statement, in one order (shard, name) for everyone, they can't
    deadlock on them, and hold them only for the COMMIT."""
    if t.tally:
        _write(t, sorted((shard, name, value) for (shard, name), value in t.tally.items() if value))
        t.tally.clear()


def _shard(d: Dialect, entry_id: str | None) -> int:
    n = d.tally_shards
    return ord(entry_id[-1]) % n if n > 1 and entry_id else 0


def _names_blobs(text: str | None) -> bool:
    return bool(text) and any(m in text for m in blob_markers())


def appended(t: Tx, entry_id: str, from_state: str, to_state: str, result_json: str | None, seq: int | None) -> bool:
    """Count the transition the journal just appended (store order *seq*),
    in its transaction.  False when rows no tally counted precede this one
    (an RSSD's): the caller recounts (:func:`rebuild`), which counts this
    row too."""
    delta: dict[str, float] = {"transitions": 1}
    if t.d.name == "sqlite":
        delta[UPTO] = int(seq or 0)
    else:
        delta[SEEN] = 1
    if result_json:
        delta["json_bytes"] = len(result_json.encode("utf-8", "surrogatepass"))
    if from_state == INITIAL:
        delta["cells"] = 1
    else:
        delta[STATE + from_state] = -1
    delta[STATE + to_state] = delta.get(STATE + to_state, 0) + 1
    if to_state == EXECUTED and result_json and '"blob_store"' in result_json:
        bucket = loads_object(result_json).get("blob_store")
        if isinstance(bucket, str):
            delta[BUCKET + bucket] = 1
    if not _add(t, _shard(t.d, entry_id), delta) and not _advance(t, int(delta[UPTO])):
        return False
    if from_state == EXECUTED:
        t.run("DELETE FROM {rssd_magic_ref} WHERE entry_id = ?", (entry_id,))
    if to_state == EXECUTED and _names_blobs(result_json):
        t.many("INSERT INTO {rssd_magic_ref} (entry_id, digest) VALUES (?, ?) ON CONFLICT DO NOTHING",
               [(entry_id, digest) for digest in sorted(digests_in(result_json))])  # fmt: skip
    return True


def _advance(t: Tx, seq: int) -> bool:
    """Move an RSSD's ``upto`` to *seq*, which :data:`ADD` did not (rows
    came between), when none of them is of our cells (surveilr's own rows
    may be); False when one is."""
    found = dict(t.all("SELECT name, value FROM {rssd_magic_tally} WHERE shard = 0 AND name IN ('upto', 'cells')"))
    if UPTO not in found or seq <= int(found[UPTO]) or _ours_between(t, int(found[UPTO]), seq, found.get("cells", 0)):
        return False
    t.run("UPDATE {rssd_magic_tally} SET value = ? WHERE shard = 0 AND name = 'upto'", (seq,))
    return True


def _ours_between(t: Tx, after: int, before: int, cells: float) -> bool:
    """Whether a transition of our cells lies strictly between two store
    orders of an RSSD: a look at the rows between, or at our cells, whichever
    are fewer (surveilr may have written a million rows since)."""
    query = OURS_BETWEEN if before - after <= max(cells, 1000) else OURS_AFTER
    return t.one(query, (after, before, *OURS)) is not None


def hits(t: Tx, counted: dict[str, int]) -> None:
    """Add replays (``{state_id: n}``, the rows ``rows.add_hits`` wrote)
    and the time they saved: n × each EXECUTED record's duration."""
    d = t.d
    durations = t.all(
        f"""SELECT s.orchestration_session_state_id, {d.json_number('s.transition_result', *FIELD_PATHS['duration_s'])}
            FROM {{orchestration_session_state}} AS s
            WHERE s.to_state = 'EXECUTED' AND {d.in_list('s.orchestration_session_state_id')}""",
        (d.listed(counted),),
    )
    n = sum(counted[sid] for sid, _ in durations)
    if n:
        saved = sum(counted[sid] * float(dur or 0) for sid, dur in durations)
        _add(t, _shard(d, min(counted)), {"hits": n, "saved_s": saved})


# -- reading it -----------------------------------------------------------------------


def read(t: Tx) -> Sums | None:
    """The sums, when the tally is complete and nothing it did not count
    has landed since (see the module); None: count the old way."""
    found: dict[str, float] = {}
    for name, value in t.all("SELECT name, sum(value) FROM {rssd_magic_tally} GROUP BY name"):
        found[name] = value
    if not found.get(BUILT) or not _current(t, found):
        return None
    out = Sums(cells=int(found.get("cells", 0)), transitions=int(found.get("transitions", 0)),
               json_bytes=int(found.get("json_bytes", 0)), hits=int(found.get("hits", 0)),
               saved_s=float(found.get("saved_s", 0.0)))  # fmt: skip
    out.by_state = {k[len(STATE):]: int(v) for k, v in sorted(found.items()) if k.startswith(STATE) and int(v)}
    out.buckets = {k[len(BUCKET):] for k, v in found.items() if k.startswith(BUCKET) and v}
    return out


def refs(t: Tx) -> Refs:
    """The refs as kept (read with :func:`read`, in its snapshot)."""
    out: Refs = {}
    for entry_id, digest in t.all("SELECT entry_id, digest FROM {rssd_magic_ref}"):
        out.setdefault(entry_id, set()).add(digest)
    return out


def _current(t: Tx, found: dict[str, float]) -> bool:
    if t.d.name == "sqlite":
        upto = int(found.get(UPTO, -1))
        (last,) = t.one("SELECT coalesce(max(rowid), 0) FROM {orchestration_session_state}")
        return last <= upto or not _ours_between(t, upto, last + 1, found.get("cells", 0))
    # Every cell transition the server holds, ours or another tool's.
    (held,) = t.one("SELECT count(*) FROM {rssd_magic_state_seq} WHERE entry_id IS NOT NULL")
    return int(held) == int(found.get(SEEN, -1))


def differences(t: Tx) -> list[str]:
    """What the tally says otherwise than a count of the records: the names
    of the sums that differ (``refs`` for the refs), or ``["not current"]``
    when it can't be used at all (``verify`` reports them)."""
    kept = read(t)
    if kept is None:
        return ["not current"]
    counted, named = count_all(t)
    out = [name for name in ("cells", "by_state", "transitions", "json_bytes", "hits", "buckets")
           if getattr(kept, name) != getattr(counted, name)]  # fmt: skip
    if abs(kept.saved_s - counted.saved_s) > 1e-6 * max(1.0, abs(counted.saved_s)):
        out.append("saved_s")
    return out + (["refs"] if refs(t) != named else [])


# -- counting from the records --------------------------------------------------------


def latest_per_cell(d: Dialect, columns: str) -> str:
    """Each of our cells (*columns* of its transitions aggregated) with its
    latest transition ``l``."""
    return f"""(SELECT {columns}, max({{seq}}) AS last
                FROM {{orchestration_session_entry}} AS e
                LEFT JOIN {{states}} ON {{entry}} = e.orchestration_session_entry_id
                WHERE e.ingest_src{{C}} >= ? AND e.ingest_src{{C}} < ?
                GROUP BY e.ingest_src) AS c
               LEFT JOIN {d.state_at('l', 'c.last')}"""


def marked(d: Dialect) -> str:
    """The latest transition ``l`` is EXECUTED and its record can name a blob."""
    return "l.to_state = 'EXECUTED' AND (" + " OR ".join([d.contains("l.transition_result")] * len(blob_markers())) + ")"


def count_all(t: Tx) -> tuple[Sums, Refs]:
    """The sums and refs read from the records themselves: one pass over
    the cells (latest states, transitions, record bytes, the records that
    can name a blob), then the replays and the buckets named."""
    d = t.d
    out, named = Sums(), {}
    per_cell = latest_per_cell(d, f"count(s.orchestration_session_state_id) AS n, sum({d.octets('s.transition_result')}) AS bytes")
    for state, transitions, json_bytes, entry_id, text in t.all(
        f"SELECT l.to_state, c.n, c.bytes, l.session_entry_id, CASE WHEN {marked(d)} THEN l.transition_result END "
        f"FROM {per_cell}",
        (*blob_markers(), *OURS),
    ):
        if state is None:
            continue  # an entry no transition followed: not a cell that ran
        out.cells += 1
        out.by_state[state] = out.by_state.get(state, 0) + 1
        out.transitions += int(transitions)
        out.json_bytes += int(json_bytes or 0)
        digests = digests_in(text) if text else set()
        if digests:
            named.setdefault(entry_id, set()).update(digests)
    duration = d.json_number("s.transition_result", *FIELD_PATHS["duration_s"])
    n, saved = t.one(
        f"""SELECT coalesce(sum(h.hits), 0), coalesce(sum(h.hits * coalesce({duration}, 0)), 0)
            FROM {{rssd_magic_hit}} AS h
            {{cross}} {{orchestration_session_state}} AS s ON s.orchestration_session_state_id = h.state_id
            WHERE s.to_state = ?""",
        (EXECUTED,),
    )
    out.hits, out.saved_s = int(n), float(saved)
    out.by_state = dict(sorted(out.by_state.items()))
    out.buckets = set(buckets_named(t))
    return out, named


def buckets_named(t: Tx) -> dict[str, set[str]]:
    """``{bucket URL: blobs}``: every blob any EXECUTED record that names a
    bucket (``blob_store``) ever named there, current or not."""
    out: dict[str, set[str]] = {}
    for (text,) in t.all(
        f"SELECT s.transition_result FROM {{states}} WHERE s.to_state = 'EXECUTED' AND {t.d.contains('s.transition_result')}",
        ('"blob_store"',),
    ):
        where = loads_object(text).get("blob_store") if text else None
        if isinstance(where, str):
            out.setdefault(where, set()).update(digests_in(text))
    return out


def rebuild(t: Tx) -> None:
    """Count from the records and make that the tally, in *t*."""
    if t.d.name != "sqlite":
        # A server's writers that added to the tally are waited for, and
        # those about to add wait for this count; it comes after the lock
        # (each statement sees what committed before it began).
        t.run("LOCK TABLE {rssd_magic_tally} IN SHARE ROW EXCLUSIVE MODE")
    replace(t, *count_all(t))


def replace(t: Tx, sums: Sums, named: Refs) -> None:
    """Make *sums* the tally (complete, counting every row there is now:
    on a server, under :func:`rebuild`'s lock)."""
    if t.tally:
        t.tally.clear()  # what this transaction added is in the count already
    t.run("DELETE FROM {rssd_magic_tally}")
    t.run("DELETE FROM {rssd_magic_ref}")
    if t.d.name == "sqlite":
        (upto,) = t.one("SELECT coalesce(max(rowid), 0) FROM {orchestration_session_state}")
        seen = 0
    else:
        upto = 0
        (seen,) = t.one("SELECT count(*) FROM {rssd_magic_state_seq} WHERE entry_id IS NOT NULL")
    values = {BUILT: 1, UPTO: upto, SEEN: seen, "cells": sums.cells, "transitions": sums.transitions,
              "json_bytes": sums.json_bytes, "hits": sums.hits, "saved_s": sums.saved_s,
              **{STATE + k: v for k, v in sums.by_state.items()}, **{BUCKET + url: 1 for url in sums.buckets}}  # fmt: skip
    t.many("INSERT INTO {rssd_magic_tally} (shard, name, value) VALUES (0, ?, ?)", list(values.items()))
    t.many("INSERT INTO {rssd_magic_ref} (entry_id, digest) VALUES (?, ?)",
           [(e, dg) for e, digests in sorted(named.items()) for dg in sorted(digests)])  # fmt: skip
