"""At most once across hosts, PID namespaces and clocks, with real processes
(issue 12).  Each process runs ``%%stateful`` in an IPython shell of its own:

* another host: ``unshare --uts`` with the hostname ``other``;
* a container sharing the volume: ``unshare --pid --fork --mount-proc``,
  where the holder is pid 1 of its namespace (and the host has a pid 1 too);
* clocks, on an RSSD file and on PostgreSQL: libfaketime preloaded (the
  ``libfaketime`` package from PyPI ships the library), 5 minutes behind or
  a day ahead; monotonic clocks untouched, as on real hosts;
* a stalled holder: SIGSTOP past its lease, then SIGCONT.

These need root for ``unshare``; where it is refused they skip saying so.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

pytestmark = pytest.mark.kernel

DB = "resource-surveillance.sqlite.db"

# One "kernel": an IPython shell in a process of its own running one cell.
DRIVER = r"""
import json, os, socket, sys
if os.environ.get("AS_HOST"):
    socket.sethostname(os.environ["AS_HOST"])  # inside `unshare --uts`
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
shell = InteractiveShell.instance()
shell.run_line_magic("load_ext", "rssd_magic")
magics = shell.magics_manager.registry["StatefulMagics"]
magics.lease_seconds = float(os.environ.get("LEASE", "60"))
with capture_output() as cap:
    result = shell.run_cell(sys.argv[1])
magics.close()
print(json.dumps({"ok": result.success, "stdout": cap.stdout, "stderr": cap.stderr,
                  "mark": shell.user_ns.get("mark"), "host": socket.gethostname(), "pid": os.getpid()}))
"""

# The cell: logs who ran its body, sleeps HOLD seconds, binds who it was.
# It reads nothing from the notebook, so every process computes one key.
CELL = """%%stateful{opts}
import os, socket, time
open('ran.log', 'a').write(socket.gethostname() + ' ' + os.environ.get('MARK', '?') + '\\n')
time.sleep(float(os.environ.get('HOLD', '0')))
mark = os.environ.get('MARK', '?')
"""


def _unshare_works(*flags: str) -> bool:
    try:
        return subprocess.run(["unshare", *flags, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_uts = pytest.mark.skipif(
    not _unshare_works("--uts"), reason="`unshare --uts` is refused here: run the tests as root (or with CAP_SYS_ADMIN)"
)
needs_pidns = pytest.mark.skipif(
    not _unshare_works("--pid", "--fork", "--mount-proc"),
    reason="`unshare --pid --fork --mount-proc` is refused here: run the tests as root (or with CAP_SYS_ADMIN)",
)


def faketime_env(offset: str) -> dict:
    """Environment that makes a process's wall clock read *offset* off
    (``-300`` seconds, ``+1d``), its monotonic clock left alone."""
    libfaketime = pytest.importorskip("libfaketime", reason="pip install libfaketime (in the test extra)")
    ok, env = libfaketime.get_reload_information()
    assert ok, env
    lib = Path(env["LD_LIBRARY_PATH"]) / env["LD_PRELOAD"]
    return {"LD_PRELOAD": str(lib), "FAKETIME": offset, "DONT_FAKE_MONOTONIC": "1", "FAKETIME_NO_CACHE": "1"}


def start(workdir: Path, prefix=(), opts: str = "", **env) -> subprocess.Popen:
    full = {**os.environ, **{k: str(v) for k, v in env.items()}}
    full.pop("PYTEST_CURRENT_TEST", None)
    return subprocess.Popen(
        [*prefix, sys.executable, "-c", DRIVER, CELL.format(opts=opts)],
        cwd=workdir, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 90) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def ran(workdir: Path) -> list[str]:
    log = workdir / "ran.log"
    return log.read_text().splitlines() if log.exists() else []


def chain(workdir: Path) -> list[tuple[str, str, str]]:
    conn = sqlite3.connect(workdir / DB)
    try:
        return conn.execute(
            """SELECT from_state, to_state, coalesce(transition_reason, '') FROM orchestration_session_state
               WHERE session_entry_id IS NOT NULL ORDER BY rowid"""
        ).fetchall()
    finally:
        conn.close()


@dataclass
class Store:
    """Where the processes of a clock test keep their state: the RSSD file
    in the work folder, or a PostgreSQL schema (given through
    ``RSSD_MAGIC_DB``), where leases are judged on the server's clock and
    "latest" is the server's sequence."""

    db: str
    env: dict
    chain: Callable[[], list[tuple[str, str, str]]]

    def claimed(self) -> bool:
        try:
            return any(to == "RUNNING" for _, to, _ in self.chain())
        except Exception:  # noqa: BLE001 - not created yet
            return False


def rssd_in(workdir: Path) -> Store:
    return Store(str(workdir / DB), {}, lambda: chain(workdir))


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path) -> Store:
    if request.param == "sqlite":
        return rssd_in(tmp_path)
    import pg_util

    request.getfixturevalue("pg_server")
    url = pg_util.fresh_url("liveness")
    query = """SELECT s.from_state, s.to_state, coalesce(s.transition_reason, '') FROM orchestration_session_state AS s
               JOIN rssd_magic_state_seq AS q ON q.state_id = s.orchestration_session_state_id
               WHERE s.session_entry_id IS NOT NULL ORDER BY q.seq"""
    return Store(url, {"RSSD_MAGIC_DB": url}, lambda: [tuple(r) for r in pg_util.raw(url, query)])


@needs_uts
def test_a_stalled_holder_on_another_host_is_taken_over_and_cannot_record(tmp_path):
    holder = start(tmp_path, ["unshare", "--uts", "--"], AS_HOST="other", LEASE=3, HOLD=4, MARK="stale")
    until(lambda: ran(tmp_path))  # its body runs: the claim is held and beating
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        waiter = finish(start(tmp_path, LEASE=3, MARK="fresh"))
        took = time.monotonic() - t0
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    stale = finish(holder)
    assert waiter["ok"] and waiter["mark"] == "fresh"
    assert "took over" in waiter["stdout"] and "no heartbeat from host other" in waiter["stdout"]
    assert 3 <= took < 30, "judged by the lease, on the waiter's own clock"
    assert "this run was taken over by host" in stale["stderr"] and "its result was not recorded" in stale["stderr"]
    states = [(a, b) for a, b, _ in chain(tmp_path)]
    assert states == [("INITIAL", "RUNNING"), ("RUNNING", "ABANDONED"), ("ABANDONED", "RUNNING"), ("RUNNING", "EXECUTED")]
    replay = finish(start(tmp_path, MARK="third"))
    assert replay["mark"] == "fresh", "the stale holder's result was never recorded"
    assert len(ran(tmp_path)) == 2


@needs_pidns
def test_a_live_holder_that_is_pid_1_of_another_namespace_is_waited_for(tmp_path):
    holder = start(tmp_path, ["unshare", "--pid", "--fork", "--mount-proc", "--"], HOLD=3, MARK="container")
    until(rssd_in(tmp_path).claimed)
    waiter = finish(start(tmp_path, MARK="host"))
    inside = finish(holder)
    assert inside["pid"] == 1, "the holder really was pid 1 of its namespace"
    assert waiter["ok"] and waiter["mark"] == "container", "the waiter replayed the holder's run"
    assert "took over" not in waiter["stdout"]
    assert ran(tmp_path) == [f"{inside['host']} container"], "the body ran once"
    assert [(a, b) for a, b, _ in chain(tmp_path)] == [("INITIAL", "RUNNING"), ("RUNNING", "EXECUTED")]


def test_a_heartbeating_holder_whose_clock_is_five_minutes_behind_is_not_taken_over(tmp_path, store):
    # Its claim and heartbeats carry times 300 s in the past, and its lease
    # is 2 s: judged by timestamps it would look dead at once; the waiter
    # waits past the lease while the holder beats (every third of it).
    holder = start(tmp_path, LEASE=2, HOLD=4, MARK="behind", **store.env, **faketime_env("-300"))
    until(store.claimed)
    waiter = finish(start(tmp_path, LEASE=2, MARK="on-time", **store.env))
    finish(holder)
    assert waiter["ok"] and waiter["mark"] == "behind" and "took over" not in waiter["stdout"]
    assert len(ran(tmp_path)) == 1
    assert [(a, b) for a, b, _ in store.chain()] == [("INITIAL", "RUNNING"), ("RUNNING", "EXECUTED")]


def test_a_record_from_a_clock_a_day_ahead_does_not_outrank_later_runs(tmp_path, store):
    ahead = finish(start(tmp_path, MARK="ahead", **store.env, **faketime_env("+1d")))
    assert ahead["ok"] and ran(tmp_path) == [f"{ahead['host']} ahead"]
    forced = finish(start(tmp_path, opts=" --force", MARK="forced", **store.env))
    assert forced["ok"] and len(ran(tmp_path)) == 2
    plain = finish(start(tmp_path, MARK="plain", **store.env))
    assert plain["mark"] == "forced", "the run written last replays, whatever its id or time says"
    out = subprocess.run(
        [sys.executable, "-m", "rssd_magic", "--db", store.db, "forget", "--all"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "1 cell forgotten" in out.stdout
    again = finish(start(tmp_path, MARK="after-forget", **store.env))
    assert again["mark"] == "after-forget" and len(ran(tmp_path)) == 3, "forget took effect"
    reasons = [r for _, to, r in store.chain() if to == "RUNNING"]
    assert reasons == ["first run", "forced (--force) after EXECUTED", "retry after FORGOTTEN"]
