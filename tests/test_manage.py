"""Fast tier: --ttl, --replay-only and the %stateful line magic."""

from __future__ import annotations

import json
import time

import pytest

from conftest import counter
from rssd_magic.engine.ttl import parse_duration

APPEND = "open('side.log', 'a').write('ran\\n')\n"


@pytest.mark.parametrize("text, seconds", [("45s", 45), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("1.5h", 5400)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_ttl_reruns_a_stale_result_and_records_why(kernel):
    cell = "%%stateful --ttl 30m\n" + APPEND + "t = 1\n"
    kernel.ok(cell)
    kernel.magics.clock = lambda: time.time() + 29 * 60
    kernel.ok(cell)
    assert counter(kernel.workdir / "side.log") == 1, "younger than the TTL: replayed"
    kernel.magics.clock = lambda: time.time() + 31 * 60
    ran = kernel.ok(cell)
    assert counter(kernel.workdir / "side.log") == 2
    assert "stale" in ran.stdout
    (reason,) = kernel.rows(
        "SELECT transition_reason FROM orchestration_session_state WHERE to_state = 'RUNNING' "
        "ORDER BY rowid DESC LIMIT 1"
    )[0]
    assert reason.startswith("stale: executed") and "--ttl 30m" in reason
    kernel.magics.clock = time.time
    kernel.ok(cell)  # the fresh result is young again
    assert counter(kernel.workdir / "side.log") == 2


def test_bad_ttl_is_a_usage_error(kernel):
    ran = kernel.run("%%stateful --ttl soon\n" + APPEND)
    assert type(ran.result.error_in_exec).__name__ == "UsageError"
    assert "--ttl" in str(ran.result.error_in_exec) and "soon" in str(ran.result.error_in_exec)
    assert counter(kernel.workdir / "side.log") == 0


def test_replay_only_replays_when_recorded_and_refuses_otherwise(kernel):
    ran = kernel.run("%%stateful --replay-only\n" + APPEND + "r = 2\n")
    err = ran.result.error_in_exec
    assert type(err).__name__ == "UsageError" and "no executed result" in str(err) and "never run" in str(err)
    assert counter(kernel.workdir / "side.log") == 0
    kernel.ok("%%stateful\n" + APPEND + "r = 2\n")
    kernel.restart()
    kernel.ok("%%stateful --replay-only\n" + APPEND + "r = 2\n")
    assert kernel.shell.user_ns["r"] == 2
    assert counter(kernel.workdir / "side.log") == 1


# -- the %stateful line magic ------------------------------------------------


def test_line_magic_list_show_stats_forget(kernel):
    kernel.ok("%%stateful --name load\n" + APPEND + "print('loaded')\nv = 1\n")
    kernel.ok("%%stateful --name load\n" + APPEND + "print('loaded')\nv = 1\n")  # a hit
    listed = kernel.ok("%stateful list").result.result
    (cell,) = listed.value
    assert cell["name"] == "load" and cell["state"] == "EXECUTED" and cell["hits"] == 1
    assert "<table>" in listed._repr_html_() and "load" in listed._repr_html_()
    assert "EXECUTED" in repr(listed) and cell["key"][:12] in repr(listed)

    shown = kernel.ok(f"%stateful show {cell['key'][:6]}").result.result
    assert "print('loaded')" in repr(shown) and "INITIAL" in repr(shown) and "loaded" in repr(shown)

    stats = kernel.ok("%stateful stats").result.result.value
    assert stats["cells"] == 1 and stats["hits"] == 1

    forgot = kernel.ok("%stateful forget load")
    assert "1 cell forgotten" in forgot.stdout and "EXECUTED → FORGOTTEN" in forgot.stdout
    kernel.ok("%%stateful --name load\n" + APPEND + "print('loaded')\nv = 1\n")
    assert counter(kernel.workdir / "side.log") == 2
    assert kernel.states()[-3:] == [("EXECUTED", "FORGOTTEN"), ("FORGOTTEN", "RUNNING"), ("RUNNING", "EXECUTED")]

    kernel.ok("%%stateful\nother = 2\n")
    assert "2 cells forgotten" in kernel.ok("%stateful forget --all").stdout
    assert "nothing to forget" in kernel.ok("%stateful forget --all").stdout
    assert kernel.rows("SELECT count(*) FROM orchestration_session_state WHERE to_state = 'FORGOTTEN'") == [(3,)]


def test_line_magic_errors_are_usage_errors(kernel):
    kernel.ok("%%stateful\nw = 1\n")
    for line, words in [("%stateful show ffffffffff", "no %%stateful cell"), ("%stateful bogus", "invalid choice"), ("%stateful forget", "KEY or --all")]:
        err = kernel.run(line).result.error_in_exec
        assert type(err).__name__ == "UsageError" and words in str(err), (line, err)


def test_an_rssd_imported_into_another_replays_its_cells_there(kernel, tmp_path):
    from click.testing import CliRunner

    from rssd_magic.cli import main

    server, laptop = tmp_path / "server.sqlite.db", tmp_path / "laptop.sqlite.db"
    body = APPEND + "v = 41 + 1\nprint('answered')\n"
    kernel.ok(f"%%stateful --db {server}\n" + body)
    kernel.ok(f"%%stateful --db {laptop}\nother = 1\n")  # the laptop's own RSSD, with a cell of its own
    kernel.restart()
    imported = CliRunner().invoke(main, ["--db", str(laptop), "import", str(server)])
    assert imported.exit_code == 0 and f"1 cell from {server}" in imported.output, imported.output
    again = CliRunner().invoke(main, ["--db", str(laptop), "import", str(server), "--json"])
    assert again.exit_code == 0 and '"rows_inserted": 0' in again.output, "a second import changes nothing"
    ran = kernel.ok(f"%%stateful --db {laptop}\n" + body)
    assert ran.banner and "answered" in ran.stdout and kernel.shell.user_ns["v"] == 42
    assert counter(kernel.workdir / "side.log") == 1, "replayed from the laptop's RSSD, not run again"
    listed = CliRunner().invoke(main, ["--db", str(laptop), "list", "--json"])
    assert len(json.loads(listed.output)) == 2


def test_gc_keeps_the_blobs_of_a_record_it_can_not_fully_read():
    """What gc and stats read of a record is its value specs only: a record
    the whole check refuses (another tool's, a newer version's field) still
    keeps the blobs it names — gc keeps too much rather than too little."""
    from rssd_magic.records.record import RecordError, RunRecord, digests_in

    digest = "blake3:" + "ab" * 32
    text = json.dumps({"format": "rssd_magic.result.v1", "duration_s": "a while",
                       "names": {"x": {"kind": "pickle", "type": "bytes", "size": 3, "blob": digest}},
                       "result_value": {"kind": "pickle", "type": "bytes", "size": 3, "blob": "blake3:" + "cd" * 32}})  # fmt: skip
    with pytest.raises(RecordError):
        RunRecord.from_json(text)
    assert digests_in(text) == {digest, "blake3:" + "cd" * 32}
    assert digests_in("[" * 100_000) == set() and digests_in("not json") == set() and digests_in(None) == set()
