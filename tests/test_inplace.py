"""Fast tier: what a cell does to names without binding them (issue 15):
values it read and changed in place are recorded and restored; names it
deleted are deleted on replay."""

from __future__ import annotations

import json
import sqlite3
import threading

import numpy as np
import pandas as pd

from conftest import counter
from rssd_magic.records.record import RecordError, RunRecord

APPEND = "open('side.log', 'a').write('ran\\n')\n"

SETUP = "import pandas as pd\ndf = pd.DataFrame({'a': [1, 2, 3]})\nresults = []\ncounter = 0\n"
MUTATE = "%%stateful\n" + APPEND + "df['b'] = df['a'] * 2\nresults.append('model-1')\ncounter += 1\n"


def last_record(kernel) -> dict:
    (text,) = kernel.rows(
        "SELECT transition_result FROM orchestration_session_state WHERE to_state = 'EXECUTED' ORDER BY rowid DESC LIMIT 1"
    )[0]
    return json.loads(text)


def test_values_changed_in_place_are_recorded_said_once_and_restored(kernel):
    kernel.ok(SETUP)
    first = kernel.ok(MUTATE)
    assert "[stateful] also recorded: df, results (changed in place)" in first.stdout and "also recorded" not in first.stderr
    record = last_record(kernel)
    assert record["changed"] == ["df", "results"]
    assert {"df", "results", "counter"} <= set(record["names"])

    kernel.restart()
    kernel.ok(SETUP)
    second = kernel.ok(MUTATE)
    assert counter(kernel.workdir / "side.log") == 1, "replayed, not run"
    assert "also recorded" not in second.stdout
    ns = kernel.shell.user_ns
    pd.testing.assert_frame_equal(ns["df"], pd.DataFrame({"a": [1, 2, 3], "b": [2, 4, 6]}))
    assert ns["results"] == ["model-1"]
    assert ns["counter"] == 1


def test_an_array_changed_in_place_is_restored_and_one_only_read_is_not_recorded(kernel):
    kernel.ok("import numpy as np\nweights = np.zeros(4)\nlookup = np.arange(4)\n")
    cell = "%%stateful\n" + APPEND + "weights[lookup[1]] = 5.0\ntotal = float(lookup.sum())\n"
    first = kernel.ok(cell)
    assert "also recorded: weights (changed in place)" in first.stdout
    record = last_record(kernel)
    assert record["changed"] == ["weights"]
    assert "lookup" not in record["names"]

    kernel.restart()
    kernel.ok("import numpy as np\nweights = np.zeros(4)\nlookup = np.arange(4)\n")
    kernel.ok(cell)
    assert counter(kernel.workdir / "side.log") == 1
    np.testing.assert_array_equal(kernel.shell.user_ns["weights"], [0, 5, 0, 0])
    assert kernel.shell.user_ns["weights"].flags.writeable


def test_a_cell_that_changes_nothing_in_place_records_as_before(kernel):
    kernel.ok(SETUP)
    ran = kernel.ok("%%stateful\nn_rows = len(df) + len(results)\n")
    assert "also recorded" not in ran.stdout
    record = last_record(kernel)
    assert "changed" not in record and "deleted" not in record
    assert list(record["names"]) == ["n_rows"]


def test_a_function_is_not_changed_in_place_by_rebinding_a_global_it_reads(kernel):
    # f's fingerprint folds in the k it reads; the cell rebinds k, not f.
    kernel.ok("def f():\n    return k\nk = 1\n")
    ran = kernel.ok("%%stateful\nk = 2\ny = f()\n")
    assert "also recorded" not in ran.stdout
    assert "f" not in last_record(kernel)["names"]


def test_a_value_that_cant_be_fingerprinted_and_is_changed_is_named_in_a_warning(kernel):
    kernel.shell.user_ns["box"] = {"lock": threading.Lock(), "n": 0}
    ran = kernel.ok("%%stateful\nbox['n'] += 1\n")
    assert "may have changed in place, but can't be fingerprinted, so a replay won't restore it: box (" in ran.stderr
    assert "box" not in last_record(kernel)["names"]
    # Only read: no warning (its use is no change the code shows).
    quiet = kernel.ok("%%stateful\nheld = box['lock'].locked()\n")
    assert "may have changed" not in quiet.stderr


def test_a_value_changed_into_one_that_cant_be_saved_is_named(kernel):
    kernel.ok("holders = []\n")
    ran = kernel.ok("%%stateful\nimport threading\nholders.append(threading.Lock())\n")
    assert "also recorded: holders (changed in place)" in ran.stdout
    assert "can't be saved" in ran.stderr and "holders" in ran.stderr.split("can't be saved", 1)[1]


def test_del_is_replayed_and_a_conditional_or_except_name_only_when_it_happened(kernel):
    setup = "x = 1\ntmp = 2\nkeep = 3\ne = 'before'\n"
    cell = (
        "%%stateful\n" + APPEND + "del x\n"
        "if False:\n    del keep\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    pass\n"
        "scratch = 1\ndel scratch\n"
        "new = 4\n"
    )
    kernel.ok(setup)
    kernel.ok(cell)
    first_ns = {n: kernel.shell.user_ns.get(n, "<unbound>") for n in ("x", "tmp", "keep", "e", "scratch", "new")}
    assert first_ns == {"x": "<unbound>", "tmp": 2, "keep": 3, "e": "<unbound>", "scratch": "<unbound>", "new": 4}
    assert last_record(kernel)["deleted"] == ["x", "e"]  # scratch did not exist before the run

    kernel.restart()
    kernel.ok(setup + "scratch = 'other'\n")
    kernel.ok(cell)
    assert counter(kernel.workdir / "side.log") == 1
    replayed = {n: kernel.shell.user_ns.get(n, "<unbound>") for n in ("x", "tmp", "keep", "e", "new")}
    assert replayed == {n: first_ns[n] for n in replayed}
    assert kernel.shell.user_ns["scratch"] == "other", "not deleted: the first run did not delete an existing one"


def test_a_record_that_lists_shell_names_as_deleted_deletes_none_of_them(kernel):
    kernel.ok("victim = 1\n")
    kernel.ok("%%stateful\ndel victim\n")
    conn = sqlite3.connect(kernel.db)
    conn.execute(
        "UPDATE orchestration_session_state SET transition_result = json_set(transition_result, '$.deleted', "
        "json_array('victim', '__name__', 'In', '_oh', 'get_ipython')) WHERE to_state = 'EXECUTED'"
    )
    conn.commit()
    conn.close()
    kernel.restart()
    kernel.ok("victim = 1\n")
    kernel.run("%%stateful\ndel victim\n")
    ns = kernel.shell.user_ns
    assert all(name in ns for name in ("__name__", "In", "_oh", "get_ipython"))


def test_a_record_whose_lists_are_not_names_is_refused_with_one_line():
    for bad in ({"deleted": ["a b"]}, {"changed": [1]}, {"deleted": "x"}):
        try:
            RunRecord.from_json({"format": "rssd_magic.result.v1", **bad})
        except RecordError as exc:
            assert "\n" not in str(exc)
        else:
            raise AssertionError(f"accepted {bad}")
    ok = RunRecord.from_json({"changed": ["df"], "deleted": ["x"]})
    assert (ok.changed, ok.deleted) == (["df"], ["x"])
    assert RunRecord.from_json(ok.dumps()).to_json() == ok.to_json()
