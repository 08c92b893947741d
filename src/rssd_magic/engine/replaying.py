"""Replaying a recorded run: what a later run of an EXECUTED cell shows and
binds.  Engine, no IPython: the shell is reached through the runner's port.

The order of a replay, each step from a way an earlier version failed:

1. parse the record and check every field (record.py), one line naming the
   record when anything is off — never a traceback from another tool's row;
2. check its signature rows — every key's, in one lookup — against the
   keys the user trusts (trust.py, keyring.py), before anything of it is
   used: a record no trusted key signed shows its text and raster images,
   marked untrusted, binds nothing, imports nothing, and one line names
   its signer and the narrow command that would trust it
   (:meth:`Replayer._unsigned`);
3. bind only the names the cell's own code binds, deletes or read and
   changed in place (bindable.py), never builtins, dunders or the shell's;
4. show the outputs in the order they were shown, the result at its place.

Parsing and the payload id are memoized per stored text and cell (a
notebook replays the same cells again and again), and so is a good
verdict per payload id: the id covers the exact text and cell, so a later
change to a signature row can't un-sign what was read.  A good verdict
lasts only as long as the keys that gave it: when the trusted signers
change (a revocation), every cached verdict is dropped (keyring.py).
"""

from __future__ import annotations

import html
import os
import shlex
from typing import Any, Callable

from ..store.locations import redact, resolve_location
from ..store import buckets
from ..store.base import Transition
from ..store.journal import StateBackend
from .bindable import why_not
from ..records.canonical import fmt_duration, printable
from ..output.capture import ReplayedResult, replay
from ..deps import is_shell_name
from .keys import CellKey
from .ports import Config, ShellPort
from ..records.record import RecordError, RunRecord
from .runs import StatefulRunError
from ..records.serialize import load_names, load_value, spec_blobs
from ..records.trust import Verdict, inert_outputs, payload_id

#: Records parsed and kept per kernel, and the largest stored text kept.
MEMO_RECORDS = 128
MEMO_TEXT_MAX = 256 * 1024


class Replayer:
    """Replays records for one shell (its port and settings)."""

    def __init__(self, port: ShellPort, config: Config):
        self.port = port
        self.config = config
        #: Parsed records and their payload ids, by (cell, stored text).
        self._records: dict[tuple[str, str | None], tuple[RunRecord, str]] = {}
        #: Good verdicts by payload id, for the keyring and generation below.
        self._signed: dict[str, Verdict] = {}
        self._keys: tuple[Any, int] | None = None
        #: Banner displays by what they say (banner()).
        self._banners: dict[tuple, dict] = {}

    def clear(self) -> None:
        self._records.clear()
        self._signed.clear()
        self._banners.clear()

    def replay(
        self,
        backend: StateBackend,
        key: CellKey,
        done: Transition,
        quiet: bool,
        may_bind: Callable[[frozenset[str]], frozenset[str]],
    ) -> Any:
        """Replay an EXECUTED record: all of it when a key the user trusts
        signed it (the one signature lookup of a replay), its text and
        images only when not (:meth:`_unsigned`).  Of the names it
        records, only those *may_bind* allows are bound (bindable.py)."""
        port, ns = self.port, self.port.user_ns
        backend.note_hit(done.state_id)
        try:
            record, pid = self._parsed(key.ingest_src, done.result_json)
        except RecordError as exc:
            raise StatefulRunError(
                f"the recorded result of cell {key.digest[:12]} in {redact(backend.location)} is unreadable "
                f"({exc}); nothing was replayed and the cell was not run (--force runs it and records it again)"
            ) from None
        verdict = self._verdict(backend, pid)
        if not verdict.trusted:
            return self._unsigned(backend, key, record, verdict)
        allowed = may_bind(frozenset(record.changed))
        specs, refused = {}, {}
        for name, spec in record.names.items():
            if name in allowed:
                specs[name] = spec
            else:
                refused[name] = why_not(name)
        # The record's signature checked: every spec in it is ours to load.
        wanted = [digest for spec in specs.values() for digest in spec_blobs(spec)]
        _, missing = load_names(specs, buckets.reader(backend, record.blob_store, wanted), ns, trusted=True)
        # Names the run deleted (``del x``) are deleted again, where the
        # cell's code deletes them.  (Names it changed in place are in
        # record.names, restored above when its code read them.)
        for name in record.deleted:
            if name in allowed and not is_shell_name(name):
                ns.pop(name, None)
        if not quiet:
            self._banner(backend, key, done, record, verdict)
        if key.kind == "name" and record.code_hash not in (None, key.code_hash):
            port.note(
                f"[stateful] the code of --name {key.name} changed since it ran; "
                "replaying the recorded run (use --force to run the new code)"
            )
        if missing or refused:
            port.note(
                "[stateful] not restored: "
                + "; ".join(
                    [f"{printable(name)} {printable(' '.join(why.split()), 300)}" for name, why in missing.items()]
                    + [f"{printable(name)} ({why})" for name, why in refused.items()]
                )
            )

        def show_result(data: dict, metadata: dict) -> None:
            # Called by replay at the result's recorded position (before the
            # figures an inline backend flushed after the cell, say): the
            # display hook's steps, so _ and Out[n] get the restored value,
            # or a stand-in with the recorded bundle when it can't be had.
            value: Any = ReplayedResult(data, metadata)
            if record.result_value is not None:
                try:
                    value = load_value(record.result_value, buckets.reader(backend, record.blob_store), ns, trusted=True)
                except Exception:  # noqa: BLE001 - the stand-in still shows the recorded bundle
                    pass
            port.show_result(value, data, metadata)

        _, skipped = replay(record.outputs, port.shell, show_result)
        if skipped:
            port.note(f"[stateful] {skipped} recorded output(s) of {redact(backend.location)} were malformed and not shown")
        return None

    def _parsed(self, cell: str, text: str | None) -> tuple[RunRecord, str]:
        """The record stored as *text* for *cell*, parsed and checked, and the
        payload id its signature must be about.

        Memoized on the exact text and cell (both are what the id is
        computed from, so a hit is the same answer): replaying one cell
        again and again — what a notebook does — parses and encodes its
        record once.  Large records are not kept (their text is the memory).
        """
        memo = (cell, text)
        hit = self._records.get(memo)
        if hit is not None:
            return hit
        record = RunRecord.from_json(text)
        (payload,) = record.payloads_to_sign(cell)
        parsed = record, payload_id(payload)
        if text is None or len(text) <= MEMO_TEXT_MAX:
            if len(self._records) >= MEMO_RECORDS:
                self._records.pop(next(iter(self._records)))  # the oldest
            self._records[memo] = parsed
        return parsed

    def _verdict(self, backend: StateBackend, pid: str) -> Verdict:
        """Who signed payload *pid*, as the user's keys judge it: a good
        verdict from this process is reused (no lookup), as long as the
        trusted keys are the ones that gave it; else every key's row of the
        payload is read in one query and judged."""
        signer = self.config.signer
        signer.refresh()  # the one look at the signers file of this replay
        keys = (signer, signer.generation)
        if self._keys != keys:
            self._signed.clear()  # a revoked key's verdicts must not outlive it
            self._keys = keys
        verdict = self._signed.get(pid)
        if verdict is None:
            verdict = signer.judge(pid, backend.signatures([pid]).get(pid))
            if verdict.trusted:
                if len(self._signed) >= MEMO_RECORDS * 4:
                    self._signed.clear()
                self._signed[pid] = verdict
        return verdict

    def _unsigned(self, backend: StateBackend, key: CellKey, record: RunRecord, verdict: Verdict) -> None:
        """A record no trusted key signed (edited, written by another tool,
        a teammate you don't trust yet) does not act here: no name is bound,
        nothing imported or unpickled, no active content published; its text
        and raster images are shown, marked untrusted, after one line naming
        its signer and the narrow command that would trust it — this one
        cell, or this signer's records, after a preview.  The cell is not run."""
        where = redact(backend.location)
        shown, withheld = inert_outputs(record.outputs)
        hidden = []
        if withheld:
            hidden.append("withheld: " + _listing(dict.fromkeys(withheld)))
        if record.names:
            hidden.append("not bound: " + _listing(record.names))
        detail = f" ({'; '.join(hidden)})" if hidden else ""
        db = "" if backend.location == resolve_location(None, self.config.rssd_path) else f" --db {shlex.quote(where)}"
        narrow = f"%stateful trust {key.digest[:12]}{db}"
        if verdict.key_id is not None and verdict.label == verdict.key_id:
            narrow += f" (or --signer {verdict.key_id} for all of theirs)"
        self.port.note(
            f"[stateful] untrusted record: cell {key.digest[:12]} in {where} is {verdict.why}; showing its text "
            f"and images only{detail}. To see what it would do and trust it: {narrow}; to run the cell again: --force"
        )
        replay(shown, self.port.shell)

    def _banner(self, backend: StateBackend, key: CellKey, done: Transition, record: RunRecord, verdict: Verdict) -> None:
        """The replay banner: a display of its own (never merged into the
        cell's stderr), tagged ``{"rssd_magic": {"banner": true}}`` in its
        metadata so tools can tell it apart.  It says which store the record
        came from (a run from the wrong folder shows), when, where and how
        long it ran, and who signed it when that isn't you; and carries the
        same as ``application/vnd.rssd-magic.replay+json`` for frontends —
        nothing that changes from one replay to the next, so a saved
        notebook does not churn."""
        # Nothing in it changes from one replay to the next: made once.
        memo = (backend.location, done.state_id, key.digest, key.scope, key.name, verdict.label, verdict.mine)
        data = self._banners.get(memo)
        if data is None:
            if len(self._banners) >= MEMO_RECORDS:
                self._banners.clear()
            data = self._banners[memo] = self._banner_data(backend, key, done, record, verdict)
        self.port.publish(data, {"rssd_magic": {"banner": True}})

    def _banner_data(self, backend: StateBackend, key: CellKey, done: Transition, record: RunRecord,
                     verdict: Verdict) -> dict:  # fmt: skip
        store = redact(backend.location)
        short = os.path.basename(store) if backend.scheme == "file" else store
        host = record.host if isinstance(record.host, str) else None
        duration = record.duration_s if isinstance(record.duration_s, (int, float)) else None
        signer = None if verdict.mine else verdict.label
        text = (
            f"replayed {key.digest[:12]} from {printable(short, 80)}: executed {done.transitioned_at} UTC "
            f"on {printable(host or '?')} in {fmt_duration(duration or 0.0)}"
            + (f"; signed by {printable(signer)}" if signer is not None else "")
        )
        bundle = {
            "key": key.digest,
            "store": store,
            "state": done.to_state,
            "state_id": done.state_id,
            "executed_at": utc_iso(done.transitioned_at),
            "host": host,
            "duration_s": duration,
            "scope": key.scope,
            "name": key.name,
            "signer": verdict.label,
            "signed_by_you": verdict.mine,
        }
        return {
            "text/plain": f"[stateful] {text}",
            "text/html": f'<small style="opacity:.6" title="{html.escape(store, quote=True)}">'
            f"&#8635; stateful: {html.escape(text)}</small>",
            REPLAY_MIME: bundle,
        }


#: The banner's machine-readable part, for frontend extensions.
REPLAY_MIME = "application/vnd.rssd-magic.replay+json"


def utc_iso(stored: str | None) -> str | None:
    """``2026-12-07T02:39:28Z`` from the store's ``2026-12-07 02:39:28`` (UTC)."""
    if not isinstance(stored, str) or len(stored) != 19 or stored[10] != " ":
        return stored if isinstance(stored, str) else None
    return stored.replace(" ", "T") + "Z"


def _listing(items, most: int = 8) -> str:
    """``a, b, c and 4 more``: a list for one line."""
    items = [printable(str(item)) for item in items]
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more
