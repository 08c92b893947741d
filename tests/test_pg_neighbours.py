"""Never fail because of the neighbours, on PostgreSQL: a pooler between the
kernels and the server, a server that restarts, connections killed under a
running and a waiting kernel, an outage longer than the busy timeout.

Everything runs the package as a user drives it — real kernels, the
in-process shell, the backend — against real processes: a real PgBouncer
(pgbouncer_util.py) in front of the session's server, and a server of this
module's own (pg_util.OwnServer) for the tests that stop or restart one.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

import pgbouncer_util
from conftest import counter
from kernel_util import banners, errors_of, execute, plain_traceback, text_of
from pg_util import own_pg, own_server, raw, with_options  # noqa: F401 - own_pg, own_server: fixtures
from rssd_magic.engine.acquire import acquire
from rssd_magic.store import tables
from rssd_magic.backends import open_backend
from rssd_magic.store.transfer import transfer
from rssd_magic.store.base import ClaimRequest, StoreError
from rssd_magic.engine.claims import current_holder
from rssd_magic.engine.keys import cell_key
from rssd_magic.engine.lifecycle import EXECUTED
from test_kernel_concurrency import LOAD, RACE_CELL, USE_NAME, HeldKernel, lines, wait_for_lines

KEY = cell_key("neighbours()", "team")


def ask(backend, key=KEY, elsewhere: bool = False) -> ClaimRequest:
    """A claim request; *elsewhere*: made as if by a kernel of another
    machine (judged by its heartbeat only, not as this very process)."""
    holder = current_holder(backend.session_id or "")
    if elsewhere:
        holder = replace(holder, boot="another-machine", pidns="another-pidns")
    return ClaimRequest(key, "neighbours()", {}, holder, 60.0)


def pairs(url: str) -> list[tuple[str, str]]:
    return [tuple(r) for r in raw(url, """SELECT s.from_state, s.to_state FROM orchestration_session_state AS s
                                          JOIN rssd_magic_state_seq AS q ON q.state_id = s.orchestration_session_state_id
                                          WHERE s.session_entry_id IS NOT NULL ORDER BY q.seq""")]  # fmt: skip


# -- behind PgBouncer ----------------------------------------------------------------


@pytest.fixture
def bouncer(pg_server):
    """A PgBouncer (pool of 2 server connections) for a role whose default
    search_path is its own schema: ``(bouncer, role, schema)``."""
    pgbouncer_util.require()
    role, schema = pgbouncer_util.role_with_schema(pg_server)
    bouncer = pgbouncer_util.Bouncer(pg_server, [role], pool_size=2)
    yield bouncer, role, schema
    bouncer.close()


def barrier(n: int) -> str:
    """A cell that returns once *n* kernels in this folder reached it."""
    return (
        "import os, time\n"
        'open(f"ready-{os.getpid()}", "w").close()\n'
        "_deadline = time.time() + 45\n"
        f'while sum(f.startswith("ready-") for f in os.listdir(".")) < {n} and time.time() < _deadline:\n'
        "    time.sleep(0.01)\n"
    )


@pytest.mark.kernel
def test_four_kernels_race_one_cell_through_pgbouncer_in_transaction_pooling(bouncer, pg_server, tmp_path, monkeypatch):
    pool, role, schema = bouncer
    monkeypatch.setenv("RSSD_MAGIC_DB", pool.url("tx", role))
    monkeypatch.delenv("SURVEILR_STATEDB_FS_PATH", raising=False)
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    cells = [LOAD, barrier(4), RACE_CELL, USE_NAME]
    with ThreadPoolExecutor(max_workers=4) as threads:
        nbs = list(threads.map(lambda _: execute(cells, tmp_path, allow_errors=True, timeout=120), range(4)))
    for nb in nbs:
        assert [errors_of(c) for c in nb.cells] == [[]] * len(cells), [
            plain_traceback(e) for c in nb.cells for e in errors_of(c)
        ]
    (ran,) = lines(tmp_path / "race.log")
    winner = int(ran.split()[-1])
    for nb in nbs:  # every kernel shows the one run's output and has its name
        assert text_of(nb.cells[2], "stdout") == f"stateful body ran in {winner}\n"
        assert text_of(nb.cells[3]) == f"winner was {winner}\n"
    assert sorted(len(banners(nb.cells[2])) for nb in nbs) == [0, 1, 1, 1], "one ran, three replayed"
    direct = with_options(pg_server, options=f"-c search_path={schema}")
    assert pairs(direct) == [("INITIAL", "RUNNING"), ("RUNNING", "EXECUTED")]
    assert raw(direct, "SELECT count(*) FROM orchestration_session") == [(4,)]


@pytest.mark.parametrize("mode", ["tx", "session"])
def test_behind_pgbouncer_the_schema_chosen_at_open_holds_and_a_waiter_replays(bouncer, pg_server, mode):
    pool, role, schema = bouncer
    url = pool.url(mode, role)
    holder, waiter = open_backend(url, session_args={}), open_backend(url, session_args={})
    try:
        assert holder.schema == schema, "chosen by the role's default search_path: PgBouncer drops options"
        assert holder.pooled and waiter.pooled, "a pooler is detected: nobody LISTENs"
        # Every server connection replaced, now defaulting to another schema:
        # a statement that leaned on a session's search_path would miss.
        other = f"other_{schema}"
        raw(pg_server, f'CREATE SCHEMA "{other}" AUTHORIZATION "{role}"')
        raw(pg_server, f'ALTER ROLE "{role}" SET search_path = "{other}"')
        raw(pg_server, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ?", (role,))
        for _ in range(12):  # more than psycopg's prepare threshold (5): nothing is prepared
            assert holder.latest(KEY) is None
        mine = holder.claim(ask(holder, elsewhere=True))
        waiting, got = threading.Event(), {}

        def wait() -> None:
            got["outcome"] = acquire(waiter, ask(waiter), on_wait=lambda *_: waiting.set(), wait_for_change=waiter.wait_for_change)

        thread = threading.Thread(target=wait)
        thread.start()
        assert waiting.wait(30), "the waiter found the cell held"
        done = holder.finish(mine.running, mine.claim.token, EXECUTED, "{}", "completed")
        thread.join(30)
        assert got["outcome"].kind == "done" and got["outcome"].previous.state_id == done.state_id
    finally:
        holder.close()
        waiter.close()
    direct = with_options(pg_server, options=f"-c search_path={schema}")
    assert pairs(direct) == [("INITIAL", "RUNNING"), ("RUNNING", "EXECUTED")]
    assert raw(pg_server, "SELECT count(*) FROM information_schema.tables WHERE table_schema = ?", (other,)) == [(0,)]


# -- a restart, killed connections ------------------------------------------------------

HOLD_CELL = """%%stateful
import os, time
with open("started.log", "a") as _fh:
    _fh.write(f"{os.getpid()}\\n")
_deadline = time.time() + 90
while not os.path.exists("go") and time.time() < _deadline:
    time.sleep(0.05)
made_by = os.getpid()
print("ran in", made_by)
"""


def _iopub_until(kernel: HeldKernel, msg_id: str, stop, timeout: float = 60) -> list[dict]:
    """The iopub messages of cell *msg_id* up to the first for which
    *stop(msg)* is true (an AssertionError when none comes in time)."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = kernel.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - queue.Empty: the deadline decides
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        seen.append(msg)
        if stop(msg):
            return seen
    raise AssertionError(f"cell {msg_id}: never came: {[m['msg_type'] for m in seen]}")


def _is_status(msg: dict) -> bool:
    return msg["msg_type"] in ("display_data", "update_display_data") and bool(
        (msg["content"].get("metadata") or {}).get("rssd_magic", {}).get("status")
    )


def _idle(msg: dict) -> bool:
    return msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"


def _beat(url: str) -> int:
    found = raw(url, "SELECT beat FROM rssd_magic_claim WHERE state_id IS NOT NULL")
    return int(found[0][0]) if found else -1


def _wait_beat(url: str, above: int, timeout: float = 40) -> int:
    deadline = time.monotonic() + timeout
    while (beat := _beat(url)) <= above:
        assert time.monotonic() < deadline, f"no heartbeat above {above} within {timeout}s"
        time.sleep(0.1)
    return beat


def _wait_connected(url: str, *names: str, timeout: float = 30) -> None:
    """Until a connection with each application name is open."""
    deadline = time.monotonic() + timeout
    query = "SELECT DISTINCT application_name FROM pg_stat_activity WHERE application_name LIKE 'rssd_magic%'"
    while not set(names) <= {name for (name,) in raw(url, query)}:
        assert time.monotonic() < deadline, f"no connection named {names} within {timeout}s"
        time.sleep(0.05)


@pytest.mark.kernel
def test_a_restart_and_killed_connections_are_ridden_out_by_the_holder_and_its_waiter(own_pg, tmp_path, monkeypatch):
    url = own_pg.fresh_url("restart")
    monkeypatch.setenv("RSSD_MAGIC_DB", url)
    monkeypatch.delenv("SURVEILR_STATEDB_FS_PATH", raising=False)
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    config = "%config StatefulMagics.lease_seconds = 9"  # a beat every 3 s: seen to resume in the test's time
    a, b = HeldKernel(tmp_path), HeldKernel(tmp_path)
    try:
        for k in (a, b):
            assert k.run(LOAD)["status"] == "ok" and k.run(config)["status"] == "ok"
        running = a.start(HOLD_CELL)
        wait_for_lines(tmp_path / "started.log", 1)
        waiting = b.start(HOLD_CELL)
        _iopub_until(b, waiting, _is_status)  # B waits for A
        beat = _wait_beat(url, 0)
        own_pg.stop()
        time.sleep(1.5)  # the outage itself, not a synchronization
        own_pg.start()
        _wait_beat(url, beat)  # A's heartbeat came back by itself
        _wait_connected(own_pg.url, "rssd_magic", "rssd_magic heartbeat")  # B polls again, A beats
        killed = raw(own_pg.url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'rssd_magic%'")
        assert len(killed) >= 2, "A's heartbeat, B's main connection (and its listener)"
        (tmp_path / "go").touch()
        shown_a = _iopub_until(a, running, _idle)
        shown_b = _iopub_until(b, waiting, _idle)
        assert a.reply(running)["status"] == "ok" and b.reply(waiting)["status"] == "ok"
        has = _iopub_until(b, b.kc.execute("print('b has', made_by)"), _idle)
    finally:
        a.close()
        b.close()
    text_a = "".join(m["content"].get("text", "") for m in shown_a if m["msg_type"] == "stream")
    text_b = "".join(m["content"].get("text", "") for m in shown_b if m["msg_type"] == "stream")
    assert text_a == f"ran in {a.pid}\n", "A ran the cell and recorded it, no complaint"
    assert f"ran in {a.pid}\n" in text_b and "could not" not in text_b, "B replayed A's output"
    assert any(_is_status(m) and "replaying its result" in m["content"]["data"]["text/plain"] for m in shown_b)
    assert "".join(m["content"].get("text", "") for m in has if m["msg_type"] == "stream") == f"b has {a.pid}\n"
    assert lines(tmp_path / "started.log") == [str(a.pid)], "the body ran once"
    assert pairs(url) == [("INITIAL", "RUNNING"), ("RUNNING", "EXECUTED")]


# -- an outage longer than the busy timeout --------------------------------------------

APPEND = "open('side.log', 'a').write('ran\\n')\n"


def _with_password(url: str) -> str:
    return url.replace("postgresql://postgres@", "postgresql://postgres:s3cret@", 1)


def test_an_outage_past_the_busy_timeout_is_one_line_for_a_waiter_and_the_cell_is_not_run(kernel, own_pg):
    url = _with_password(own_pg.fresh_url("waiter"))
    kernel.magics.rssd_path = url
    kernel.magics.busy_timeout_seconds = 1.5
    holder = open_backend(url, session_args={})
    cell = "%%stateful --scope team --name outage\n" + APPEND + "x = 1\n"
    assert holder.claim(ask(holder, cell_key("", "team", "outage"), elsewhere=True)).kind == "run"

    def stop_when_waiting() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the waiter's listener is up: it waits
            if raw(own_pg.url, "SELECT 1 FROM pg_stat_activity WHERE application_name = 'rssd_magic listener'"):
                own_pg.stop()
                return
            time.sleep(0.05)

    stopper = threading.Thread(target=stop_when_waiting)
    stopper.start()
    try:
        err = kernel.run(cell).result.error_in_exec
    finally:
        stopper.join()
        holder.close()
    text = str(err)
    assert type(err).__name__ == "UsageError" and "\n" not in text, text
    assert f"host {own_pg.folder} port 5432" in text and "database postgres" in text, text
    assert "longer than the busy timeout" in text and "The cell was not run" in text and "s3cret" not in text, text
    assert counter(kernel.workdir / "side.log") == 0


def test_an_outage_past_the_busy_timeout_leaves_a_holder_could_not_record(kernel, own_pg):
    url = _with_password(own_pg.fresh_url("holder"))
    kernel.magics.rssd_path = url
    kernel.magics.busy_timeout_seconds = 1.5
    kernel.shell.user_ns["stop_the_server"] = own_pg.stop
    ran = kernel.run("%%stateful --name held\n" + APPEND + "stop_the_server()\ny = 2\n")
    assert ran.result.success, "the body ran; only its record could not be written"
    (note,) = [ln for ln in ran.stderr.splitlines() if "could not be recorded" in ln]
    assert f"host {own_pg.folder} port 5432" in note and "it will run again next time" in note and "s3cret" not in note
    own_pg.start()
    # The next cell first writes the end that could not be written, then the
    # cell (the same name) runs again, as the note said.
    kernel.ok("%%stateful --name held\n" + APPEND + "y = 2\n")
    assert pairs(url) == [("INITIAL", "RUNNING"), ("RUNNING", "FAILED"), ("FAILED", "RUNNING"), ("RUNNING", "EXECUTED")]
    (reason,) = raw(url, "SELECT transition_reason FROM orchestration_session_state WHERE to_state = 'FAILED'")
    assert reason[0].startswith("could not record:") and "s3cret" not in reason[0]
    assert counter(kernel.workdir / "side.log") == 2


def test_with_the_server_gone_every_path_says_store_error_naming_the_server(own_pg, tmp_path):
    url = _with_password(own_pg.fresh_url("gone"))
    b = open_backend(url, session_args={}, busy_timeout_s=0.3)
    file = open_backend(str(tmp_path / "x.db"))
    try:
        mine = b.claim(ask(b))
        renewer = b.renewer()
        renewer.renew({mine.running.state_id: mine.claim.token})
        own_pg.stop()
        calls = {
            "latest": lambda: b.latest(KEY),
            "claim_of": lambda: b.claim_of(mine.running),
            "claim": lambda: b.claim(ask(b, cell_key("other()", "team"))),
            "finish": lambda: b.finish(mine.running, mine.claim.token, EXECUTED, "{}", "completed"),
            "cells": lambda: list(tables.cells(b)),
            "storage": lambda: tables.counts(b),
            "signatures": lambda: b.signatures(["p"]),
            "blob": lambda: b.blobs.get("sha256:" + "0" * 64),
            "blob sizes": b.blobs.sizes,
            "export": lambda: transfer(b, file),
            "heartbeat": lambda: renewer.renew({mine.running.state_id: mine.claim.token}),
        }
        for what, call in calls.items():
            with pytest.raises(StoreError) as err:
                call()
            text = str(err.value)
            assert "\n" not in text and "s3cret" not in text and text.startswith("PostgreSQL postgresql://"), (what, text)
    finally:
        b.close()
        file.close()
