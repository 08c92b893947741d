"""Fast tier: dependency-aware keys — a cell re-runs when what it reads
changed, replays when it is equal, and says why it ran."""

from __future__ import annotations

import json

from conftest import counter

APPEND = "open('side.log', 'a').write('ran\\n')\n"
USES_DF = "%%stateful\n" + APPEND + "total = float(df['x'].sum()) * factor\n"


def reasons(kernel):
    return [
        r
        for (r,) in kernel.rows(
            "SELECT transition_reason FROM orchestration_session_state WHERE to_state = 'RUNNING' "
            "ORDER BY rowid"
        )
    ]


def test_changed_input_reruns_and_says_why_equal_input_replays(kernel):
    kernel.ok("import pandas as pd\ndf = pd.DataFrame({'x': [1, 2, 3]})\nfactor = 2")
    kernel.ok(USES_DF)
    assert kernel.shell.user_ns["total"] == 12.0
    kernel.ok("df = pd.DataFrame({'x': [1, 2, 3]})")  # equal value, new object
    replayed = kernel.ok(USES_DF)
    assert not replayed.stderr and "[stateful]" not in replayed.stdout
    assert counter(kernel.workdir / "side.log") == 1
    kernel.ok("factor = 3")
    ran = kernel.ok(USES_DF)
    assert counter(kernel.workdir / "side.log") == 2
    assert "running again: input factor changed (2 → 3)" in ran.stdout and not ran.stderr
    assert kernel.shell.user_ns["total"] == 18.0
    kernel.ok("df = pd.DataFrame({'x': [1, 2, 4]})")
    ran = kernel.ok(USES_DF)
    assert "input df changed" in ran.stdout and "DataFrame" in ran.stdout
    recorded = reasons(kernel)
    assert recorded[0] == "first run"
    assert recorded[1] == "input factor changed (2 → 3)"
    assert recorded[2].startswith("input df changed")
    kernel.ok("factor = 2\ndf = pd.DataFrame({'x': [1, 2, 3]})")  # back to the first inputs
    kernel.ok(USES_DF)
    assert counter(kernel.workdir / "side.log") == 3, "the first inputs' result is replayed"
    assert kernel.shell.user_ns["total"] == 12.0


def test_function_edited_upstream_reruns_the_caller(kernel):
    kernel.ok("def score(v):\n    return v * 2\n")
    cell = "%%stateful\n" + APPEND + "s = score(10)\n"
    kernel.ok(cell)
    kernel.ok("def score(v):\n    return v * 2\n")  # same code again
    kernel.ok(cell)
    assert counter(kernel.workdir / "side.log") == 1
    kernel.ok("def score(v):\n    return v * 3\n")
    ran = kernel.ok(cell)
    assert counter(kernel.workdir / "side.log") == 2 and kernel.shell.user_ns["s"] == 30
    assert "input score changed" in ran.stdout


def test_declared_file_env_and_package_deps(kernel, monkeypatch):
    data = kernel.workdir / "data.csv"
    data.write_text("a,b\n1,2\n")
    cell = "%%stateful --deps-file *.csv --deps-env MODE --deps-package numpy\n" + APPEND
    kernel.ok(cell)
    kernel.ok(cell)
    assert counter(kernel.workdir / "side.log") == 1
    data.write_text("a,b\n1,3\n")
    assert "file data.csv changed" in kernel.ok(cell).stdout
    monkeypatch.setenv("MODE", "fast")
    assert "env MODE set" in kernel.ok(cell).stdout
    assert counter(kernel.workdir / "side.log") == 3
    (inputs,) = kernel.rows(
        "SELECT json_extract(transition_result, '$.inputs') FROM orchestration_session_state "
        "WHERE to_state = 'EXECUTED' ORDER BY rowid DESC LIMIT 1"
    )[0]
    inputs = json.loads(inputs)
    assert set(inputs) == {"files", "env", "packages"} and inputs["packages"]["numpy"]
    assert "fast" not in json.dumps(inputs), "env values are stored hashed"


def test_unfingerprintable_inputs_are_reported_once_and_ignore_silences(kernel):
    kernel.ok("import threading\nlock = threading.Lock()\nn = 1")
    cell = "%%stateful\n" + APPEND + "with lock:\n    m = n + 1\n"
    first = kernel.ok(cell)
    assert "left out of the key" in first.stderr and "lock" in first.stderr
    second = kernel.ok(cell)
    assert "left out of the key" not in second.stderr
    assert counter(kernel.workdir / "side.log") == 1
    quiet = kernel.ok("%%stateful --ignore lock\n" + APPEND + "with lock:\n    m = n + 1\n")
    assert "left out" not in quiet.stderr


def test_named_cells_ignore_inputs_and_strict_counts_comments(kernel):
    kernel.ok("k = 1")
    kernel.ok("%%stateful --name once\n" + APPEND + "j = k\n")
    kernel.ok("k = 2")
    kernel.ok("%%stateful --name once\n" + APPEND + "j = k\n")
    assert counter(kernel.workdir / "side.log") == 1
    kernel.ok("%%stateful --strict\n" + APPEND + "z = 1\n")
    kernel.ok("%%stateful --strict\n" + APPEND + "z = 1  # a comment\n")
    assert counter(kernel.workdir / "side.log") == 3


def _install(site, dist: str, version: str, top: str) -> None:
    """A distribution as pip leaves it: a dist-info folder (the old one
    removed), with the import name it provides."""
    folder = dist.replace("-", "_")
    for old in site.glob(f"{folder}-*.dist-info"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    info = site / f"{folder}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "top_level.txt").write_text(f"{top}\n")


def test_a_package_installed_in_the_running_kernel_counts(kernel, monkeypatch, tmp_path):
    # `%pip install -U` in a kernel: the cell declaring the package runs
    # again, whether named by its distribution or by its import name.
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    _install(site, "rssd-fake-dist", "1.0", "rssd_fake_mod")
    cells = ["%%stateful --deps-package rssd-fake-dist\n" + APPEND, "%%stateful --deps-package rssd_fake_mod\n" + APPEND]
    for cell in cells:
        kernel.ok(cell)
        kernel.ok(cell)
    assert counter(kernel.workdir / "side.log") == 2
    recorded = kernel.rows(
        "SELECT json_extract(transition_result, '$.inputs.packages') FROM orchestration_session_state "
        "WHERE to_state = 'EXECUTED' ORDER BY rowid"
    )
    assert [json.loads(p) for (p,) in recorded] == [{"rssd-fake-dist": "1.0"}, {"rssd_fake_mod": "1.0"}]
    _install(site, "rssd-fake-dist", "2.0", "rssd_fake_mod")
    for cell in cells:
        said = kernel.ok(cell).stdout
        assert "running again" in said and "2.0" in said
    assert counter(kernel.workdir / "side.log") == 4
