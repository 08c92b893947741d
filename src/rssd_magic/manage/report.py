"""Inspecting and maintaining the ``%%stateful`` cells of a state store.

Functions over an opened backend that return plain dicts and lists
(JSON-ready), so the command layer and tests use them alike.  They ask
tables.py for rows (one text of each query, for every store) and records
for their fields (record.py): no SQL here, and no knowledge of where a
record keeps what.

Maintenance never rewrites history: :func:`forget` appends
``EXECUTED → FORGOTTEN`` (the cell runs again next time, as after a
failure), only while that run is still the cell's latest; :func:`gc`
deletes only blobs of our own that no cell's *current* EXECUTED record
refers to, deciding and deleting in one write transaction.
"""

from __future__ import annotations

import getpass
import math
import os
import socket
from urllib.parse import unquote

from typing import Iterator

from ..store import tables, tally
from ..store.base import StoreError
from ..store.journal import StateBackend
from ..records.canonical import dumps
from ..engine.keys import URI_PREFIX
from ..engine.lifecycle import EXECUTED, FORGOTTEN
from ..records.record import RESULT_VALUE, RecordError, RunRecord, digests_in
from ..records.serialize import spec_blobs
from ..store.tables import CellRow
from ..records.trust import Signer
from . import sweep
from .trusting import review, sign

#: How many candidates an ambiguity error lists.
MAX_CANDIDATES = 10


class ReportError(Exception):
    """A request that can't be answered (unknown or ambiguous cell key)."""


def who_am_i() -> str:
    """``user@host``, for the reason of a transition the CLI writes."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


def first_line(source: str, width: int = 40) -> str:
    """The first line of *source* that says something — not blank, not a
    comment, not an import — shortened to *width* characters (the first
    non-blank line when every line is one of those)."""
    lines = [ln.strip() for ln in source.splitlines() if ln.strip()]
    telling = [ln for ln in lines if not ln.startswith(("#", "import ", "from ", "%%", "--"))]
    line = (telling or lines or [""])[0]
    return line if len(line) <= width else line[: max(width - 1, 0)] + "…"


def label_of(cell: dict, width: int = 40) -> str:
    """What a listing shows for a cell: its ``--name``, else the first line
    of its code that says something."""
    if cell.get("name") is not None:
        return f"--name {cell['name']}"[:width]
    return first_line(cell.get("source") or "", width)


def _key_of(ingest_src: str, key: str | None) -> str:
    return str(key or ingest_src[len(URI_PREFIX) :].partition("#")[2])


def _key(cell: CellRow) -> str:
    return _key_of(cell.ingest_src, cell.elaboration.get("key"))


def _scope(cell: CellRow) -> str:
    scope = cell.elaboration.get("scope")
    return scope if isinstance(scope, str) else unquote(cell.ingest_src[len(URI_PREFIX) :].partition("#")[0])


def _summary(cell: CellRow) -> dict:
    latest = cell.latest
    executed = latest is not None and latest.to_state == EXECUTED
    name = cell.elaboration.get("name")
    return {
        "key": _key(cell),
        "name": name if isinstance(name, str) else None,
        "scope": _scope(cell),
        "kind": cell.elaboration.get("kind") or "code",
        "state": latest.to_state if latest else None,
        "source": cell.source,
        "executed_at": latest.transitioned_at if executed else None,
        "host": cell.latest_host if executed else None,
        "duration_s": _finite(cell.latest_duration_s) if executed else None,
        "hits": cell.latest_hits if executed else 0,
        "hits_total": cell.hits_total,
        "transitions": cell.transitions,
        "updated_at": latest.transitioned_at if latest else None,
        "state_id": latest.state_id if latest else None,
        "entry_id": latest.entry_id if latest else cell.entry_id,
        "ingest_src": cell.ingest_src,
    }


def iter_cells(backend: StateBackend, limit: int | None = None) -> Iterator[dict]:
    """The ``%%stateful`` cells, newest first (by their latest transition),
    streamed: the *limit* newest, or all of them.

    Each dict has ``key`` (64 hex), ``name`` (``--name`` or None), ``scope``,
    ``kind``, ``state`` (latest ``to_state``), ``source`` (code of the latest
    run), ``executed_at``/``host``/``duration_s``/``hits`` of the current
    EXECUTED record (None/0 when the cell is not executed), ``hits_total``
    (replays over its whole history), ``transitions`` (row count),
    ``updated_at`` and ``state_id`` of the latest transition.
    """
    return (_summary(c) for c in tables.cells(backend, limit=limit))


def list_cells(backend: StateBackend, limit: int | None = None) -> list[dict]:
    """:func:`iter_cells` as a list."""
    return list(iter_cells(backend, limit))


def _find(backend: StateBackend, prefix: str, prog: str = "rssd-magic") -> CellRow:
    text = (prefix or "").strip()
    if text.startswith(URI_PREFIX) and "#" in text:
        text = text.rpartition("#")[2]
    if not text:
        raise ReportError(f"empty cell key: give a key prefix (see `{prog} list`)")
    entries = tables.keys(backend)
    wanted = text.lower()
    matches = list(dict.fromkeys(src for src, key, _ in entries if _key_of(src, key).lower().startswith(wanted)))
    how = f"key prefix {text!r}"
    if not matches:
        matches = list(dict.fromkeys(src for src, _, name in entries if name == text))
        how = f"name {text!r}"
    if not matches:
        raise ReportError(f"no %%stateful cell has a key starting with {text!r} or that --name (see `{prog} list`)")
    if len(matches) > 1:
        shown = "; ".join(_describe(c) for c in tables.cells(backend, srcs=matches[:MAX_CANDIDATES]))
        more = f"; and {len(matches) - MAX_CANDIDATES} more" if len(matches) > MAX_CANDIDATES else ""
        raise ReportError(f"{how} is ambiguous: it matches {len(matches)} cells: {shown}{more}; give more characters")
    (cell,) = tables.cells(backend, srcs=matches, with_results=True)
    return cell


def resolve_key(backend: StateBackend, prefix: str, prog: str = "rssd-magic") -> dict:
    """The one cell whose key starts with *prefix* (case-insensitive).

    An ``rssd-magic:<scope>#<key>`` URI is accepted too; when no key matches,
    a cell whose ``--name`` equals *prefix* is.  Raises :class:`ReportError`
    listing the candidates when several cells match, or saying so when none
    does.  Returns the cell's :func:`list_cells` dict.
    """
    return _summary(_find(backend, prefix, prog))


def _describe(cell: CellRow) -> str:
    name = cell.elaboration.get("name")
    label = f"--name {name}" if name is not None else first_line(cell.source or cell.elaboration.get("source") or "", 30)
    return f"{_key(cell)[:12]} ({label}, scope {_scope(cell)})"


def show_cell(backend: StateBackend, key: str) -> dict:
    """Everything about one cell (full 64-hex *key*; see :func:`resolve_key`).

    The :func:`list_cells` fields, but ``transitions`` as a list (``id``,
    ``from``, ``to``, ``at``, ``reason``, ``session``, ``host``,
    ``duration_s``, ``hits``, ``error``; their number is
    ``transition_count``), and for an executed cell the ``outputs``
    (nbformat) and ``names`` (name → kind/type/size) that the next run
    replays; ``outputs``/``names`` are None when nothing is replayable.
    ``error`` is the latest failure when the cell's state is not EXECUTED.
    """
    cell = _find(backend, key)
    info = _summary(cell)
    transitions = [
        {
            "id": h.id,
            "from": h.from_state,
            "to": h.to_state,
            "at": h.at,
            "reason": h.reason,
            "session": h.session,
            "host": h.host,
            "duration_s": _finite(h.duration_s),
            "hits": h.hits,
            "error": h.error,
        }
        for h in tables.history(backend, cell)
    ]
    info.update(transition_count=len(transitions), transitions=transitions, outputs=None, names=None, error=None)
    if info["state"] == EXECUTED:
        record = _record(cell.latest.result_json)
        info["outputs"] = record.outputs
        info["names"] = {
            name: {k: spec.get(k) for k in ("kind", "type", "size", "error") if spec.get(k) is not None}
            for name, spec in record.names.items()
        }
    else:
        failed = next((t for t in reversed(transitions) if t["error"] is not None), None)
        if failed is not None:
            error = _record(tables.result_of(backend, failed["id"])).error or {}
            info["error"] = {**error, "at": failed["at"], "state": failed["to"]}
    return info


def _finite(value: object) -> float | None:
    """A number the store pulled out of a record with SQL (so nobody checked
    it): None unless it is a finite one.  ``1e400`` in a record another tool
    wrote reads back as infinity, which neither the text tables nor JSON can
    show."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return value if math.isfinite(value) else None
    except OverflowError:  # an int too large for a float
        return None


def _record(text: str | None) -> RunRecord:
    """A record for reading only: an unreadable one reads as empty."""
    try:
        return RunRecord.from_json(text)
    except RecordError:
        return RunRecord()


def _forget(backend: StateBackend, cell: CellRow, who: str, why: str | None = None) -> dict | None:
    latest = cell.latest
    if latest is None or latest.to_state != EXECUTED:
        return None
    new = backend.append_if_latest(
        latest.entry_id,
        EXECUTED,
        FORGOTTEN,
        dumps({"forgotten": latest.state_id, "by": who}),
        why or f"forgotten by {who}",
        if_latest=latest.state_id,
    )
    if new is None:
        return None  # a kernel re-ran it meanwhile: that newer run stands
    return {
        "key": _key(cell),
        "name": cell.elaboration.get("name"),
        "scope": _scope(cell),
        "from_state": EXECUTED,
        "to_state": FORGOTTEN,
        "forgotten_state_id": latest.state_id,
        "state_id": new.state_id,
        "at": new.transitioned_at,
    }


def forget(backend: StateBackend, key: str, who: str | None = None) -> list[dict]:
    """Make an executed cell run again next time: append ``EXECUTED →
    FORGOTTEN`` (reason ``forgotten by <who>``).  History is kept.  Returns
    what was forgotten: one dict, or none when the cell was not EXECUTED."""
    done = _forget(backend, _find(backend, key), who or who_am_i())
    return [done] if done else []


def forget_all(backend: StateBackend, who: str | None = None) -> list[dict]:
    """:func:`forget` every executed cell; returns what was forgotten."""
    who = who or who_am_i()
    executed = list(tables.cells(backend, executed=True))  # read whole before writing
    return [d for d in (_forget(backend, c, who) for c in executed) if d]


def stats(backend: StateBackend) -> dict:
    """Counts, replays, time saved and storage of the store's cells.

    ``time_saved_s`` is the sum over EXECUTED records of hits × their
    ``duration_s``.  ``storage``: ``blobs``/``blob_bytes`` (our blob table),
    ``result_json_bytes`` (UTF-8 bytes of our ``transition_result`` JSON),
    ``file_bytes``/``wal_bytes`` (the file and its WAL on disk, SQLite), and
    ``unreferenced_blobs``/``unreferenced_blob_bytes`` (what :func:`gc`
    would free now).
    """
    c = tables.counts(backend)
    garbage = c.garbage
    file_bytes, wal_bytes, extra = backend.footprint()
    return {
        "path": backend.location,
        "cells": c.cells,
        "executed": c.by_state.get(EXECUTED, 0),
        "by_state": c.by_state,
        "transitions": c.transitions,
        "hits": c.hits,
        "time_saved_s": _finite(c.saved_s) or 0.0,
        "storage": {
            "blobs": c.blobs,
            "blob_bytes": c.blob_bytes,
            "result_json_bytes": c.json_bytes,
            "file_bytes": file_bytes,
            "wal_bytes": wal_bytes,
            "unreferenced_blobs": len(garbage),
            "unreferenced_blob_bytes": sum(size for _, size in garbage),
            **extra,
        },
    }


#: The blobs a stored record refers to (none for an unreadable one).
digests_of = digests_in


def gc(backend: StateBackend, dry_run: bool = False, grace_s: float = sweep.DEFAULT_GRACE_S,
       bucket: str | None = None) -> dict:  # fmt: skip
    """Delete the blobs no cell's current EXECUTED record refers to, in the
    store and in *bucket*, the one large values go to (sweep.py: objects
    older than *grace_s* that this store wrote).

    Returns ``deleted`` (count), ``bytes_freed``, ``kept`` and
    ``kept_bytes`` for the store, and ``buckets`` (see sweep.sweep); with
    *dry_run*, nothing is deleted (and the store may be read-only)."""
    named: set[str] | None = set() if bucket else None  # what a bucket's sweep keeps
    buckets: set[str] = set()
    doomed, kept, kept_bytes = tables.gc(backend, dry_run=dry_run, named=named, buckets=buckets)
    return {
        "deleted": len(doomed),
        "bytes_freed": sum(size for _, size in doomed),
        "kept": kept,
        "kept_bytes": kept_bytes,
        "dry_run": dry_run,
        "buckets": sweep.sweep(backend, bucket, grace_s, dry_run, keep=named, named=buckets),
    }


def verify(backend: StateBackend, repair: bool = False) -> dict:
    """Check the bytes of every blob the current EXECUTED records name
    (each read back from the store, or the bucket its record names, and
    hashed: a row or an object is never trusted for being there).

    Returns ``checked`` (blobs), ``bytes`` (their stored sizes), ``records``
    (current records seen), ``bad``: ``{digest, why, cells: [{key, name}]}``
    for each blob missing or holding other bytes, ``unchecked``: ``{digest,
    why}`` for each blob in a bucket that could not be asked, and
    ``repaired``.  With
    *repair*, bad blobs are deleted and the cells naming them forgotten
    (``EXECUTED → FORGOTTEN``): they run again next time, instead of
    replaying without their values.  ``forgotten`` lists those cells.
    ``tally``: ``differs``, the sums ``stats`` reads that a count of the
    records does not confirm (store/tally.py), and ``recounted`` (with
    *repair*, when any differed).
    """
    users: dict[str, list[tuple[CellRow, str]]] = {}
    where: dict[str, str | None] = {}  # the bucket a record names for the blob, if any
    records = 0
    for cell in list(tables.cells(backend, executed=True, with_results=True)):
        if not cell.latest.result_json:
            continue
        records += 1
        record = _record(cell.latest.result_json)
        for name, spec in record.specs().items():
            for digest in spec_blobs(spec):
                users.setdefault(digest, []).append((cell, "(result)" if name == RESULT_VALUE else name))
                where.setdefault(digest, record.blob_store)
    sizes = backend.blobs.sizes()
    bad, unchecked = [], []
    for digest, named_by in users.items():
        try:
            why = sweep.check(backend, digest, where[digest])
        except StoreError as exc:  # a bucket out of reach: nothing known, nothing repaired
            unchecked.append({"digest": digest, "why": str(exc)})
            continue
        if why is not None:
            cells = [{"key": _key(c), "name": name} for c, name in named_by]
            bad.append({"digest": digest, "why": why, "cells": cells, "_rows": named_by})
    forgotten: list[dict] = []
    if repair and bad:
        backend.blobs.delete([b["digest"] for b in bad if b["why"] != "missing"])
        who = who_am_i()
        seen: set[str] = set()
        for b in bad:
            for cell, _ in b["_rows"]:
                if cell.ingest_src not in seen:
                    seen.add(cell.ingest_src)
                    done = _forget(backend, cell, who, f"verify --repair by {who}: blob {b['digest'][:24]}… {b['why']}")
                    if done:
                        forgotten.append(done)
    for b in bad:
        del b["_rows"]
    differs = backend.read(tally.differences)
    if repair and differs:
        backend.write(lambda t, _retrying: tally.rebuild(t))
    return {
        "tally": {"differs": differs, "recounted": bool(repair and differs)},
        "checked": len(users),
        "bytes": sum(sizes.get(d, 0) for d in users),
        "records": records,
        "bad": bad,
        "unchecked": unchecked,
        "repaired": bool(repair and bad),
        "forgotten": forgotten,
    }


def trust_preview(backend: StateBackend, signer: Signer, key: str | None = None, by: str | None = None) -> dict:
    """What ``trust`` would sign, and what each record would make active
    once trusted (trusting.py): the current EXECUTED records no trusted key
    signed — or only the cell *key* (a key prefix or ``--name``), or only
    the records the key *by* signed (a trusted signer's name or any key's
    fingerprint).  Nothing is written.

    Returns ``records`` (each: ``key``, ``name``, ``signer``, ``signature``
    (why it doesn't act now), ``host``, ``names``, ``pickled`` (types),
    ``modules``, ``active`` (MIME types), ``refused`` (``{name, why}`` or
    None)), ``cells`` (current records considered), ``already`` (of those,
    the ones that act already) and ``key_id`` (the key that would sign).
    """
    found = _review(backend, signer, key, by)
    return {"records": found.records, "cells": found.cells, "already": found.already, "key_id": signer.key_id}


def trust(backend: StateBackend, signer: Signer, key: str | None = None, by: str | None = None) -> dict:
    """Sign with the person's own key the records :func:`trust_preview`
    lists (the adapters show the preview and ask first): the user's
    decision that they may act, recorded as one signature row of their key
    per record (other keys' rows are left).

    Returns the preview's fields plus ``signed`` (records signed) and
    ``refused`` (``{key, name, why}`` of each record left untrusted).
    """
    found = _review(backend, signer, key, by)
    rows = sign(backend, signer, found)
    return {
        "records": found.records, "cells": found.cells, "already": found.already, "key_id": signer.key_id,
        "signed": len(rows), "refused": found.refused,
    }  # fmt: skip


def _review(backend: StateBackend, signer: Signer, key: str | None, by: str | None):
    signer.refresh()  # the trusted signers as they are now
    cell = _find(backend, key).ingest_src if key else None
    return review(backend, signer, cell, signer.resolve(by) if by else None)


__all__ = [
    "ReportError",
    "digests_of",
    "first_line",
    "forget",
    "forget_all",
    "gc",
    "list_cells",
    "resolve_key",
    "show_cell",
    "stats",
    "trust",
    "verify",
    "trust_preview",
    "who_am_i",
]
