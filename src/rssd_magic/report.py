"""Inspecting and maintaining the ``%%stateful`` cells recorded in an RSSD.

Pure functions over an opened :class:`~rssd_magic.store.Store` that return
plain dicts and lists (JSON-ready), so the CLI, a notebook or a test can use
them alike.  Nothing here imports IPython.

What is read, and how:

* **Our cells** are the ``orchestration_session_entry`` rows whose
  ``ingest_src`` starts with ``rssd-magic:``, found by a range scan of the
  ``ingest_src`` index.  Entries with the same ``ingest_src`` (two RSSDs
  merged) are one cell; it was first seen with its smallest entry id.
* **A cell's state** is the ``to_state`` of its latest transition (greatest
  ULID), found through the ``(session_entry_id, state_id)`` index.
* **Maintenance never rewrites history.**  :func:`forget` appends
  ``EXECUTED → FORGOTTEN`` (the cell runs again next time, as after a
  failure); :func:`gc` deletes only rows of our own ``rssd_magic_blob`` table
  that no cell's *current* EXECUTED result refers to, in one write
  transaction (so a kernel finishing a run at the same moment can't lose a
  blob it just referenced).
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import sqlite3
from typing import Any, Iterable
from urllib.parse import unquote

from .keys import URI_PREFIX
from .store import EXECUTED, Store, has_table
from .trust import IntegrityError, Signer, sign_specs, signed_kinds

FORGOTTEN = "FORGOTTEN"

# ingest_src range of our entries: every string starting with "rssd-magic:"
# sorts in [_LO, _HI), and a range (unlike LIKE) is answered by the index.
_LO = URI_PREFIX
_HI = URI_PREFIX[:-1] + chr(ord(URI_PREFIX[-1]) + 1)

#: How many candidates an ambiguity error lists.
MAX_CANDIDATES = 10


class ReportError(Exception):
    """A request that can't be answered (unknown or ambiguous cell key)."""


# -- helpers -------------------------------------------------------------------


def _loads(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _placeholders(values: Iterable[Any]) -> str:
    return ", ".join("?" for _ in values)


def who_am_i() -> str:
    """``user@host``, for the reason of a transition the CLI writes."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


def _groups(conn: sqlite3.Connection) -> list[dict]:
    """Our entries grouped by ``ingest_src``, in first-seen order, each with
    its transition count, latest transition id and total replay hits."""
    hits_sql = (
        """(SELECT total(h.hits) FROM orchestration_session_state AS s
               JOIN rssd_magic_hit AS h ON h.state_id = s.orchestration_session_state_id
            WHERE s.session_entry_id = e.orchestration_session_entry_id)"""
        if has_table(conn, "rssd_magic_hit")
        else "0"
    )
    rows = conn.execute(
        f"""SELECT e.orchestration_session_entry_id, e.ingest_src, e.elaboration,
                   (SELECT count(*) FROM orchestration_session_state AS s
                     WHERE s.session_entry_id = e.orchestration_session_entry_id),
                   (SELECT s.orchestration_session_state_id FROM orchestration_session_state AS s
                     WHERE s.session_entry_id = e.orchestration_session_entry_id
                     ORDER BY s.orchestration_session_state_id DESC LIMIT 1),
                   {hits_sql}
            FROM orchestration_session_entry AS e
            WHERE e.ingest_src >= ? AND e.ingest_src < ?""",
        (_LO, _HI),
    ).fetchall()
    # Sorted here, not by ORDER BY: that would tempt the planner to walk the
    # whole table in primary-key order instead of the ingest_src range.
    rows.sort(key=lambda r: r[0])
    groups: dict[str, dict] = {}
    for entry_id, src, elaboration, n, latest, hits in rows:
        g = groups.get(src)
        if g is None:
            elab = _loads(elaboration)
            scope_part, _, digest = src[len(URI_PREFIX):].partition("#")
            g = groups[src] = {
                "ingest_src": src,
                "key": str(elab.get("key") or digest),
                "scope": elab.get("scope") if elab.get("scope") is not None else unquote(scope_part),
                "kind": elab.get("kind") or "code",
                "name": elab.get("name"),
                "entry_source": elab.get("source"),
                "entry_ids": [],
                "transitions": 0,
                "latest_id": None,
                "hits_total": 0,
            }
        g["entry_ids"].append(entry_id)
        g["transitions"] += n
        g["hits_total"] += int(hits or 0)
        if latest is not None and (g["latest_id"] is None or latest > g["latest_id"]):
            g["latest_id"] = latest
    return list(groups.values())


def _current(conn: sqlite3.Connection, g: dict, with_hits: bool) -> dict | None:
    """The latest transition of a group, with host/duration pulled out of
    its result by ``json_extract`` (the result itself is not loaded)."""
    if g["latest_id"] is None:
        return None
    hits = "(SELECT h.hits FROM rssd_magic_hit AS h WHERE h.state_id = s.orchestration_session_state_id)"
    row = conn.execute(
        f"""SELECT s.orchestration_session_state_id, s.session_entry_id, s.to_state,
                   s.transitioned_at,
                   json_extract(s.transition_result, '$.host'),
                   json_extract(s.transition_result, '$.duration_s'),
                   {hits if with_hits else '0'}
            FROM orchestration_session_state AS s
            WHERE s.orchestration_session_state_id = ?""",
        (g["latest_id"],),
    ).fetchone()
    state_id, entry_id, to_state, at, host, duration, hits_n = row
    return {
        "state_id": state_id,
        "entry_id": entry_id,
        "state": to_state,
        "at": at,
        "host": host,
        "duration_s": duration,
        "hits": int(hits_n or 0),
    }


def _latest_source(conn: sqlite3.Connection, g: dict) -> str | None:
    """The code of the cell's latest run (a ``--name`` cell may have been
    edited since its entry was made), else the entry's."""
    ids = g["entry_ids"]
    row = conn.execute(
        f"""SELECT json_extract(s.elaboration, '$.source') FROM orchestration_session_state AS s
            WHERE s.session_entry_id IN ({_placeholders(ids)})
              AND json_extract(s.elaboration, '$.source') IS NOT NULL
            ORDER BY s.orchestration_session_state_id DESC LIMIT 1""",
        ids,
    ).fetchone()
    return row[0] if row else g["entry_source"]


def _summary(conn: sqlite3.Connection, g: dict, with_hits: bool) -> dict:
    cur = _current(conn, g, with_hits)
    executed = cur is not None and cur["state"] == EXECUTED
    return {
        "key": g["key"],
        "name": g["name"],
        "scope": g["scope"],
        "kind": g["kind"],
        "state": cur["state"] if cur else None,
        "source": _latest_source(conn, g),
        "executed_at": cur["at"] if executed else None,
        "host": cur["host"] if executed else None,
        "duration_s": cur["duration_s"] if executed else None,
        "hits": cur["hits"] if executed else 0,
        "hits_total": g["hits_total"],
        "transitions": g["transitions"],
        "updated_at": cur["at"] if cur else None,
        "state_id": cur["state_id"] if cur else None,
        "entry_id": cur["entry_id"] if cur else g["entry_ids"][0],
        "ingest_src": g["ingest_src"],
    }


def _group(conn: sqlite3.Connection, key: str) -> dict:
    for g in _groups(conn):
        if g["key"] == key:
            return g
    raise ReportError(f"no %%stateful cell with key {key}")


# -- public API -----------------------------------------------------------------


def list_cells(store: Store) -> list[dict]:
    """Every ``%%stateful`` cell in the RSSD, in the order first seen.

    Each dict has ``key`` (64 hex), ``name`` (``--name`` or None), ``scope``,
    ``kind``, ``state`` (latest ``to_state``), ``source`` (code of the latest
    run), ``executed_at``/``host``/``duration_s``/``hits`` of the current
    EXECUTED record (None/0 when the cell is not executed), ``hits_total``
    (replays over its whole history), ``transitions`` (row count),
    ``updated_at`` and ``state_id`` of the latest transition.
    """
    conn = store.conn
    with_hits = has_table(conn, "rssd_magic_hit")
    return [_summary(conn, g, with_hits) for g in _groups(conn)]


def resolve_key(store: Store, prefix: str) -> dict:
    """The one cell whose key starts with *prefix* (case-insensitive).

    An ``rssd-magic:<scope>#<key>`` URI is accepted too; when no key matches,
    a cell whose ``--name`` equals *prefix* is.  Raises :class:`ReportError`
    listing the candidates when several cells match, or saying so when none
    does.  Returns the cell's :func:`list_cells` dict.
    """
    text = (prefix or "").strip()
    if text.startswith(URI_PREFIX) and "#" in text:
        text = text.rpartition("#")[2]
    if not text:
        raise ReportError("empty cell key: give a key prefix (see `rssd-magic list`)")
    conn = store.conn
    groups = _groups(conn)
    wanted = text.lower()
    matches = [g for g in groups if g["key"].lower().startswith(wanted)]
    how = f"key prefix {text!r}"
    if not matches:
        matches = [g for g in groups if g["name"] is not None and g["name"] == text]
        how = f"name {text!r}"
    if not matches:
        raise ReportError(f"no %%stateful cell has a key starting with {text!r} (see `rssd-magic list`)")
    if len(matches) > 1:
        shown = "; ".join(_describe(g) for g in matches[:MAX_CANDIDATES])
        more = f"; and {len(matches) - MAX_CANDIDATES} more" if len(matches) > MAX_CANDIDATES else ""
        raise ReportError(
            f"{how} is ambiguous: it matches {len(matches)} cells: {shown}{more}; give more characters"
        )
    return _summary(conn, matches[0], has_table(conn, "rssd_magic_hit"))


def _describe(g: dict) -> str:
    label = f"--name {g['name']}" if g["name"] is not None else first_line(g["entry_source"] or "", 30)
    return f"{g['key'][:12]} ({label}, scope {g['scope']})"


def first_line(source: str, width: int = 40) -> str:
    """The first non-blank line of *source*, shortened to *width* characters."""
    line = next((ln.strip() for ln in source.splitlines() if ln.strip()), "")
    return line if len(line) <= width else line[: max(width - 1, 0)] + "…"


def show_cell(store: Store, key: str) -> dict:
    """Everything about one cell (full 64-hex *key*; see :func:`resolve_key`).

    The :func:`list_cells` fields, but ``transitions`` as a list (``id``,
    ``from``, ``to``, ``at``, ``reason``, ``session``, ``host``,
    ``duration_s``, ``hits``, ``error``; their number is
    ``transition_count``), and for an executed cell the
    ``outputs`` (nbformat) and ``names`` (name → kind/type/size) that the
    next run replays; ``outputs``/``names`` are None when nothing is
    replayable.  ``error`` is the latest failure when the cell's state is
    not EXECUTED.
    """
    conn = store.conn
    g = _group(conn, key)
    with_hits = has_table(conn, "rssd_magic_hit")
    info = _summary(conn, g, with_hits)
    ids = g["entry_ids"]
    hits = (
        "(SELECT h.hits FROM rssd_magic_hit AS h WHERE h.state_id = s.orchestration_session_state_id)"
        if with_hits
        else "NULL"
    )
    rows = conn.execute(
        f"""SELECT s.orchestration_session_state_id, s.from_state, s.to_state, s.transitioned_at,
                   s.transition_reason, s.session_id,
                   coalesce(d.name, json_extract(s.transition_result, '$.host')),
                   json_extract(s.transition_result, '$.duration_s'),
                   json_extract(s.transition_result, '$.error.ename'),
                   json_extract(s.transition_result, '$.error.evalue'),
                   {hits}
            FROM orchestration_session_state AS s
            LEFT JOIN orchestration_session AS o ON o.orchestration_session_id = s.session_id
            LEFT JOIN device AS d ON d.device_id = o.device_id
            WHERE s.session_entry_id IN ({_placeholders(ids)})
            ORDER BY s.orchestration_session_state_id""",
        ids,
    ).fetchall()
    transitions = []
    for sid, frm, to, at, reason, session, host, duration, ename, evalue, hits_n in rows:
        transitions.append(
            {
                "id": sid,
                "from": frm,
                "to": to,
                "at": at,
                "reason": reason,
                "session": session,
                "host": host,
                "duration_s": duration,
                "hits": hits_n,
                "error": None if ename is None else {"ename": ename, "evalue": evalue},
            }
        )
    info["transition_count"] = len(transitions)
    info["transitions"] = transitions
    info["outputs"] = None
    info["names"] = None
    info["error"] = None
    if info["state"] == EXECUTED:
        (text,) = conn.execute(
            "SELECT transition_result FROM orchestration_session_state WHERE orchestration_session_state_id = ?",
            (info["state_id"],),
        ).fetchone()
        result = _loads(text)
        info["outputs"] = result.get("outputs", [])
        info["names"] = {
            name: {k: spec.get(k) for k in ("kind", "type", "size", "error") if spec.get(k) is not None}
            for name, spec in (result.get("names") or {}).items()
            if isinstance(spec, dict)
        }
    else:
        failed = next((t for t in reversed(transitions) if t["error"] is not None), None)
        if failed is not None:
            (text,) = conn.execute(
                "SELECT json_extract(transition_result, '$.error') FROM orchestration_session_state "
                "WHERE orchestration_session_state_id = ?",
                (failed["id"],),
            ).fetchone()
            info["error"] = {**_loads(text), "at": failed["at"], "state": failed["to"]}
    return info


def _forget(store: Store, g: dict, who: str) -> dict | None:
    cur = _current(store.conn, g, with_hits=False)
    if cur is None or cur["state"] != EXECUTED:
        return None
    new = store.append(
        cur["entry_id"],
        EXECUTED,
        FORGOTTEN,
        result={"forgotten": cur["state_id"], "by": who},
        reason=f"forgotten by {who}",
        if_latest=cur["state_id"],
    )
    if new is None:
        return None  # a kernel re-ran it meanwhile: that newer run stands
    return {
        "key": g["key"],
        "name": g["name"],
        "scope": g["scope"],
        "from_state": EXECUTED,
        "to_state": FORGOTTEN,
        "forgotten_state_id": cur["state_id"],
        "state_id": new.state_id,
        "at": new.transitioned_at,
    }


def forget(store: Store, key: str, who: str | None = None) -> list[dict]:
    """Make an executed cell run again next time: append ``EXECUTED →
    FORGOTTEN`` (reason ``forgotten by <who>``).  History is kept.  Returns
    what was forgotten: one dict, or none when the cell was not EXECUTED."""
    g = _group(store.conn, key)
    done = _forget(store, g, who or who_am_i())
    return [done] if done else []


def forget_all(store: Store, who: str | None = None) -> list[dict]:
    """:func:`forget` every executed cell; returns what was forgotten."""
    who = who or who_am_i()
    out = []
    for g in _groups(store.conn):
        done = _forget(store, g, who)
        if done:
            out.append(done)
    return out


def stats(store: Store) -> dict:
    """Counts, replays, time saved and storage of the RSSD's cells.

    ``time_saved_s`` is the sum over EXECUTED records of hits × their
    ``duration_s``.  ``storage``: ``blobs``/``blob_bytes`` (our blob table),
    ``result_json_bytes`` (UTF-8 bytes of our ``transition_result`` JSON),
    ``file_bytes``/``wal_bytes`` (the file and its WAL on disk), and
    ``unreferenced_blobs``/``unreferenced_blob_bytes`` (what :func:`gc`
    would free now).
    """
    conn = store.conn
    cells = list_cells(store)
    by_state: dict[str, int] = {}
    for c in cells:
        by_state[c["state"] or "NONE"] = by_state.get(c["state"] or "NONE", 0) + 1
    transitions, json_bytes = conn.execute(
        """SELECT count(*), total(length(CAST(s.transition_result AS BLOB)))
           FROM orchestration_session_entry AS e
           JOIN orchestration_session_state AS s
             ON s.session_entry_id = e.orchestration_session_entry_id
           WHERE e.ingest_src >= ? AND e.ingest_src < ?""",
        (_LO, _HI),
    ).fetchone()
    hits, saved = 0, 0.0
    # CROSS JOIN keeps the (small) hit table outside: one PK probe per hit.
    if has_table(conn, "rssd_magic_hit"):
        hits, saved = conn.execute(
            """SELECT total(h.hits),
                      total(h.hits * coalesce(json_extract(s.transition_result, '$.duration_s'), 0))
               FROM rssd_magic_hit AS h
               CROSS JOIN orchestration_session_state AS s ON s.orchestration_session_state_id = h.state_id
               WHERE s.to_state = ?""",
            (EXECUTED,),
        ).fetchone()
    blobs, blob_bytes = 0, 0
    garbage = {"blobs": 0, "bytes": 0}
    if has_table(conn, "rssd_magic_blob"):
        blobs, blob_bytes = conn.execute("SELECT count(*), total(size) FROM rssd_magic_blob").fetchone()
        garbage = _garbage(conn)
    wal = store.path.with_name(store.path.name + "-wal")
    return {
        "path": str(store.path),
        "cells": len(cells),
        "executed": by_state.get(EXECUTED, 0),
        "by_state": by_state,
        "transitions": int(transitions),
        "hits": int(hits),
        "time_saved_s": round(float(saved), 6),
        "storage": {
            "blobs": int(blobs),
            "blob_bytes": int(blob_bytes),
            "result_json_bytes": int(json_bytes),
            "file_bytes": store.path.stat().st_size if store.path.exists() else 0,
            "wal_bytes": wal.stat().st_size if wal.exists() else 0,
            "unreferenced_blobs": garbage["blobs"],
            "unreferenced_blob_bytes": garbage["bytes"],
        },
    }


# -- garbage collection ----------------------------------------------------------

_DIGEST_FIELDS = ("blob", "blobs", "buffers")


def _collect_digests(node: Any, out: set[str]) -> None:
    """Every string under a ``blob``/``blobs``/``buffers`` key, anywhere."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in _DIGEST_FIELDS:
                if isinstance(v, str):
                    out.add(v)
                elif isinstance(v, list):
                    out.update(x for x in v if isinstance(x, str))
            _collect_digests(v, out)
    elif isinstance(node, list):
        for v in node:
            _collect_digests(v, out)


def _current_results(conn: sqlite3.Connection) -> Iterable[tuple[dict, dict]]:
    """``(group, parsed result)`` for every cell whose state is EXECUTED."""
    for g in _groups(conn):
        if g["latest_id"] is None:
            continue
        row = conn.execute(
            """SELECT transition_result FROM orchestration_session_state
               WHERE orchestration_session_state_id = ? AND to_state = ?""",
            (g["latest_id"], EXECUTED),
        ).fetchone()
        if row and row[0]:
            try:
                result = json.loads(row[0])
            except ValueError:
                continue
            if isinstance(result, dict):
                yield g, result


def referenced_digests(conn: sqlite3.Connection) -> set[str]:
    """Blob digests referenced by the current EXECUTED result of any cell."""
    out: set[str] = set()
    for _, result in _current_results(conn):
        _collect_digests(result, out)
    return out


def trust(store: Store, signer: Signer) -> dict:
    """Sign with *signer* every payload of every current EXECUTED result whose
    blobs are intact: the user's decision to trust this RSSD, recorded as
    signature rows of their key (other keys' rows are left as they are).

    Returns ``signed`` (payloads), ``cells`` and ``refused``: the names whose
    blobs are missing or don't match their digests, which stay untrusted.
    """
    rows: list[tuple[str, str, str]] = []
    refused: list[dict] = []
    cells = 0
    for g, result in _current_results(store.conn):
        names = result.get("names")
        if not isinstance(names, dict):
            continue
        names = {**names, "(result)": result.get("result_value")}
        cells += 1
        for name, spec in names.items():
            if not signed_kinds(spec):
                continue
            digests: set[str] = set()
            _collect_digests(spec, digests)
            try:
                for digest in digests:
                    store.get_blob(digest)  # reads and checks the digest
            except (KeyError, IntegrityError) as exc:
                why = "a blob is missing" if isinstance(exc, KeyError) else str(exc)
                refused.append({"key": g["key"], "name": name, "why": why})
                continue
            rows += sign_specs(signer, {name: spec})
    with store.transaction() as c:
        store.add_signatures(rows, c)
    return {"signed": len(rows), "cells": cells, "refused": refused, "key_id": signer.key_id}


def _garbage_rows(conn: sqlite3.Connection) -> list[tuple[str, int]]:
    keep = referenced_digests(conn)
    return [
        (digest, size)
        for digest, size in conn.execute("SELECT digest, size FROM rssd_magic_blob")
        if digest not in keep
    ]


def _garbage(conn: sqlite3.Connection) -> dict:
    rows = _garbage_rows(conn)
    return {"blobs": len(rows), "bytes": sum(int(s or 0) for _, s in rows)}


def gc(store: Store, dry_run: bool = False) -> dict:
    """Delete the blobs no cell's current EXECUTED result refers to.

    Reading the references and deleting happen in one ``BEGIN IMMEDIATE``
    transaction.  Only ``rssd_magic_blob`` rows are deleted.  Returns
    ``deleted`` (count), ``bytes_freed``, ``kept`` and ``kept_bytes``; with
    *dry_run*, nothing is deleted (and the store may be read-only).
    """
    conn = store.conn
    if not has_table(conn, "rssd_magic_blob"):
        return {"deleted": 0, "bytes_freed": 0, "kept": 0, "kept_bytes": 0, "dry_run": dry_run}
    if dry_run:
        conn.execute("BEGIN")  # one consistent snapshot, no write lock
        try:
            doomed = _garbage_rows(conn)
            kept, kept_bytes = conn.execute("SELECT count(*), total(size) FROM rssd_magic_blob").fetchone()
        finally:
            conn.execute("ROLLBACK")
    else:
        with store.transaction() as c:
            doomed = _garbage_rows(c)
            c.executemany("DELETE FROM rssd_magic_blob WHERE digest = ?", [(d,) for d, _ in doomed])
            kept, kept_bytes = c.execute("SELECT count(*), total(size) FROM rssd_magic_blob").fetchone()
    freed = sum(int(s or 0) for _, s in doomed)
    if dry_run:
        kept, kept_bytes = kept - len(doomed), kept_bytes - freed
    return {
        "deleted": len(doomed),
        "bytes_freed": freed,
        "kept": int(kept),
        "kept_bytes": int(kept_bytes),
        "dry_run": dry_run,
    }
