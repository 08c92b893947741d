"""The rows a PostgreSQL store writes and reads for one cell or session:
each function is a statement or two, run in the caller's transaction.

postgres.py decides (claims, fencing, retries); this module knows the SQL of
a transition, an entry, a claim row, an exec row, a session, a hit count and
a signature.  Statements are templates (postgres_conn.Sql): ``q`` renders
them with this store's qualified names.  Text from the kernel goes through :func:`text` (PostgreSQL
text can't hold NUL); JSON is written by ``canonical.dumps``, which escapes it.
"""

from __future__ import annotations

import psycopg

from .. import __version__
from ..canonical import dumps
from ..ids import new_ulid
from ..keys import CellKey
from ..lifecycle import INITIAL
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
from .postgres_reports import STATE_COLUMNS
from .postgres_conn import Sql


#: A cell's latest transition, by store order.
LATEST = f"""
    SELECT {STATE_COLUMNS}
    FROM {{rssd_magic_state_seq}} AS q
    JOIN {{orchestration_session_state}} AS s ON s.orchestration_session_state_id = q.state_id
    WHERE q.entry_id IN (SELECT orchestration_session_entry_id FROM {{orchestration_session_entry}}
                         WHERE ingest_src COLLATE "C" = %s)
    ORDER BY q.seq DESC LIMIT 1"""
#: The same through our function, whose plan the server keeps (the replay's
#: one read; postgres_schema.FUNCTIONS).
LATEST_CALL = "SELECT * FROM {rssd_magic_latest}(%s)"
#: A claim row, with the holder's silence by the server's clock.
CLAIM = """SELECT entry_id, state_id, token, session_id, host, machine, boot, pidns, pid, started, beat, lease_s,
                  claimed_at, extract(epoch FROM clock_timestamp() - heartbeat_at)::float8
           FROM {rssd_magic_claim}"""


#: Append one transition and its store order in one statement.
APPEND = """WITH q AS (INSERT INTO {rssd_magic_state_seq} (state_id, entry_id) VALUES (%s, %s) RETURNING seq),
                 s AS (INSERT INTO {orchestration_session_state}
                       (orchestration_session_state_id, session_id, session_entry_id, from_state, to_state,
                        transition_result, transition_reason, transitioned_at, elaboration)
                       VALUES (%s, %s, %s, %s, %s, %s, %s, {now}, %s) RETURNING transitioned_at)
            SELECT s.transitioned_at, q.seq FROM s, q"""
CLAIM_LOCKED = CLAIM + " WHERE ingest_src = %s FOR UPDATE"
CLAIM_OF = CLAIM + " WHERE state_id = %s AND entry_id = %s"
#: A transition by id, as a Transition reads it.
STATE_BY_ID = f"""SELECT {STATE_COLUMNS} FROM {{orchestration_session_state}} AS s
                  JOIN {{rssd_magic_state_seq}} AS q ON q.state_id = s.orchestration_session_state_id
                  WHERE s.orchestration_session_state_id = %s"""
#: A run's end releases its claim and tells the cell's waiters (at COMMIT).
RELEASE = """UPDATE {rssd_magic_claim} SET state_id = NULL WHERE ingest_src = %s AND token = %s
             RETURNING pg_notify(%s, %s)"""


def text(value: str | None) -> str | None:
    """PostgreSQL text can't hold NUL: it is stored as U+FFFD (JSON columns
    never have one, ``dumps`` escapes it)."""
    return value.replace("\x00", "\ufffd") if isinstance(value, str) and "\x00" in value else value


def claim_from(row) -> Claim | None:
    """A :data:`CLAIM` row as a Claim (None when nobody holds the cell)."""
    if row is None or row[1] is None:
        return None
    entry_id, state_id, token, session_id, host, machine, boot, pidns, pid, started, beat, lease_s, at, silent = row
    holder = Holder(host, machine, boot, pidns, int(pid), int(started), session_id)
    return Claim(entry_id, state_id, int(token), holder, int(beat), float(lease_s), at, silent)


def latest_in(c: psycopg.Connection, q: Sql, ingest_src: str) -> Transition | None:
    row = c.execute(q(LATEST), (ingest_src,)).fetchone()
    return Transition(*row) if row else None


def lock_cell(c: psycopg.Connection, q: Sql, ingest_src: str, create: bool = True) -> tuple | None:
    """Take the cell's claim row (made when missing) until the transaction
    ends; the row as :data:`CLAIM` reads it."""
    if create:
        c.execute(q("INSERT INTO {rssd_magic_claim} (ingest_src) VALUES (%s) ON CONFLICT DO NOTHING"), (ingest_src,))
    return c.execute(q(CLAIM_LOCKED), (ingest_src,)).fetchone()


def take(c: psycopg.Connection, q: Sql, ingest_src: str, entry_id: str, state_id: str, session_id: str, h: Holder,
         lease_s: float) -> tuple[int, str]:
    """Make the (locked) claim row ours with the next fencing token; returns
    ``(token, claimed_at)``."""
    token, claimed_at = c.execute(
        q("""UPDATE {rssd_magic_claim} SET token = token + 1, entry_id = %s, state_id = %s, session_id = %s,
               host = %s, machine = %s, boot = %s, pidns = %s, pid = %s, started = %s, beat = 0,
               lease_s = %s, claimed_at = {now}, heartbeat_at = clock_timestamp()
             WHERE ingest_src = %s RETURNING token, claimed_at"""),
        (entry_id, state_id, session_id, text(h.host), text(h.machine), text(h.boot), text(h.pidns), h.pid,
         h.started, lease_s, ingest_src),
    ).fetchone()  # fmt: skip
    return int(token), claimed_at


def append(c, q, session_id, entry_id, from_state, to_state, result_json, reason, elaboration, state_id=None) -> Transition:
    """Append one transition and its store order in one statement (the
    trigger finds the seq row there and leaves it)."""
    state_id = state_id or new_ulid()
    at, seq = c.execute(
        q(APPEND),
        (state_id, entry_id, state_id, session_id, entry_id, from_state, to_state, result_json, text(reason),
         dumps(elaboration) if elaboration is not None else None),
    ).fetchone()  # fmt: skip
    return Transition(state_id, entry_id, session_id, from_state, to_state, result_json, text(reason), at, int(seq))


def entry(c: psycopg.Connection, q: Sql, session_id: str, key: CellKey, source: str) -> str:
    """The cell's entry id, made when the cell is new."""
    row = c.execute(
        q("""SELECT orchestration_session_entry_id FROM {orchestration_session_entry}
             WHERE ingest_src COLLATE "C" = %s LIMIT 1"""),
        (key.ingest_src,),
    ).fetchone()
    if row:
        return row[0]
    entry_id = new_ulid()
    elaboration = {"key": key.digest, "code_key": key.base, "inputs": key.inputs or None, "scope": key.scope,
                   "kind": key.kind, "name": key.name, "source": source}  # fmt: skip
    c.execute(
        q("""INSERT INTO {orchestration_session_entry}
             (orchestration_session_entry_id, session_id, ingest_src, elaboration) VALUES (%s, %s, %s, %s)"""),
        (entry_id, session_id, key.ingest_src, dumps(elaboration)),
    )
    return entry_id


def exec_row(c: psycopg.Connection, q: Sql, session_id: str, entry_id: str, row: ExecRow) -> None:
    c.execute(
        q("""INSERT INTO {orchestration_session_exec}
             (orchestration_session_exec_id, exec_nature, session_id, session_entry_id, namespace,
              exec_identity, exec_code, exec_status, input_text, exec_error_text, output_text, elaboration)
             VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"""),
        (new_ulid(), text(row.nature), session_id, entry_id, text(row.namespace), text(row.identity),
         text(row.code), row.status, text(row.input_text), text(row.error_text), text(row.output_text),
         dumps(row.elaboration) if row.elaboration is not None else None),
    )  # fmt: skip


def open_session(c: psycopg.Connection, q: Sql, session_id: str, host: str, args: dict, holder: dict, retrying: bool) -> None:
    """surveilr's device, nature and session rows, and the session's first
    state; *retrying*: a previous try may have committed."""
    # surveilr's device upsert, without rewriting a row it wrote.
    c.execute(
        q("""INSERT INTO {device} (device_id, name, state, boundary) VALUES (%s, %s, '"SINGLETON"', 'UNKNOWN')
             ON CONFLICT (name, state, boundary) DO NOTHING"""),
        (new_ulid(), text(host)),
    )
    (device_id,) = c.execute(
        q("""SELECT device_id FROM {device} WHERE name = %s AND state = '"SINGLETON"' AND boundary = 'UNKNOWN'"""),
        (text(host),),
    ).fetchone()
    c.execute(
        q("INSERT INTO {orchestration_nature} (orchestration_nature_id, nature) VALUES (%s, %s) ON CONFLICT DO NOTHING"),
        (NATURE_ID, NATURE_LABEL),
    )
    c.execute(
        q("""INSERT INTO {orchestration_session}
             (orchestration_session_id, device_id, orchestration_nature_id, version, args_json, elaboration)
             VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"""),
        (session_id, device_id, NATURE_ID, __version__, dumps(args), dumps({"holder": holder})),
    )
    landed = retrying and c.execute(
        q("""SELECT 1 FROM {orchestration_session_state}
             WHERE session_id = %s AND session_entry_id IS NULL AND to_state = %s"""),
        (session_id, SESSION_INIT),
    ).fetchone()
    if not landed:
        append(c, q, session_id, None, INITIAL, SESSION_INIT, None, "kernel started", None)


def end_session(c: psycopg.Connection, q: Sql, session_id: str, failed: bool, reason: str) -> bool:
    """Finish a session (False when it was finished already)."""
    cur = c.execute(
        q("""UPDATE {orchestration_session} SET orch_finished_at = {now}
             WHERE orchestration_session_id = %s AND orch_finished_at IS NULL"""),
        (session_id,),
    )
    if cur.rowcount == 0:
        return False
    append(c, q, session_id, None, SESSION_INIT, SESSION_FAILED if failed else SESSION_COMPLETED, None, reason, None)
    return True


def add_hits(c: psycopg.Connection, q: Sql, pending: dict[str, int]) -> None:
    with c.cursor() as cur:
        cur.executemany(
            q("""INSERT INTO {rssd_magic_hit} AS h (state_id, hits, last_hit_at) VALUES (%s, %s, {now})
                 ON CONFLICT (state_id) DO UPDATE
                 SET hits = h.hits + excluded.hits, last_hit_at = excluded.last_hit_at"""),
            list(pending.items()),
        )


def add_signatures(c: psycopg.Connection, q: Sql, rows: list[tuple[str, str, str]]) -> None:
    if rows:
        with c.cursor() as cur:
            cur.executemany(
                q("""INSERT INTO {rssd_magic_signature} (payload_id, key_id, signature) VALUES (%s, %s, %s)
                     ON CONFLICT (payload_id, key_id) DO UPDATE SET signature = excluded.signature"""),
                rows,
            )
