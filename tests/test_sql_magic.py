"""Run-once SQL cells (%%stateful --sql) on DuckDB, sqlite3 and the RSSD itself."""

from __future__ import annotations

import subprocess
import sys

import duckdb
import pytest
from pandas.testing import assert_frame_equal

from kernel_util import errors_of, execute, query, text_of, banners

CREATE = (
    "%%stateful --sql --conn con --out df\n"
    "CREATE TABLE t AS SELECT range AS i, 'n' || range AS s FROM range(5);\n"
    "-- the rows to look at\n"
    "SELECT i, s FROM t WHERE i < $limit ORDER BY i;\n"
)


def count_tables(path, name):
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).fetchone()[0]
    finally:
        con.close()


def test_create_then_select_runs_once_and_replays_the_table(kernel):
    kernel.ok("import duckdb\ncon = duckdb.connect('w.duckdb')\nlimit = 3")
    first = kernel.ok(CREATE)
    df = kernel.shell.user_ns["df"]
    assert list(df["i"]) == [0, 1, 2] and list(df["s"]) == ["n0", "n1", "n2"]
    assert kernel.shell.user_ns["_"] is df
    kernel.restart()
    kernel.ok("import duckdb\ncon = duckdb.connect('w.duckdb')\nlimit = 3")
    second = kernel.ok(CREATE.replace("-- the rows to look at\n", "").replace("SELECT i", "SELECT   i"))
    assert second.banner and "already exists" not in second.stdout + second.stderr
    assert_frame_equal(kernel.shell.user_ns["df"], df)
    assert "n2" in first.stdout  # shown as Out[n] on the first run too
    (html,) = kernel.rows(
        "SELECT json_extract(transition_result, '$.outputs[0].data.\"text/html\"') FROM orchestration_session_state "
        "WHERE to_state = 'EXECUTED'"
    )[0]
    assert "<table" in html and "n2" in html
    states = kernel.states()
    assert states == [("INITIAL", "RUNNING"), ("RUNNING", "EXECUTED")]


def test_parameter_change_reruns(kernel):
    kernel.ok("import duckdb\ncon = duckdb.connect('p.duckdb')\nlimit = 2")
    cell = "%%stateful --sql --conn con --out r\nSELECT range AS i FROM range(10) WHERE i < $limit"
    kernel.ok(cell)
    assert len(kernel.shell.user_ns["r"]) == 2
    kernel.ok("limit = 4")
    kernel.ok(cell)
    assert len(kernel.shell.user_ns["r"]) == 4
    assert len([s for s in kernel.states() if s[1] == "EXECUTED"]) == 2
    kernel.ok("limit = 2")
    kernel.ok(cell)
    assert len(kernel.shell.user_ns["r"]) == 2
    assert len([s for s in kernel.states() if s[1] == "EXECUTED"]) == 2, "limit=2 replays"


def test_sqlite_connection_and_colon_parameters(kernel):
    kernel.ok("import sqlite3\nlite = sqlite3.connect('l.db')\nwho = 'ada'")
    cell = "%%stateful --sql --conn lite --out people\nCREATE TABLE p(name TEXT);\nINSERT INTO p VALUES (:who);\nSELECT * FROM p;"
    kernel.ok(cell)
    kernel.ok(cell)
    assert list(kernel.shell.user_ns["people"]["name"]) == ["ada"]
    assert kernel.rows("SELECT count(*) FROM p", db=kernel.workdir / "l.db") == [(1,)]


def test_failing_statement_shows_the_database_message_rolls_back_and_is_not_cached(kernel):
    kernel.ok("import duckdb\ncon = duckdb.connect('f.duckdb')")
    cell = "%%stateful --sql --conn con\nCREATE TABLE made(x INT);\nSELECT * FROM missing_table;"
    for _ in range(2):
        ran = kernel.run(cell)
        err = ran.result.error_in_exec
        assert type(err).__name__ == "SQLCellError"
        assert "missing_table" in str(err) and "rolled back" in str(err)
        assert "Traceback" not in ran.stdout + ran.stderr
    kernel.shell.user_ns["con"].close()
    assert count_tables(kernel.workdir / "f.duckdb", "made") == 0
    assert [s[1] for s in kernel.states()] == ["RUNNING", "FAILED", "RUNNING", "FAILED"]


def test_sql_on_the_rssd_itself_creates_a_table_once(kernel):
    cell = "%%stateful --sql\nCREATE TABLE my_notes(note TEXT);\nINSERT INTO my_notes VALUES ('once');"
    first = kernel.ok(cell)
    assert "2 statements, 1 row changed" in first.stdout
    kernel.restart()
    kernel.ok(cell)
    assert kernel.rows("SELECT note FROM my_notes") == [("once",)]
    assert kernel.rows("PRAGMA integrity_check") == [("ok",)]


def test_sql_usage_errors_name_the_option(kernel):
    for cell, words in [
        ("%%stateful --sql --conn nothere\nSELECT 1", "--conn nothere"),
        ("%%stateful --sql\nSELECT $ghost", "ghost"),
        ("%%stateful --out x\ny = 1", "--sql"),
    ]:
        err = kernel.run(cell).result.error_in_exec
        assert type(err).__name__ == "UsageError" and words in str(err), (cell, err)


@pytest.fixture
def locked_duckdb(tmp_path):
    """A DuckDB file held open for writing by another process: (path, pid)."""
    path = tmp_path / "locked.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb,sys;c=duckdb.connect(sys.argv[1]);print('ready',flush=True);sys.stdin.read()", str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        yield path, holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)


def test_duckdb_lock_held_by_another_process_is_named(kernel, locked_duckdb):
    path, pid = locked_duckdb
    kernel.ok("import duckdb\nmem = duckdb.connect()")
    ran = kernel.run(f"%%stateful --sql --conn mem\nATTACH '{path}' AS other;\nSELECT 1;")
    err = ran.result.error_in_exec
    assert type(err).__name__ == "SQLCellError" and f"PID {pid}" in str(err)


@pytest.mark.kernel
def test_sql_cells_in_two_fresh_kernels(tmp_path):
    cells = [
        "%load_ext rssd_magic",
        "import duckdb\ncon = duckdb.connect('k.duckdb')\nlimit = 3",
        CREATE,
        "con.close()\nprint(df.shape, list(df.columns))",
        "%%stateful --sql\nCREATE TABLE rssd_note(x TEXT); INSERT INTO rssd_note VALUES ('k');",
    ]
    first = execute(cells, tmp_path)
    second = execute(cells, tmp_path)
    assert text_of(first.cells[3]) == text_of(second.cells[3]) == "(3, 2) ['i', 's']\n"
    assert not banners(first.cells[2]) and len(banners(second.cells[2])) == 1
    html = [o for o in second.cells[2].outputs if o["output_type"] == "execute_result"][0]["data"]["text/html"]
    assert "<table" in html and "n2" in html
    assert count_tables(tmp_path / "k.duckdb", "t") == 1
    assert query(tmp_path / "resource-surveillance.sqlite.db", "SELECT x FROM rssd_note") == [("k",)]
    failing = "%%stateful --sql --conn con\nSELECT * FROM nope"
    nb = execute(["%load_ext rssd_magic", "import duckdb\ncon = duckdb.connect('k2.duckdb')", failing, failing],
                 tmp_path, allow_errors=True)  # fmt: skip
    for cell in nb.cells[2:]:  # a failure is not recorded as a result: it fails again
        (err,) = errors_of(cell)
        assert err["ename"] == "SQLCellError" and "nope" in err["evalue"]


def test_duckdb_lock_in_a_plain_cell_names_the_holder_in_one_line(kernel, locked_duckdb):
    path, pid = locked_duckdb
    ran = kernel.run(f"import duckdb\nduckdb.connect({str(path)!r})")
    assert type(ran.result.error_in_exec).__name__ == "IOException"
    assert f"PID {pid}" in ran.stdout and "Traceback" not in ran.stdout
    other = kernel.run("import duckdb\nduckdb.connect('/nonexistent-dir/x.duckdb')")
    assert "Traceback (most recent call last)" in other.stdout, "other IO errors keep their traceback"
