"""The contract every state backend keeps (backends/base.py), one set of tests
run against each: claim races, fencing, compare-and-append, store order,
blobs, signatures, hits and the listings reports need.

A backend joins by adding a parameter to the ``env`` fixture: an :class:`Env`
that opens it and can reach its tables the way another tool would (``raw``),
to attack it with rows nobody wrote through rssd_magic.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import pg_util
from rssd_magic.store import rows, tables
from rssd_magic.backends.sqlite_schema import SQL
from rssd_magic.store.blobs import SMALL
from rssd_magic.backends import open_backend
from rssd_magic.store.base import ClaimRequest, Fenced, StoreError
from rssd_magic.store.journal import StateBackend
from rssd_magic.engine.claims import Heartbeat, current_holder
from rssd_magic.engine.keys import cell_key
from rssd_magic.engine.lifecycle import ABANDONED, EXECUTED, FAILED, FORGOTTEN, INITIAL, RUNNING
from rssd_magic.records.trust import IntegrityError, buffer_digest, stream_digest

KEY = cell_key("contract()", "contract")
RESULT = '{"format":"rssd_magic.result.v1","names":{},"outputs":[]}'
#: The greatest ULID there is: a row "from the future", as a host whose
#: clock runs ahead would write it.
FUTURE_ID = "7ZZZZZZZZZZZZZZZZZZZZZZZZZ"


class Env:
    """One kind of backend under test."""

    name = "?"

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.opened: list[StateBackend] = []

    @property
    def location(self) -> str:
        raise NotImplementedError

    def open(self, **options) -> StateBackend:
        options.setdefault("session_args", {"contract": True})
        backend = open_backend(self.location, **options)
        self.opened.append(backend)
        return backend

    def raw(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Run SQL on the store as another tool would (``?`` placeholders)."""
        raise NotImplementedError

    def close_all(self) -> None:
        for backend in self.opened:
            backend.close()


class SqliteEnv(Env):
    name = "sqlite"

    def __init__(self, tmp_path: Path, file: str = "contract.sqlite.db"):
        super().__init__(tmp_path)
        self.file = file

    @property
    def location(self) -> str:
        return str(self.tmp_path / self.file)

    def raw(self, sql: str, params: tuple = ()) -> list[tuple]:
        conn = sqlite3.connect(self.location, timeout=30)
        try:
            with conn:
                return conn.execute(sql, params).fetchall()
        finally:
            conn.close()


class PgEnv(Env):
    """A schema of its own on the session's PostgreSQL server (pg_util.py)."""

    name = "postgresql"

    def __init__(self, tmp_path: Path):
        super().__init__(tmp_path)
        self.url = pg_util.fresh_url("contract")

    @property
    def location(self) -> str:
        return self.url

    def raw(self, sql: str, params: tuple = ()) -> list[tuple]:
        return pg_util.raw(self.url, sql, params)


#: Backends under test.
ENVS = {"sqlite": SqliteEnv, "postgresql": PgEnv}


@pytest.fixture(params=sorted(ENVS))
def env(request, tmp_path):
    e = ENVS[request.param](tmp_path)
    yield e
    e.close_all()


def ask(backend: StateBackend, key=KEY, lease=60.0, **kw) -> ClaimRequest:
    return ClaimRequest(key, "contract()", {"source": "contract()"}, current_holder(backend.session_id or ""), lease, **kw)


def run_once(backend: StateBackend, key=KEY, result=RESULT, **kw):
    """Claim the cell and record it EXECUTED; returns (claim outcome, end)."""
    mine = backend.claim(ask(backend, key, **kw))
    assert mine.kind == "run", mine
    return mine, backend.finish(mine.running, mine.claim.token, EXECUTED, result, "completed")


def chain(env: Env) -> list[tuple[str, str]]:
    return [tuple(r) for r in env.raw(
        """SELECT s.from_state, s.to_state FROM orchestration_session_state AS s
           JOIN orchestration_session_entry AS e ON e.orchestration_session_entry_id = s.session_entry_id
           WHERE e.ingest_src LIKE 'rssd-magic:%' ORDER BY s.orchestration_session_state_id"""
    )]  # fmt: skip


# -- deciding ---------------------------------------------------------------------


def test_first_claim_runs_then_replays_then_force_reruns(env):
    b = env.open()
    assert b.latest(KEY) is None
    mine, done = run_once(b)
    assert mine.previous is None and mine.running.reason == "first run" and mine.running.from_state == INITIAL
    assert b.latest(KEY) == done and done.to_state == EXECUTED
    again = b.claim(ask(b))
    assert again.kind == "done" and again.previous == done
    forced = b.claim(ask(b, rerun_of=done.state_id, rerun_reason="forced (--force)"))
    assert forced.kind == "run" and forced.running.reason == "forced (--force) after EXECUTED"
    assert forced.claim.token > mine.claim.token


def test_a_failed_run_is_retried_and_says_why(env):
    b = env.open()
    mine = b.claim(ask(b))
    b.finish(mine.running, mine.claim.token, FAILED, '{"error":{"ename":"E"}}', "E: boom")
    retry = b.claim(ask(b))
    assert retry.kind == "run" and retry.running.reason == "retry after FAILED"


def test_first_reason_is_recorded(env):
    b = env.open()
    mine = b.claim(ask(b, first_reason="inputs changed: input n changed (1 → 2)"))
    assert mine.running.reason == "inputs changed: input n changed (1 → 2)"


# -- claims and fencing ----------------------------------------------------------------


def test_a_held_cell_is_held_until_its_claim_is_taken_over_exactly(env):
    holder, waiter = env.open(), env.open()
    mine = holder.claim(ask(holder))
    held = waiter.claim(ask(waiter))
    assert held.kind == "held" and held.claim.state_id == mine.running.state_id
    assert held.claim.token == mine.claim.token and held.claim.holder.pid == mine.claim.holder.pid
    assert waiter.claim_of(held.previous) == held.claim
    # A heartbeat lands: a takeover decided on the older view is refused.
    assert holder.renewer().renew({mine.running.state_id: mine.claim.token}) == set()
    stale_view = waiter.claim(ask(waiter, takeover=held.claim, dead_because="old view"))
    assert stale_view.kind == "held" and stale_view.claim.beat == held.claim.beat + 1
    taken = waiter.claim(ask(waiter, takeover=stale_view.claim, dead_because="judged dead"))
    assert taken.kind == "run" and taken.abandoned is not None
    assert taken.abandoned.reason == "holder dead: judged dead"
    assert taken.claim.token > mine.claim.token
    assert chain(env) == [(INITIAL, RUNNING), (RUNNING, ABANDONED), (ABANDONED, RUNNING)]


def test_a_stale_holder_can_not_record_anything(env):
    holder, other = env.open(), env.open()
    mine = holder.claim(ask(holder))
    seen = other.claim(ask(other)).claim
    taken = other.claim(ask(other, takeover=seen, dead_because="lease lapsed"))
    for to_state in (EXECUTED, FAILED):
        with pytest.raises(Fenced):
            holder.finish(mine.running, mine.claim.token, to_state, RESULT, "late", [("sha256:" + "0" * 64, b"x")])
    assert env.raw("SELECT count(*) FROM rssd_magic_blob") == [(0,)], "a fenced end writes no blob either"
    other.finish(taken.running, taken.claim.token, EXECUTED, RESULT, "completed")
    with pytest.raises(Fenced, match=rf"host .+, pid {taken.claim.holder.pid}"):
        holder.finish(mine.running, mine.claim.token, EXECUTED, RESULT, "later still")
    assert chain(env) == [(INITIAL, RUNNING), (RUNNING, ABANDONED), (ABANDONED, RUNNING), (RUNNING, EXECUTED)]
    assert holder.renewer().renew({mine.running.state_id: mine.claim.token}) == {mine.running.state_id}


def test_a_wrong_token_is_fenced_even_for_the_latest_run(env):
    b = env.open()
    mine = b.claim(ask(b))
    with pytest.raises(Fenced):
        b.finish(mine.running, mine.claim.token + 1, EXECUTED, RESULT, "forged token")
    b.finish(mine.running, mine.claim.token, EXECUTED, RESULT, "completed")


def test_a_running_cell_with_no_claim_is_taken_over(env):
    b = env.open()
    mine = b.claim(ask(b))
    env.raw("UPDATE rssd_magic_claim SET state_id = NULL")  # the claim row lost, as by another tool
    assert b.claim_of(mine.running) is None
    taken = b.claim(ask(b))
    assert taken.kind == "run" and "no holder is recorded" in taken.abandoned.reason


def test_heartbeat_moves_the_beat_and_releases_cleanly(env):
    b = env.open()
    mine = b.claim(ask(b, lease=0.3))
    beat = Heartbeat(b.renewer)
    beat.hold(mine.running.state_id, mine.claim.token, 0.3)
    deadline = time.time() + 10
    while b.claim_of(mine.running).beat < 2:
        assert time.time() < deadline, "the heartbeat never beat"
        time.sleep(0.05)
    beat.release(mine.running.state_id)
    beat.stop()
    b.finish(mine.running, mine.claim.token, EXECUTED, RESULT, "completed")
    assert b.claim_of(mine.running) is None


def test_a_heartbeat_finds_its_claim_through_keys_and_claims_write_no_state_index(tmp_path):
    """A beat is two primary-key probes however many cells the file holds,
    and no index on the claim's state id costs each claim and release a page."""
    env = SqliteEnv(tmp_path)
    env.open().close()
    conn = sqlite3.connect(env.location)
    try:
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + SQL(rows.BEAT), ("s", "s", 1))]
        indexes = [name for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'rssd_magic_claim'")]  # fmt: skip
    finally:
        conn.close()
    assert plan and not [p for p in plan if p.startswith("SCAN")], plan
    assert any("rssd_magic_claim USING INDEX sqlite_autoindex_rssd_magic_claim_1 (entry_id=?)" in p for p in plan), plan
    assert indexes == ["sqlite_autoindex_rssd_magic_claim_1"]


RACER = textwrap.dedent(
    """
    import sys, time
    from rssd_magic.engine.acquire import acquire
    from rssd_magic.backends import open_backend
    from rssd_magic.store.base import ClaimRequest
    from rssd_magic.engine.claims import current_holder
    from rssd_magic.engine.keys import cell_key
    where, hold = sys.argv[1], float(sys.argv[2])
    b = open_backend(where, session_args={"racer": True})
    key = cell_key("contract()", "contract")
    outcome = acquire(b, ClaimRequest(key, "contract()", {}, current_holder(b.session_id), 60.0))
    if outcome.kind == "run":
        time.sleep(hold)
        b.finish(outcome.running, outcome.claim.token, "EXECUTED", '{"names":{}}', "completed")
    print(outcome.kind, flush=True)
    b.close()
    """
)


def test_racing_processes_exactly_one_runs(env):
    env.open().close()  # create the store before the race
    procs = [
        subprocess.Popen([sys.executable, "-c", RACER, env.location, "0.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(5)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    assert sorted(out.strip() for out, _ in results) == ["done"] * 4 + ["run"]
    assert chain(env) == [(INITIAL, RUNNING), (RUNNING, EXECUTED)]
    assert env.raw("SELECT count(*) FROM rssd_magic_claim WHERE state_id IS NOT NULL") == [(0,)]


# -- order by the store ---------------------------------------------------------------


def test_latest_is_what_the_store_wrote_last_not_the_greatest_id(env):
    b = env.open()
    _, done = run_once(b)
    # A host whose clock runs a day (or a millennium) ahead appends a
    # FORGOTTEN with an id from the future; then this host runs the cell
    # again, with ids smaller than that one.
    env.raw(
        """INSERT INTO orchestration_session_state (orchestration_session_state_id, session_id, session_entry_id,
           from_state, to_state, transition_reason, transitioned_at) VALUES (?, ?, ?, 'EXECUTED', 'FORGOTTEN', 'ahead', '2999-01-01 00:00:00')""",
        (FUTURE_ID, done.session_id, done.entry_id),
    )
    assert b.latest(KEY).state_id == FUTURE_ID
    again = b.claim(ask(b))
    assert again.kind == "run" and again.running.state_id < FUTURE_ID
    end = b.finish(again.running, again.claim.token, EXECUTED, RESULT, "completed")
    assert b.latest(KEY) == end, "the run written after the future row is the latest"
    forgot = b.append_if_latest(end.entry_id, EXECUTED, FORGOTTEN, None, "forgotten", if_latest=end.state_id)
    assert forgot is not None and b.latest(KEY) == forgot
    assert b.append_if_latest(end.entry_id, EXECUTED, FORGOTTEN, None, "twice", if_latest=end.state_id) is None


def test_the_variant_lookup_finds_the_same_code_on_other_inputs(env):
    b = env.open()
    old = cell_key("x * n", "contract", inputs="a" * 64)
    new = cell_key("x * n", "contract", inputs="b" * 64)
    _, done = run_once(b, old)
    assert b.latest(new) is None
    assert b.latest_variant(new) == done
    assert b.latest_variant(cell_key("other()", "contract", inputs="c" * 64)) is None


# -- blobs, signatures, hits ----------------------------------------------------------------


def test_blobs_are_content_addressed_and_checked_on_read(env):
    b = env.open()
    data = bytes(range(256)) * 4096
    digest = buffer_digest(data)
    pickle_like = b"\x80\x05stream"
    b.blobs.put_many([(digest, data), (stream_digest(pickle_like), pickle_like)])
    b.blobs.put_many([(digest, data)])  # idempotent
    assert bytes(b.blobs.get(digest)) == data
    buf = b.blobs.get(digest)
    memoryview(buf)[0] = 1  # a writable buffer (numpy arrays are rebuilt on it)
    assert b.blobs.sizes() == {digest: len(data), stream_digest(pickle_like): len(pickle_like)}
    with pytest.raises(KeyError):
        b.blobs.get("sha256:" + "f" * 64)
    forged = stream_digest(b"what the record claims")
    b.blobs.put_many([(forged, b"what the store holds")])
    with pytest.raises(IntegrityError):
        b.blobs.get(forged)
    assert b.blobs.delete([digest, forged, "sha256:" + "e" * 64]) == 2
    assert set(b.blobs.sizes()) == {stream_digest(pickle_like)}


def test_small_blobs_are_read_together_and_each_checked(env):
    b = env.open()
    small = [b"\x80\x05small %d" % i for i in range(3)]
    digests = [stream_digest(s) for s in small]
    big = bytes(SMALL + 1)
    forged = stream_digest(b"what the record claims")
    b.blobs.put_many([*zip(digests, small), (buffer_digest(big), big), (forged, b"what the store holds")])
    asked = [*digests, digests[0], buffer_digest(big), forged, "sha256:" + "f" * 64]
    got = b.blobs.get_small(asked)
    assert {d: bytes(v) for d, v in got.items()} == dict(zip(digests, small)), "small, there, and what their digests say"
    assert all(type(v) is bytearray for v in got.values()), "writable, as get() gives them"
    assert b.blobs.get_small(digests[:1]) == {}, "one blob is read as ever"
    with pytest.raises(IntegrityError):
        b.blobs.get(forged)  # what was left out still says what is wrong with it


def test_finish_stores_blobs_and_signatures_with_the_record(env):
    b = env.open()
    data = b"payload" * 1000
    digest = stream_digest(data)
    mine = b.claim(ask(b))
    b.finish(mine.running, mine.claim.token, EXECUTED, RESULT, "completed", [(digest, data)], [("pid-1", "key-a", "sig-a")])
    assert bytes(b.blobs.get(digest)) == data
    assert b.signatures(["pid-1", "pid-2"]) == {"pid-1": {"key-a": "sig-a"}}
    b.add_signatures([("pid-2", "key-a", "sig-b"), ("pid-1", "key-b", "sig-c")])
    assert b.signatures(["pid-1", "pid-2"]) == {"pid-1": {"key-a": "sig-a", "key-b": "sig-c"}, "pid-2": {"key-a": "sig-b"}}
    assert b.signatures(["pid-2"]) == {"pid-2": {"key-a": "sig-b"}}
    assert b.signatures([]) == {}


def test_hits_are_counted_and_flushed(env):
    b = env.open()
    _, done = run_once(b)
    for _ in range(3):
        b.note_hit(done.state_id)
    b.flush_hits()
    (cell,) = tables.cells(b)
    assert cell.latest_hits == 3 and cell.hits_total == 3
    assert tables.counts(b).hits == 3


# -- listings ---------------------------------------------------------------------------------


def test_the_newest_cells_first_and_a_listing_stopped_early_ends_its_read(env):
    b = env.open()
    keys = [cell_key(f"v = {i}", "contract") for i in range(4)]
    for k in keys:
        run_once(b, k)
    b.end_session(b.session_id, failed=False, reason="a session-level state among the cells' transitions")
    assert tables.newest(b, 3) == [k.ingest_src for k in keys[:0:-1]]
    cells = tables.cells(b, limit=2)
    assert next(cells).ingest_src == keys[3].ingest_src
    cells.close()  # a listing stopped at its limit
    # Nothing of that read is left open: no snapshot holding back a
    # checkpoint (SQLite), no connection idle in a transaction (PostgreSQL).
    if env.name == "sqlite":
        other = sqlite3.connect(env.location, timeout=10)  # a housekeeper write may be finishing
        try:
            for _ in range(5):
                busy = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                if not busy:
                    break
                time.sleep(0.1)  # another connection's checkpoint was running: SQLite says busy at once
            assert busy == 0, "a reader still holds a snapshot"
        finally:
            other.close()
    else:
        pid = b._live().info.backend_pid
        assert env.raw("SELECT state FROM pg_stat_activity WHERE pid = ?", (pid,)) == [("idle",)]
    other = env.open()
    run_once(other, cell_key("w = 1", "contract"), lease=5.0)
    assert [c.ingest_src for c in tables.cells(b, limit=2)] == [cell_key("w = 1", "contract").ingest_src, keys[3].ingest_src]


def test_listings_for_reports(env):
    b = env.open()
    named = cell_key("v = 1", "contract", name="migration")
    run_once(b, named, '{"host":"h1","duration_s":2.5,"names":{},"outputs":[]}')
    failing = b.claim(ask(b))
    b.finish(failing.running, failing.claim.token, FAILED, '{"error":{"ename":"ValueError","evalue":"bad"}}', "ValueError: bad")
    cells = list(tables.cells(b))
    assert [c.ingest_src for c in cells] == [KEY.ingest_src, named.ingest_src], "newest first"
    second, first = cells
    assert first.elaboration["name"] == "migration" and first.latest.to_state == EXECUTED
    assert (first.latest_host, first.latest_duration_s, first.transitions) == ("h1", 2.5, 2)
    assert first.source == "contract()"
    assert second.latest.to_state == FAILED
    history = tables.history(b, second)
    assert [(h.from_state, h.to_state) for h in history] == [(INITIAL, RUNNING), (RUNNING, FAILED)]
    assert history[-1].error == {"ename": "ValueError", "evalue": "bad"} and history[-1].reason == "ValueError: bad"
    assert tables.result_of(b, history[-1].id) == '{"error":{"ename":"ValueError","evalue":"bad"}}'
    assert [(c.ingest_src, c.latest.result_json) for c in tables.cells(b, executed=True, with_results=True)] == [
        (named.ingest_src, '{"host":"h1","duration_s":2.5,"names":{},"outputs":[]}')
    ]
    s = tables.counts(b)
    assert s.transitions == 4 and s.json_bytes > 0


def test_gc_keeps_what_current_records_name_and_deletes_the_rest(env):
    b = env.open()
    keep, drop = stream_digest(b"kept"), stream_digest(b"dropped")
    mine = b.claim(ask(b))
    b.finish(mine.running, mine.claim.token, EXECUTED, RESULT, "completed", [(keep, b"kept"), (drop, b"dropped")])
    names = lambda text: {keep}  # noqa: E731 - the record names one of its two blobs
    doomed, kept, kept_bytes = tables.gc(b, names, dry_run=True)
    assert doomed == [(drop, 7)] and (kept, kept_bytes) == (1, 4)
    assert set(b.blobs.sizes()) == {keep, drop}, "a dry run deletes nothing"
    doomed, kept, _ = tables.gc(b, names)
    assert doomed == [(drop, 7)] and kept == 1 and set(b.blobs.sizes()) == {keep}


# -- sessions and errors ------------------------------------------------------------------------


def test_one_session_per_process_finished_on_close(env):
    b = env.open(session_args={"kernel": 1})
    sid = b.session_id
    assert b.start_session({"again": True}) == sid
    b.close()
    rows = env.raw("SELECT orch_finished_at, args_json FROM orchestration_session WHERE orchestration_session_id = ?", (sid,))
    assert rows and rows[0][0] is not None and '"kernel"' in rows[0][1]
    b.close()  # twice: no error


def test_a_missing_store_is_not_created_when_asked_not_to(env):
    if env.name == "sqlite":
        where = str(env.tmp_path / "missing.sqlite.db")
        with pytest.raises(StoreError, match="no such file"):
            open_backend(where, create=False)
        assert not Path(where).exists()
    else:  # a server's databases are never created, asked or not
        where = env.location.replace("/postgres?", "/no_such_db?", 1)
        assert where != env.location
        for create in (False, True):
            with pytest.raises(StoreError, match='database "no_such_db" does not exist'):
                open_backend(where, create=create)
        assert env.raw("SELECT count(*) FROM pg_database WHERE datname = 'no_such_db'") == [(0,)]


# -- what surveilr's own pages count ------------------------------------------------------------


def session_states(env: Env, session_id: str) -> list[tuple]:
    return [tuple(r) for r in env.raw(
        """SELECT from_state, to_state, transition_reason FROM orchestration_session_state
           WHERE session_id = ? AND session_entry_id IS NULL ORDER BY orchestration_session_state_id""",
        (session_id,),
    )]  # fmt: skip


@pytest.mark.parametrize("failed, last", [(False, "surveilr_orch_completed"), (True, "surveilr_orch_failed")])
def test_a_session_has_surveilrs_session_states(env, failed, last):
    b = env.open()
    sid = b.session_id
    b.flush_hits()  # its rows may wait for a write; written now
    assert session_states(env, sid) == [(INITIAL, "surveilr_orchestration_init", "kernel started")]
    assert [s for s, _ in b.open_sessions()] == [sid]
    boot = b.open_sessions()[0][1]["boot"]
    assert [s for s, _ in b.open_sessions(boot)] == [sid], "this machine's boot"
    assert b.open_sessions("another-machine's-boot") == [], "picked by the store, not read and judged here"
    b.close(failed=failed)
    (init, end) = session_states(env, sid)
    assert end[:2] == ("surveilr_orchestration_init", last)
    assert env.raw("SELECT orch_finished_at IS NOT NULL FROM orchestration_session WHERE orchestration_session_id = ?", (sid,)) == [(1,)]


def test_a_killed_kernels_session_can_be_ended_once_by_another(env):
    b, other = env.open(), env.open()
    b.flush_hits()
    (holder,) = [h for s, h in other.open_sessions() if s == b.session_id]
    assert holder["pid"] > 0 and holder["boot"] and holder["session_id"] == b.session_id
    assert other.end_session(b.session_id, failed=True, reason="kernel gone: test") is True
    assert other.end_session(b.session_id, failed=True, reason="again") is False
    assert session_states(env, b.session_id)[-1] == ("surveilr_orchestration_init", "surveilr_orch_failed", "kernel gone: test")
    assert b.session_id not in [s for s, _ in other.open_sessions()]


def test_every_recorded_end_writes_one_exec_row_and_a_fenced_one_none(env):
    from rssd_magic.store.base import ExecRow

    b = env.open()
    mine = b.claim(ask(b))
    row = ExecRow("python-cell", "contract()", 1, KEY.digest, "--force", "printed\n", "ValueError: bad", "contract", {"state": FAILED})
    b.finish(mine.running, mine.claim.token, FAILED, '{"error":{}}', "ValueError: bad", exec_row=row)
    again = b.claim(ask(b))
    seen = b.claim(ask(b)).claim
    other = env.open()
    other.claim(ask(other, takeover=seen, dead_because="test"))
    with pytest.raises(Fenced):
        b.finish(again.running, again.claim.token, EXECUTED, RESULT, "late", exec_row=row)
    rows = env.raw(
        """SELECT exec_nature, exec_code, exec_status, exec_identity, input_text, output_text, exec_error_text,
                  namespace, session_entry_id, session_id FROM orchestration_session_exec"""
    )
    assert [tuple(r) for r in rows] == [
        ("python-cell", "contract()", 1, KEY.digest, "--force", "printed\n", "ValueError: bad", "contract",
         mine.running.entry_id, b.session_id)
    ]  # fmt: skip


def test_orphaned_sessions_of_dead_processes_on_this_machine_are_closed(env):
    from rssd_magic.engine.claims import close_orphaned_sessions

    env.open().close()
    code = (
        "import os, sys; from rssd_magic.backends import open_backend; "
        "b = open_backend(sys.argv[1], session_args={'doomed': True}); b.flush_hits(); print(b.session_id, flush=True); os._exit(9)"
    )
    out = subprocess.run([sys.executable, "-c", code, env.location], capture_output=True, text=True, timeout=60)
    doomed = out.stdout.strip()
    assert doomed, out.stderr
    b = env.open()  # a store sweeps when a kernel opens it (an RSSD: once a write is possible)
    deadline = time.monotonic() + 30
    while session_states(env, doomed)[-1][1] != "surveilr_orch_failed":
        assert time.monotonic() < deadline, session_states(env, doomed)
        time.sleep(0.02)
    assert "kernel gone: process" in session_states(env, doomed)[-1][2]
    assert close_orphaned_sessions(b) == [], "closed once; live sessions (ours) are left open"


# -- moving cells between any two stores (store/transfer.py) ----------------------------------


@pytest.fixture(params=[("sqlite", "sqlite"), ("sqlite", "postgresql"), ("postgresql", "sqlite"),
                        ("postgresql", "postgresql")], ids=lambda p: "->".join(p))  # fmt: skip
def pair(request, tmp_path):
    envs = [SqliteEnv(tmp_path, f"{i}.sqlite.db") if kind == "sqlite" else PgEnv(tmp_path)
            for i, kind in enumerate(request.param)]  # fmt: skip
    yield envs
    for e in envs:
        e.close_all()


def test_cells_move_between_any_two_stores_once_with_their_blobs_and_conflicts_reported(pair):
    from rssd_magic.store.transfer import transfer

    source_env, target_env = pair
    source, target = source_env.open(), target_env.open()
    data = b"a value"
    digest = stream_digest(data)
    record = '{"format":"rssd_magic.result.v1","names":{"v":{"kind":"pickle","blob":"%s","size":7}},"outputs":[]}' % digest
    mine = source.claim(ask(source))
    done = source.finish(mine.running, mine.claim.token, EXECUTED, record, "completed", [(digest, data)],
                         [("payload-1", "key-1", "sig-1")])  # fmt: skip
    source.note_hit(done.state_id)
    source.flush_hits()
    first = transfer(source, target)
    assert first["conflicts"] == [] and first["cells"] == 1 and first["blobs"]["copied"] == 1
    assert target.latest(KEY).state_id == done.state_id and target.latest(KEY).result_json == record
    assert bytes(target.blobs.get(digest)) == data
    assert target.signatures(["payload-1"]) == {"payload-1": {"key-1": "sig-1"}}
    (cell,) = tables.cells(target)
    assert (cell.latest_hits, cell.transitions) == (1, 2)
    again = transfer(source, target)
    assert again["rows_inserted"] == 0 and again["conflicts"] == [] and again["blobs"]["present"] == 1, "idempotent"
    source_env.raw("UPDATE orchestration_session_state SET transition_reason = 'edited' WHERE orchestration_session_state_id = ?",
                   (done.state_id,))  # fmt: skip
    third = transfer(source, target)
    assert [(c["table"], c["id"], c["columns"]) for c in third["conflicts"]] == [
        ("orchestration_session_state", done.state_id, ["transition_reason"])
    ]
    assert target_env.raw(
        "SELECT transition_reason FROM orchestration_session_state WHERE orchestration_session_state_id = ?", (done.state_id,)
    ) == [("completed",)], "never overwritten"

