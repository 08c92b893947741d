"""Fast tier: RSSDs that another program or another version made — a
schema newer than this version knows, a view or a trigger where our table
should be, a damaged page — are used only as far as is safe, and refused in
one line otherwise."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

import pytest
from IPython.core.error import UsageError

from conftest import counter

APPEND = "open('side.log', 'a').write('ran\\n')\n"
CELL = "%%stateful\n" + APPEND + "x = 42\n"


def test_a_store_made_by_a_newer_version_replays_and_is_never_written(kernel):
    kernel.ok(CELL)
    kernel.restart()
    conn = sqlite3.connect(kernel.db)
    conn.execute("UPDATE rssd_magic_meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    before = kernel.rows("SELECT count(*) FROM orchestration_session_state")
    ran = kernel.ok(CELL)
    assert kernel.shell.user_ns["x"] == 42 and counter(kernel.workdir / "side.log") == 1
    assert "schema version 99" in ran.stdout and "upgrade rssd_magic" in ran.stdout
    new = kernel.run("%%stateful\n" + APPEND + "y = 1\n")
    err = new.result.error_in_exec
    assert type(err) is UsageError and "schema version 99" in str(err) and "not run" in str(err)
    for command in ("%stateful forget --all", "%stateful gc"):
        refused = kernel.run(command).result.error_in_exec
        assert type(refused) is UsageError and "schema version 99" in str(refused)
    kernel.restart()
    assert kernel.rows("SELECT value FROM rssd_magic_meta WHERE key = 'schema_version'") == [("99",)]
    assert kernel.rows("SELECT count(*) FROM orchestration_session_state") == before
    assert counter(kernel.workdir / "side.log") == 1


def test_a_view_that_never_ends_in_place_of_our_table_is_refused_at_once(kernel):
    kernel.ok(CELL)
    kernel.restart()
    conn = sqlite3.connect(kernel.db)
    conn.executescript(
        """DROP TABLE rssd_magic_signature;
           CREATE VIEW rssd_magic_signature (payload_id, key_id, signature, created_at) AS
             WITH RECURSIVE forever(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM forever)
             SELECT n, n, n, n FROM forever;"""
    )
    conn.close()
    started = time.monotonic()
    ran = kernel.run(CELL)
    err = ran.result.error_in_exec
    assert type(err) is UsageError and "rssd_magic_signature is a view, not a plain table" in str(err)
    assert time.monotonic() - started < 30 and "x" not in kernel.shell.user_ns


def test_a_trigger_on_our_table_is_refused(kernel):
    kernel.ok(CELL)
    kernel.restart()
    conn = sqlite3.connect(kernel.db)
    conn.execute("CREATE TRIGGER spy AFTER INSERT ON rssd_magic_hit BEGIN SELECT 1; END")
    conn.close()
    err = kernel.run(CELL).result.error_in_exec
    assert type(err) is UsageError and "trigger spy on our table rssd_magic_hit" in str(err)


@pytest.fixture
def damaged(tmp_path):
    """An RSSD whose cell rows sit on a page that was overwritten with junk
    (the header and the schema still read)."""
    from rssd_magic.backends import open_backend

    path = tmp_path / "damaged.db"
    b = open_backend(str(path))
    b.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = DELETE")
    roots = [r for (r,) in conn.execute(
        "SELECT rootpage FROM sqlite_master WHERE name IN ('orchestration_session_entry', 'rssd_magic_entry_src_idx')"
    )]  # fmt: skip
    (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    conn.close()
    with open(path, "r+b") as fh:
        for root in roots:
            fh.seek((root - 1) * page_size)
            fh.write(b"\xff" * page_size)
    return path


def test_a_damaged_store_is_one_line_from_the_cli(damaged):
    done = subprocess.run(
        [sys.executable, "-m", "rssd_magic", "--db", str(damaged), "list"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"rssd-magic: RSSD {damaged}:") and len(done.stderr.strip().splitlines()) == 1
