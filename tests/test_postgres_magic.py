"""Fast tier on PostgreSQL: %%stateful, %stateful and rssd-magic with the state
on a real server (pg_util.py), through an in-process IPython shell — the
same behaviour as on an RSSD file, and never a file made beside the notebook.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys

import pytest
from click.testing import CliRunner

import pg_util
from conftest import counter
from pg_util import raw
from rssd_magic.backends import ENV_DB
from rssd_magic.backends.postgres_schema import SCHEMA_VERSION
from rssd_magic.cli import main

APPEND = "open('side.log', 'a').write('ran\\n')\n"
NOTEBOOK_FILE = "resource-surveillance.sqlite.db"


@pytest.fixture
def pg_kernel(kernel, pg_url):
    """The shell's kernel with its state on a fresh schema of the server."""
    kernel.magics.rssd_path = pg_url
    kernel.url = pg_url
    yield kernel
    assert not (kernel.workdir / NOTEBOOK_FILE).exists(), "no SQLite file is made when the state is on a server"


def states(url: str) -> list[tuple[str, str]]:
    return [tuple(r) for r in raw(url, """SELECT s.from_state, s.to_state FROM orchestration_session_state AS s
                                          JOIN rssd_magic_state_seq AS q ON q.state_id = s.orchestration_session_state_id
                                          WHERE s.session_entry_id IS NOT NULL ORDER BY q.seq""")]  # fmt: skip


def test_a_cell_runs_once_and_replays_outputs_and_names_in_a_fresh_kernel(pg_kernel):
    k = pg_kernel
    cell = "%%stateful\nimport numpy as np\n" + APPEND + "print('hello')\narr = np.arange(5)\nlabel = 'x'\narr.sum()\n"
    first = k.ok(cell)
    assert "hello" in first.stdout and not first.banner
    k.restart()
    second = k.ok(cell)
    assert counter(k.workdir / "side.log") == 1, "the body ran once"
    assert second.stdout.startswith("hello") and second.banner
    assert list(k.shell.user_ns["arr"]) == [0, 1, 2, 3, 4] and k.shell.user_ns["label"] == "x"
    assert second.result.result == 10
    assert states(k.url) == [("INITIAL", "RUNNING"), ("RUNNING", "EXECUTED")]
    assert raw(k.url, "SELECT count(*) FROM orchestration_session_exec WHERE exec_status = 0") == [(1,)]


def test_failures_force_names_and_replay_only(pg_kernel):
    k = pg_kernel
    failing = "%%stateful\n" + APPEND + "raise ValueError('boom')\n"
    for _ in range(2):
        assert type(k.run(failing).result.error_in_exec).__name__ == "ValueError"
    assert counter(k.workdir / "side.log") == 2, "a failed cell runs again"
    k.ok("%%stateful --name once\n" + APPEND + "v = 1\n")
    k.ok("%%stateful --name once\n" + APPEND + "v = 2\n")  # the name, not the code, says it ran
    assert k.shell.user_ns["v"] == 1 and counter(k.workdir / "side.log") == 3
    k.ok("%%stateful --name once --force\n" + APPEND + "v = 2\n")
    assert k.shell.user_ns["v"] == 2 and counter(k.workdir / "side.log") == 4
    err = k.run("%%stateful --replay-only\n" + APPEND + "never = 1\n").result.error_in_exec
    assert type(err).__name__ == "UsageError" and "no executed result" in str(err) and pg_util.schema_of(k.url) in str(err)
    assert counter(k.workdir / "side.log") == 4


def test_a_changed_input_reruns_and_says_why(pg_kernel):
    k = pg_kernel
    cell = "%%stateful\n" + APPEND + "total = factor * 10\n"
    k.ok("factor = 2")
    k.ok(cell)
    k.ok(cell)
    k.ok("factor = 3")
    ran = k.ok(cell)
    assert "running again: input factor changed (2 → 3)" in ran.stdout
    assert counter(k.workdir / "side.log") == 2 and k.shell.user_ns["total"] == 30
    reasons = raw(k.url, "SELECT transition_reason FROM orchestration_session_state WHERE to_state = 'RUNNING' ORDER BY transitioned_at, orchestration_session_state_id")
    assert [r for (r,) in reasons] == ["first run", "input factor changed (2 → 3)"]


def test_sql_without_conn_runs_on_the_server_itself_once(pg_kernel):
    k = pg_kernel
    k.ok("lo = 2")
    cell = (
        "%%stateful --sql --out big\n"
        "CREATE TABLE my_numbers(n INT, label TEXT);\n"
        "INSERT INTO my_numbers SELECT g, 'n' || g || '%' FROM generate_series(1, 5) AS g;\n"
        "SELECT n, label FROM my_numbers WHERE n > :lo ORDER BY n;\n"
    )
    first = k.ok(cell)
    assert list(k.shell.user_ns["big"]["n"]) == [3, 4, 5] and list(k.shell.user_ns["big"]["label"])[0] == "n3%"
    k.restart()
    k.ok("lo = 2")
    second = k.ok(cell)
    assert second.banner and list(k.shell.user_ns["big"]["n"]) == [3, 4, 5]
    assert raw(k.url, "SELECT count(*) FROM my_numbers") == [(5,)], "in the state's schema, created once"
    failing = "%%stateful --sql\nINSERT INTO my_numbers VALUES (6, 'six');\nSELECT nope FROM my_numbers;\n"
    err = k.run(failing).result.error_in_exec
    assert type(err).__name__ == "SQLCellError" and 'column "nope" does not exist' in str(err) and "rolled back" in str(err)
    assert raw(k.url, "SELECT count(*) FROM my_numbers") == [(5,)], "the failed cell's insert was rolled back"
    assert first.stdout.count("n3%") == 1


def test_line_magics_list_show_forget_stats_gc_trust(pg_kernel):
    k = pg_kernel
    body = "%%stateful --name load\nimport numpy as np\n" + APPEND + "print('loaded')\nbig = np.ones(1000)\n"
    k.ok(body)
    k.ok(body)  # a hit
    listed = k.ok("%stateful list").result.result.value
    assert [(c["name"], c["state"], c["hits"]) for c in listed] == [("load", "EXECUTED", 1)]
    shown = k.ok("%stateful show load").result.result
    assert "print('loaded')" in repr(shown) and "INITIAL" in repr(shown)
    shown = k.ok("%stateful stats").result.result
    stats = shown.value
    assert stats["cells"] == 1 and stats["hits"] == 1 and stats["storage"]["blobs"] >= 1
    assert repr(shown).splitlines()[0].startswith("server") and "schema" in repr(shown) and "WAL" not in repr(shown)
    assert "signed" in k.ok("%stateful trust --yes").stdout
    assert "1 cell forgotten" in k.ok("%stateful forget load").stdout
    assert "freed 1 blob," in k.ok("%stateful gc").stdout, "the forgotten run's array is no longer referenced"
    k.ok(body)
    assert counter(k.workdir / "side.log") == 2
    assert states(k.url)[-3:] == [("EXECUTED", "FORGOTTEN"), ("FORGOTTEN", "RUNNING"), ("RUNNING", "EXECUTED")]


def test_rssd_magic_db_is_used_before_surveilrs_variable(kernel, pg_url, monkeypatch):
    monkeypatch.setenv(ENV_DB, pg_url)
    monkeypatch.setenv("SURVEILR_STATEDB_FS_PATH", str(kernel.workdir / "surveilr.sqlite.db"))
    kernel.ok("%%stateful\n" + APPEND + "e = 1\n")
    assert states(pg_url) == [("INITIAL", "RUNNING"), ("RUNNING", "EXECUTED")]
    assert not (kernel.workdir / "surveilr.sqlite.db").exists() and not (kernel.workdir / NOTEBOOK_FILE).exists()


def test_an_unreachable_server_is_one_line_and_the_cell_does_not_run(kernel):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kernel.magics.rssd_path = f"postgresql://ana:s3cret@127.0.0.1:{port}/team"
    ran = kernel.run("%%stateful\n" + APPEND + "x = 1\n")
    err = ran.result.error_in_exec
    assert type(err).__name__ == "UsageError"
    text = str(err)
    assert f"host 127.0.0.1 port {port}" in text and "database team" in text and "Connection refused" in text
    assert "s3cret" not in text and "\n" not in text and "The cell was not run" in text
    assert counter(kernel.workdir / "side.log") == 0
    assert not (kernel.workdir / NOTEBOOK_FILE).exists()


# -- the command line ---------------------------------------------------------------


def cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_every_cli_command_takes_a_url(pg_kernel, tmp_path):
    k = pg_kernel
    k.ok("%%stateful --name first\nimport numpy as np\nfirst = np.arange(100)\nprint('one')\n")
    k.ok("%%stateful --scope other\nprint('two')\n")
    k.restart()
    url = k.url
    listed = json.loads(cli("--db", url, "list", "--json").output)
    assert sorted(c["name"] or c["scope"] for c in listed) == ["first", "other"]
    assert "first" in cli("list", "--db", url).output
    assert json.loads(cli("--db", url, "show", "first", "--json").output)["state"] == "EXECUTED"
    stats = json.loads(cli("--db", url, "stats", "--json").output)
    assert stats["cells"] == 2 and stats["storage"]["schema"] == pg_util.schema_of(url)
    assert "signed" in cli("--db", url, "trust").output
    assert cli("--db", url, "gc", "--dry-run").exit_code == 0

    rssd = tmp_path / "export.sqlite.db"
    exported = cli("--db", url, "export", "--to", str(rssd), "--scope", "other")
    assert exported.exit_code == 0 and "1 cell" in exported.output
    lite = sqlite3.connect(rssd)
    assert [r[0].startswith("rssd-magic:other#") for r in lite.execute("SELECT ingest_src FROM orchestration_session_entry")] == [True]
    lite.close()
    assert cli("--db", str(rssd), "list", "--json").exit_code == 0

    target = pg_util.fresh_url("cli")
    imported = cli("--db", target, "import", str(rssd), "--json")
    assert imported.exit_code == 0 and json.loads(imported.output)["conflicts"] == []
    assert [c["scope"] for c in json.loads(cli("--db", target, "list", "--json").output)] == ["other"]
    again = json.loads(cli("--db", target, "import", str(rssd), "--json").output)
    assert again["rows_inserted"] == 0 and again["conflicts"] == []

    forgot = cli("--db", url, "forget", "--all")
    assert "2 cells forgotten" in forgot.output
    merged = cli("--db", str(rssd), "export", "--to", str(tmp_path / "x.db"), "--json")  # RSSD to RSSD: a merge
    assert merged.exit_code == 0 and json.loads(merged.output)["cells"] == 1


def test_cli_errors_are_one_line(pg_server, tmp_path):
    bad = "postgresql://ana:s3cret@127.0.0.1:1/team"
    for args in (["list"], ["stats"], ["export", "--to", str(tmp_path / "x.db")], ["import", str(tmp_path / "x.db")]):
        r = CliRunner().invoke(main, ["--db", bad, *args])
        assert r.exit_code == 1, (args, r.output)
        assert r.output.count("\n") == 1 and "host 127.0.0.1 port 1" in r.output and "s3cret" not in r.output, r.output
    assert not (tmp_path / "x.db").exists()


def test_ttl_compares_the_servers_time_of_the_run(pg_kernel):
    import time

    k = pg_kernel
    cell = "%%stateful --ttl 30m\n" + APPEND + "t = 1\n"
    k.ok(cell)
    k.magics.clock = lambda: time.time() + 29 * 60
    k.ok(cell)
    assert counter(k.workdir / "side.log") == 1, "younger than the TTL: replayed"
    k.magics.clock = lambda: time.time() + 31 * 60
    assert "stale" in k.ok(cell).stdout and counter(k.workdir / "side.log") == 2


def test_sql_on_a_psycopg_connection_of_the_notebook(pg_kernel):
    k = pg_kernel
    k.ok(f"import psycopg\npgc = psycopg.connect({k.url!r})\nwho = 'ada'")  # autocommit off, as psycopg's default
    cell = "%%stateful --sql --conn pgc --out people\nCREATE TABLE people(name TEXT);\nINSERT INTO people VALUES ($who);\nSELECT * FROM people;"
    k.ok(cell)
    k.ok(cell)
    assert list(k.shell.user_ns["people"]["name"]) == ["ada"]
    assert raw(k.url, "SELECT count(*) FROM people") == [(1,)], "committed, once"
    assert k.shell.user_ns["pgc"].autocommit is False, "the connection is given back as it was"
    assert states(k.url) == [("INITIAL", "RUNNING"), ("RUNNING", "EXECUTED")]
    k.shell.user_ns["pgc"].close()


def test_without_psycopg_a_url_is_one_line_with_the_install_hint(tmp_path):
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "import rssd_magic, rssd_magic.cli\n"
        "from rssd_magic.backends import open_backend, StoreError\n"
        "try:\n    open_backend('postgresql://u:pw@h/db')\nexcept StoreError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1 and "pip install 'rssd_magic[postgres]'" in out.stdout and "pw" not in out.stdout


# -- blobs proven on write; another version on the team ------------------------------------


ARRAY_CELL = "%%stateful --name arr\nimport numpy as np\n" + APPEND + "arr = np.arange(100_000)\n"


def _array_blob() -> tuple[str, bytes]:
    import numpy as np

    from rssd_magic.records.serialize import dump_value

    _, blobs = dump_value(np.arange(100_000))
    (digest, data), *_ = sorted(blobs, key=lambda b: -memoryview(b[1]).nbytes)
    return digest, bytes(memoryview(data).cast("B"))


def test_wrong_bytes_planted_under_a_values_digest_never_end_up_in_its_record_and_force_repairs(pg_kernel):
    k = pg_kernel
    digest, data = _array_blob()
    k.ok("%%stateful --name other\nv = 1\n")  # makes the tables
    raw(k.url, "INSERT INTO rssd_magic_blob (digest, size, chunks) VALUES (?, ?, 1)", (digest, len(data)))
    raw(k.url, "INSERT INTO rssd_magic_blob_chunk (digest, n, data) VALUES (?, 0, ?)", (digest, bytes(len(data))))
    k.ok(ARRAY_CELL)
    k.restart()
    assert k.ok(ARRAY_CELL).banner and list(k.shell.user_ns["arr"][:3]) == [0, 1, 2] and k.shell.user_ns["arr"][-1] == 99_999
    # Damaged after it was recorded: the replay refuses it, --force records it again, whole.
    raw(k.url, "UPDATE rssd_magic_blob_chunk SET data = overlay(data placing '\\x07'::bytea from 9) WHERE digest = ?", (digest,))
    k.restart()
    damaged = k.ok(ARRAY_CELL)
    assert "arr could not be restored (IntegrityError" in damaged.stderr and "arr" not in k.shell.user_ns
    k.ok(ARRAY_CELL.replace("--name arr", "--name arr --force"))
    k.restart()
    assert k.ok(ARRAY_CELL).banner and k.shell.user_ns["arr"][1] == 1
    assert counter(k.workdir / "side.log") == 2
    (stored,) = raw(k.url, "SELECT data FROM rssd_magic_blob_chunk WHERE digest = ?", (digest,))
    assert bytes(stored[0]) == data


def test_a_store_of_a_newer_version_replays_its_records_and_is_never_written(pg_kernel, tmp_path):
    k = pg_kernel
    k.ok("%%stateful --name old\n" + APPEND + "v = 41\n")
    k.restart()
    newer = SCHEMA_VERSION + 1
    raw(k.url, f"UPDATE rssd_magic_meta SET value = '{newer}' WHERE key = 'schema_version'")
    raw(k.url, "ALTER TABLE rssd_magic_hit ADD COLUMN hit_source TEXT")  # what a newer version may have added
    counts = "SELECT (SELECT count(*) FROM orchestration_session), (SELECT count(*) FROM orchestration_session_state), " \
             "(SELECT count(*) FROM rssd_magic_hit), (SELECT count(*) FROM orchestration_session WHERE orch_finished_at IS NULL)"  # fmt: skip
    before = raw(k.url, counts)
    replayed = k.ok("%%stateful --name old\n" + APPEND + "v = 41\n")
    assert replayed.banner and k.shell.user_ns["v"] == 41
    (said,) = [ln for ln in replayed.stdout.splitlines() if f"schema version {newer}" in ln]
    assert f"this one knows version {SCHEMA_VERSION}" in said and "upgrade rssd_magic" in said
    err = k.run("%%stateful --name new\n" + APPEND + "w = 1\n").result.error_in_exec
    assert type(err).__name__ == "UsageError" and "\n" not in str(err) and "The cell was not run" in str(err)
    assert f"schema version {newer}" in str(err) and "upgrade rssd_magic" in str(err)
    for _ in range(3):
        k.ok("%%stateful --name old\n" + APPEND + "v = 41\n")
    k.restart()  # closing: no hit, no end of session is written
    url = k.url
    for args in (["forget", "old"], ["gc"], ["import", str(tmp_path / "none.db")]):
        r = CliRunner().invoke(main, ["--db", url, *args])
        assert r.exit_code == 1 and r.output.count("\n") == 1 and "upgrade rssd_magic" in r.output, (args, r.output)
    assert CliRunner().invoke(main, ["--db", url, "gc", "--dry-run"]).exit_code == 0
    assert json.loads(cli("--db", url, "list", "--json").output)[0]["state"] == "EXECUTED"
    assert raw(url, counts) == before
    assert counter(k.workdir / "side.log") == 1
