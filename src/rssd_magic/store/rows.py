"""The rows every store writes and reads alike, one text each (dialect.py
renders it for the store): a cell's latest transition and its claim, a
cell's entry, surveilr's exec row of a run, a kernel's session — surveilr's
device, nature and session rows and its session-level states — replay
counts and signatures.  Each function runs in the caller's transaction
(a :class:`~.dialect.Tx`): the journal (journal.py) and the stores decide
when.  Text from the kernel goes through the dialect's ``text`` (PostgreSQL
text can't hold NUL); JSON is written by ``canonical.dumps``."""

from __future__ import annotations

from dataclasses import asdict

from .. import __version__
from ..records.canonical import dumps, loads_object, utc_now
from ..engine.claims import current_holder, session_verdict
from ..records.ids import new_ulid
from ..engine.keys import CellKey
from ..engine.lifecycle import INITIAL
from .base import (
    NATURE_ID,
    NATURE_LABEL,
    SESSION_COMPLETED,
    SESSION_FAILED,
    SESSION_INIT,
    Claim,
    ExecRow,
    Holder,
    Transition,
)
from .dialect import Tx
from . import tally

#: The columns of a Transition, in its field order.
STATE = """s.orchestration_session_state_id, s.session_entry_id, s.session_id, s.from_state, s.to_state,
       s.transition_result, s.transition_reason, s.transitioned_at, {seq}"""
#: The entries of one cell (several when RSSDs were merged).
ENTRIES = "SELECT orchestration_session_entry_id FROM {orchestration_session_entry} WHERE ingest_src{C} = ?"
#: A cell's latest transition, by store order.
LATEST = f"SELECT {STATE} FROM {{states}} WHERE {{entry}} IN ({ENTRIES}) ORDER BY {{seq}} DESC LIMIT 1"
#: The latest EXECUTED run of the same code on other inputs.
VARIANT = f"""SELECT {STATE} FROM {{states}}
    WHERE {{entry}} IN (SELECT orchestration_session_entry_id FROM {{orchestration_session_entry}}
                        WHERE ingest_src{{C}} >= ? AND ingest_src{{C}} < ? AND ingest_src{{C}} <> ?)
      AND s.to_state = 'EXECUTED'
    ORDER BY {{seq}} DESC LIMIT 1"""
#: A claim row, with the holder's silence by the store's clock where it has one.
CLAIM = """SELECT entry_id, state_id, token, session_id, host, machine, boot, pidns, pid, started, beat, lease_s,
                  claimed_at, {silent} FROM {rssd_magic_claim}"""
CLAIM_OF = CLAIM + " WHERE entry_id = ? AND state_id = ?"


#: A heartbeat's bump of one claim (state id, state id, token): the row is
#: found by its entry, the RUNNING state's, through primary keys — an index
#: on state_id would be one more page in every claim's and every release's
#: transaction.
BEAT = """UPDATE {rssd_magic_claim} SET {beat}
          WHERE entry_id = (SELECT session_entry_id FROM {orchestration_session_state}
                            WHERE orchestration_session_state_id = ?)
            AND state_id = ? AND token = ?"""


def beat(t: Tx, held: dict[str, int]) -> set[str]:
    """A heartbeat: bump each ``{state_id: token}`` claim still held with that
    token; the state ids no longer held (taken over)."""
    return {sid for sid, token in held.items() if t.run(BEAT, (sid, sid, token)).rowcount == 0}


def claim_from(row: tuple | None) -> Claim | None:
    """A :data:`CLAIM` row as a Claim (None when nobody holds the cell)."""
    if row is None or row[1] is None:
        return None
    entry_id, state_id, token, session_id, host, machine, boot, pidns, pid, started, beat, lease_s, at, silent = row
    holder = Holder(host, machine, boot, pidns, int(pid), int(started), session_id)
    return Claim(entry_id, state_id, int(token), holder, int(beat), float(lease_s), at,
                 float(silent) if silent is not None else None)  # fmt: skip


def latest_in(t: Tx, ingest_src: str) -> Transition | None:
    row = t.one(LATEST, (ingest_src,))
    return Transition(*row) if row else None


def entry(t: Tx, session_id: str, key: CellKey, source: str) -> str:
    """The cell's entry id, made when the cell is new."""
    row = t.one(ENTRIES + " ORDER BY orchestration_session_entry_id LIMIT 1", (key.ingest_src,))
    if row:
        return row[0]
    entry_id = new_ulid()
    elaboration = {"key": key.digest, "code_key": key.base, "inputs": key.inputs or None, "scope": key.scope,
                   "kind": key.kind, "name": key.name, "source": source}  # fmt: skip
    t.run(
        """INSERT INTO {orchestration_session_entry}
           (orchestration_session_entry_id, session_id, ingest_src, elaboration) VALUES (?, ?, ?, ?)""",
        (entry_id, session_id, key.ingest_src, dumps(elaboration)),
    )
    return entry_id


def exec_row(t: Tx, session_id: str, entry_id: str, row: ExecRow) -> None:
    text = t.d.text
    t.run(
        """INSERT INTO {orchestration_session_exec}
           (orchestration_session_exec_id, exec_nature, session_id, session_entry_id, namespace,
            exec_identity, exec_code, exec_status, input_text, exec_error_text, output_text, elaboration)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (new_ulid(), text(row.nature), session_id, entry_id, text(row.namespace), text(row.identity),
         text(row.code), row.status, text(row.input_text), text(row.error_text), text(row.output_text),
         dumps(row.elaboration) if row.elaboration is not None else None),
    )  # fmt: skip


# -- signatures and replay counts ------------------------------------------------------


def add_signatures(t: Tx, rows: list[tuple[str, str, str]]) -> None:
    t.many(
        """INSERT INTO {rssd_magic_signature} (payload_id, key_id, signature) VALUES (?, ?, ?)
           ON CONFLICT (payload_id, key_id) DO UPDATE SET signature = excluded.signature""",
        rows,
    )


SIGNATURES = "SELECT payload_id, key_id, signature FROM {rssd_magic_signature} WHERE "


def signatures_of(found: list[tuple]) -> dict[str, dict[str, str]]:
    """Rows of :data:`SIGNATURES` as ``{payload_id: {key_id: signature}}``
    (rows whose key id or signature is not text left out)."""
    out: dict[str, dict[str, str]] = {}
    for pid, key_id, sig in found:
        if isinstance(key_id, str) and isinstance(sig, str):
            out.setdefault(pid, {})[key_id] = sig
    return out


def add_hits(t: Tx, hits: dict[str, int]) -> None:
    t.many(
        """INSERT INTO {rssd_magic_hit} AS h (state_id, hits, last_hit_at) VALUES (?, ?, {now})
           ON CONFLICT (state_id) DO UPDATE SET hits = h.hits + excluded.hits, last_hit_at = excluded.last_hit_at""",
        list(hits.items()),
    )
    tally.hits(t, hits)


# -- sessions -----------------------------------------------------------------------------


def new_session(session_id: str, host: str, args: dict, at: str | None = None) -> dict:
    """The rows of a session, stamped *at* (None: the store's clock when written)."""
    return {"id": session_id, "host": host, "args": dumps(args),
            "holder": dumps({"holder": asdict(current_holder(session_id))}), "at": at}  # fmt: skip


def stamped_session(session_id: str, host: str, args: dict) -> dict:
    """:func:`new_session` stamped now: rows written later (an RSSD's wait
    for a write) keep the time the kernel started."""
    return new_session(session_id, host, args, utc_now())


def start_session(t: Tx, s: dict, retrying: bool = False) -> None:
    """surveilr's device, nature and session rows, and the session's first
    state; *retrying*: an earlier try may have committed."""
    host = t.d.text(s["host"])
    # surveilr's device upsert, without rewriting a row it wrote.
    t.run(
        """INSERT INTO {device} (device_id, name, state, boundary) VALUES (?, ?, '"SINGLETON"', 'UNKNOWN')
           ON CONFLICT (name, state, boundary) DO NOTHING""",
        (new_ulid(), host),
    )
    (device_id,) = t.one(
        """SELECT device_id FROM {device} WHERE name = ? AND state = '"SINGLETON"' AND boundary = 'UNKNOWN'""", (host,)
    )
    t.run(
        "INSERT INTO {orchestration_nature} (orchestration_nature_id, nature) VALUES (?, ?) ON CONFLICT DO NOTHING",
        (NATURE_ID, NATURE_LABEL),
    )
    t.run(
        """INSERT INTO {orchestration_session} (orchestration_session_id, device_id, orchestration_nature_id,
                                                version, orch_started_at, args_json, elaboration)
           VALUES (?, ?, ?, ?, coalesce(?, {now}), ?, ?) ON CONFLICT DO NOTHING""",
        (s["id"], device_id, NATURE_ID, __version__, s["at"], s["args"], s["holder"]),
    )
    landed = retrying and t.one(
        """SELECT 1 FROM {orchestration_session_state}
           WHERE session_id = ? AND session_entry_id IS NULL AND to_state = ?""",
        (s["id"], SESSION_INIT),
    )
    if not landed:
        _session_state(t, s["id"], INITIAL, SESSION_INIT, "kernel started", s["at"])


def _session_state(t: Tx, session_id: str, from_state: str, to_state: str, reason: str, at: str | None) -> None:
    t.run(
        """INSERT INTO {orchestration_session_state} (orchestration_session_state_id, session_id, session_entry_id,
                                                      from_state, to_state, transition_reason, transitioned_at)
           VALUES (?, ?, NULL, ?, ?, ?, coalesce(?, {now}))""",
        (new_ulid(), session_id, from_state, to_state, t.d.text(reason), at),
    )


def end_session(t: Tx, session_id: str, failed: bool, reason: str | None = None) -> bool:
    """Finish a session: ``orch_finished_at`` and its last session-level
    state, with *reason* (by default: why a kernel's own session ends);
    False if it was finished already (or never written)."""
    reason = reason or ("a cell failed in this kernel" if failed else "kernel shut down")
    cur = t.run(
        """UPDATE {orchestration_session} SET orch_finished_at = {now}
           WHERE orchestration_session_id = ? AND orch_finished_at IS NULL""",
        (session_id,),
    )
    if cur.rowcount == 0:
        return False
    _session_state(t, session_id, SESSION_INIT, SESSION_FAILED if failed else SESSION_COMPLETED, reason, None)
    return True


def open_sessions(t: Tx, boot: str | None = None) -> list[tuple[str, dict]]:
    """``(session_id, holder)`` of our sessions not finished yet (of one
    boot of one machine's kernel, when *boot* is given: only there can a
    process be asked whether it still runs)."""
    query = """SELECT orchestration_session_id, elaboration FROM {orchestration_session}
               WHERE orchestration_nature_id = ? AND orch_finished_at IS NULL"""
    params: tuple = (NATURE_ID,)
    if boot is not None:
        # The substring test first: it spares parsing the JSON of every
        # session other machines left open (thousands, never closed here).
        query += f" AND {t.d.contains('elaboration')} AND {t.d.json_text('elaboration', 'holder', 'boot')} = ?"
        params += (boot, boot)
    out = []
    for sid, elaboration in t.all(query, params):
        holder = loads_object(elaboration).get("holder")
        if isinstance(holder, dict):
            out.append((sid, holder))
    return out


def close_orphans(t: Tx, own_session: str | None) -> list[str]:
    """Finish, as failed, the sessions kernels killed on this machine left
    open (their process is certainly gone); their ids.  Sessions of other
    machines are left: only their own machine can tell."""
    me = current_holder(own_session or "")
    closed = []
    for session_id, holder in open_sessions(t, me.boot):
        if session_id == own_session:
            continue
        try:
            dead = session_verdict(Holder(**holder))
        except TypeError:
            continue  # written by another version: not ours to judge
        if dead and end_session(t, session_id, True, f"kernel gone: {dead}"):
            closed.append(session_id)
    return closed
