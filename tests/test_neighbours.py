"""A store is never ours alone (issue 21, the RSSD side), each neighbour
played for real by another process: a surveilr-like writer holding the
write lock, an application's own SQLite file, a read-only bind mount of a
published report, bytes planted (or rotten) under a digest, a file deleted
or replaced by a teammate's RSSD under a running kernel, a store made by a
newer version, and a hostile file whose "table" is a view that never ends.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import counter
from shell_process import ShellProcess

pytestmark = pytest.mark.kernel

DB = "resource-surveillance.sqlite.db"
APPEND = "open('side.log', 'a').write('ran\\n')\n"
CELL = "%%stateful\n" + APPEND + "x = 41 + 1\nprint('ran the body')\n"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    return subprocess.run(
        [sys.executable, "-m", "rssd_magic", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def query(path: Path, sql: str, params: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(path, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def record_once(workdir: Path, cell: str = CELL, **settings) -> None:
    """Run *cell* in a kernel process of its own, and shut it down."""
    k = ShellProcess(workdir, **settings)
    try:
        assert "ran the body" in k.ok(cell)["stdout"]
    finally:
        k.close()


def until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- a neighbour holding the write lock ------------------------------------------------

HOLDER = r"""
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("INSERT INTO device (device_id, name, state, boundary) VALUES ('ingest', 'ingest', '\"SINGLETON\"', 'x')")
print("held", flush=True)
time.sleep(600)
"""


def test_a_neighbour_holding_the_write_lock_slows_no_replay(tmp_path):
    record_once(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / DB)], stdout=subprocess.PIPE, text=True)
    k = None
    try:
        assert holder.stdout.readline().strip() == "held"
        # A fresh kernel replays while a surveilr ingest holds the lock: it
        # never waits for it (with a 30 s busy timeout, waiting would show).
        k = ShellProcess(tmp_path, busy_timeout_seconds=30.0)
        started = time.monotonic()
        replayed = k.ok(CELL)
        waited = time.monotonic() - started
        assert any("replayed" in d for d in replayed["displays"])
        assert k.value("x") == 42 and waited < 20, waited
        assert counter(tmp_path / "side.log") == 1
        # A cell that must run waits for the lock up to the busy timeout,
        # says once that it waits and for whom, then fails without running.
        impatient = ShellProcess(tmp_path, busy_timeout_seconds=2.0)
        try:
            must_run = impatient.run("%%stateful\n" + APPEND + "y = 1\n")
        finally:
            impatient.kill()
        assert not must_run["ok"] and must_run["error"].startswith("UsageError: %%stateful: RSSD")
        assert "database is locked" in must_run["error"] and f"held by pid {holder.pid}" in must_run["error"]
        assert "not run" in must_run["error"]
        assert must_run["stdout"].count("waiting up to 2s for the write lock") == 1
        assert counter(tmp_path / "side.log") == 1
    finally:
        holder.kill()
        holder.wait()
    # Once the lock is free the kernel's session and replay count are
    # written (here by its shutdown): nothing it owed the store is lost.
    k.close()
    assert query(tmp_path / DB, "SELECT count(*) FROM orchestration_session") == [(2,)], "the killed one never wrote"
    assert query(tmp_path / DB, "SELECT hits FROM rssd_magic_hit") == [(1,)]
    assert query(tmp_path / DB, "SELECT count(*) FROM device WHERE device_id = 'ingest'") == [(0,)]


# -- an application's own database -------------------------------------------------------


def test_an_application_database_is_refused_byte_for_byte_untouched(tmp_path):
    app = tmp_path / "app.db"
    conn = sqlite3.connect(app)
    conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO customers (name) VALUES ('Ada')")
    conn.commit()
    conn.close()
    before = app.read_bytes()
    k = ShellProcess(tmp_path)
    try:
        ran = k.run(f"%%stateful --db {app}\n" + APPEND)
    finally:
        k.close()
    assert not ran["ok"] and ran["error"].startswith("UsageError: %%stateful: RSSD " + str(app))
    assert "not an RSSD" in ran["error"] and "customers" in ran["error"] and "Traceback" not in ran["stderr"]
    listed = cli("--db", str(app), "list", cwd=tmp_path)
    assert listed.returncode == 1 and "not an RSSD" in listed.stderr and str(app) in listed.stderr
    assert len(listed.stderr.strip().splitlines()) == 1
    assert app.read_bytes() == before and counter(tmp_path / "side.log") == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("app.db")) == ["app.db"]
    assert query(app, "PRAGMA journal_mode") == [("delete",)]


# -- a published RSSD on a read-only mount ------------------------------------------------


def _unshare_mount_works() -> bool:
    try:
        return subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _unshare_mount_works(), reason="`unshare --mount` is refused here: run the tests as root")
def test_a_published_rssd_on_a_read_only_mount_replays(tmp_path):
    pub = tmp_path / "report"
    pub.mkdir()
    record_once(pub)
    files = sorted(p.name for p in pub.iterdir())
    # The kernel sees the report's folder through a read-only bind mount.
    ro = ["unshare", "--mount", "sh", "-c", f"mount --bind -o ro '{pub}' '{pub}' && exec \"$0\" \"$@\""]
    k = ShellProcess(pub, prefix=ro)
    try:
        plain, only = k.ok(CELL), k.ok("%%stateful --replay-only\n" + CELL.split("\n", 1)[1])
        new = k.run("%%stateful\n" + APPEND + "z = 3\n")
        assert k.value("x") == 42
    finally:
        k.close()
    for ran in (plain, only):
        assert any("replayed" in d for d in ran["displays"])
    said = plain["stdout"] + only["stdout"] + new["stdout"]
    assert said.count("is read-only here") == 1, said
    assert not new["ok"] and "read-only" in new["error"] and "not run" in new["error"]
    assert sorted(p.name for p in pub.iterdir()) == files and counter(pub / "side.log") == 1


# -- bytes planted or rotten under a digest ----------------------------------------------

ARRAY_CELL = "%%stateful\nimport numpy as np\n" + APPEND + "arr = np.arange(100_000, dtype='float64')\nprint('ran the body')\n"


def _digests_of_arr() -> list[tuple[str, int]]:
    """The blobs the cell will record for ``arr``, computed as it will."""
    import numpy as np

    from rssd_magic.records.serialize import dump_value

    _, blobs = dump_value(np.arange(100_000, dtype="float64"))
    return [(digest, memoryview(data).nbytes) for digest, data in blobs]


def test_bytes_planted_under_a_digest_are_never_named_by_a_record(tmp_path):
    from rssd_magic.backends import open_backend

    open_backend(str(tmp_path / DB)).close()
    planted = _digests_of_arr()
    conn = sqlite3.connect(tmp_path / DB)
    for digest, size in planted:  # the right digest and length, other bytes
        conn.execute("INSERT INTO rssd_magic_blob (digest, size, data) VALUES (?, ?, zeroblob(?))", (digest, size, size))
    conn.commit()
    conn.close()
    record_once(tmp_path, ARRAY_CELL)
    checked = cli("verify", cwd=tmp_path)
    assert checked.returncode == 0 and "all intact" in checked.stdout, checked.stdout + checked.stderr
    k = ShellProcess(tmp_path)
    try:
        k.ok(ARRAY_CELL)
        assert k.value("float(arr.sum())") == float(sum(range(100_000)))
    finally:
        k.close()
    assert counter(tmp_path / "side.log") == 1


def _rot(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("UPDATE rssd_magic_blob SET data = zeroblob(length(data)) WHERE size > 100000")
    conn.commit()
    conn.close()


def test_verify_finds_rotten_blobs_and_force_or_repair_mends_the_cell(tmp_path):
    record_once(tmp_path, ARRAY_CELL)
    _rot(tmp_path / DB)
    found = cli("verify", cwd=tmp_path)
    assert found.returncode == 1 and "bad blob" in found.stdout and "(arr)" in found.stdout
    # --force runs the body again and rewrites the bad bytes under the digest.
    record_once(tmp_path, ARRAY_CELL.replace("%%stateful", "%%stateful --force"))
    assert cli("verify", cwd=tmp_path).returncode == 0
    _rot(tmp_path / DB)
    repaired = cli("verify", "--repair", cwd=tmp_path)
    assert repaired.returncode == 1 and "repaired" in repaired.stdout
    assert cli("verify", cwd=tmp_path).returncode == 0, "nothing bad is named any more"
    record_once(tmp_path, ARRAY_CELL)  # forgotten: it runs again, and records good bytes
    assert counter(tmp_path / "side.log") == 3
    assert cli("verify", cwd=tmp_path).returncode == 0


# -- the file deleted or replaced under a running kernel -----------------------------------


def test_an_rssd_deleted_under_a_running_kernel_starts_anew(tmp_path):
    k = ShellProcess(tmp_path)
    try:
        k.ok(CELL)
        os.remove(tmp_path / DB)  # "delete the RSSD to start over"
        second = k.ok("%%stateful\n" + APPEND + "w = 2\n")
        assert second["stdout"].count("was deleted while this kernel had it open; starting a new one") == 1
    finally:
        k.close()
    # The second cell was recorded in the new file; the first one was not.
    assert query(tmp_path / DB, "PRAGMA integrity_check") == [("ok",)]
    k = ShellProcess(tmp_path)
    try:
        k.ok("%%stateful\n" + APPEND + "w = 2\n")
        assert counter(tmp_path / "side.log") == 2
        k.ok(CELL)
        assert counter(tmp_path / "side.log") == 3, "the first cell was in the deleted file"
    finally:
        k.close()


def test_a_teammates_rssd_arriving_under_the_name_keeps_its_records(tmp_path):
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.mkdir()
    theirs.mkdir()
    teammate_cell = "%%stateful\n" + APPEND + "team = 'theirs'\n"
    k = ShellProcess(theirs)
    try:
        k.ok(teammate_cell)
    finally:
        k.close()
    k = ShellProcess(mine)
    try:
        k.ok(CELL)
        # An idle kernel lets go of the file: no -shm of its own is left for
        # a newcomer to be read through.
        until(lambda: not (mine / (DB + "-shm")).exists())
        arrived = mine / "incoming.db"
        arrived.write_bytes((theirs / DB).read_bytes())
        os.replace(arrived, mine / DB)  # git pull, rsync: a new file renamed over the old
        assert query(mine / DB, "PRAGMA integrity_check") == [("ok",)]
        assert query(mine / DB, "SELECT count(*) FROM orchestration_session_state WHERE to_state = 'EXECUTED'") == [(1,)]
        # Another process reads the newcomer while the kernel still has the
        # old file open: the teammate's record is there, and replays.
        other = ShellProcess(mine)
        try:
            other.ok(teammate_cell)
            assert other.value("team") == "theirs"
        finally:
            other.close()
        assert counter(mine / "side.log") == 1
        third = k.ok("%%stateful\n" + APPEND + "v = 3\n")
        assert "replaced by another file while this kernel had it open" in third["stdout"]
    finally:
        k.close()
    assert query(mine / DB, "PRAGMA integrity_check") == [("ok",)]
    k = ShellProcess(mine)
    try:
        k.ok(teammate_cell)
        k.ok("%%stateful\n" + APPEND + "v = 3\n")  # recorded in the newcomer: replays
        assert counter(mine / "side.log") == 2 and k.value("team") == "theirs"
        k.ok(CELL)
        assert counter(mine / "side.log") == 3, "the first cell was recorded in the old file only"
    finally:
        k.close()
