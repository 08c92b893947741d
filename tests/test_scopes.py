"""Fast tier: one key under every client (issue 15).  The default scope is
the RSSD itself: a cell is keyed by its code and inputs, whatever notebook
path the client told the kernel (JupyterLab's ``__session__``, VS Code's
``__vsc_ipynb_file__``) or none (nbclient, papermill, a terminal).
"""

from __future__ import annotations

import json

from conftest import counter

APPEND = "open('side.log', 'a').write('ran\\n')\n"
BODY = APPEND + "score = 0.93\n"


def entries(kernel) -> list[tuple[str, str]]:
    return [
        (json.loads(e)["scope"], src)
        for e, src in kernel.rows("SELECT elaboration, ingest_src FROM orchestration_session_entry ORDER BY rowid")
    ]


def as_notebook(kernel, path: str | None, var: str = "__session__") -> None:
    """What a client tells the kernel: JupyterLab sets __session__ (from
    JPY_SESSION_NAME), VS Code __vsc_ipynb_file__; None: a headless client."""
    for name in ("__session__", "__vsc_ipynb_file__"):
        kernel.shell.user_ns.pop(name, None)
    if path is not None:
        kernel.shell.user_ns[var] = path


def test_lab_vscode_headless_and_a_renamed_notebook_share_one_key(kernel):
    try:
        as_notebook(kernel, str(kernel.workdir / "analysis.ipynb"))
        kernel.ok("%%stateful\n" + BODY)
        for path, var in [(None, ""), (str(kernel.workdir / "renamed.ipynb"), "__session__"),
                          ("/elsewhere/moved/analysis.ipynb", "__vsc_ipynb_file__")]:  # fmt: skip
            kernel.restart()
            as_notebook(kernel, path, var)
            ran = kernel.ok("%%stateful\n" + BODY)
            assert ran.banner, f"replayed as {path}"
            assert kernel.shell.user_ns["score"] == 0.93
        assert counter(kernel.workdir / "side.log") == 1
        assert [scope for scope, _ in entries(kernel)] == ["default"]
    finally:
        as_notebook(kernel, None)


def test_a_name_is_one_per_rssd(kernel):
    try:
        as_notebook(kernel, str(kernel.workdir / "a.ipynb"))
        kernel.ok("%%stateful --name load_once\n" + BODY)
        as_notebook(kernel, str(kernel.workdir / "b.ipynb"))
        kernel.ok("%%stateful --name load_once\n" + BODY)
        as_notebook(kernel, None)
        kernel.ok("%%stateful --name load_once\n" + BODY)
        assert counter(kernel.workdir / "side.log") == 1
    finally:
        as_notebook(kernel, None)


def test_scope_still_keeps_cells_apart_and_is_listed(kernel):
    kernel.ok("%%stateful\n" + BODY)
    kernel.ok("%%stateful --scope team-a\n" + BODY)
    kernel.ok("%%stateful --scope team-a\n" + BODY)
    assert counter(kernel.workdir / "side.log") == 2
    listed = repr(kernel.ok("%stateful list").result.result)
    assert "SCOPE" in listed.splitlines()[0]
    assert "team-a" in listed and "default" in listed


def notebook_file(path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
    return str(path)


def test_an_explicit_scope_never_replays_another_scope(kernel):
    notebook_file(kernel.workdir / "analysis.ipynb")
    kernel.ok("%%stateful --scope analysis.ipynb\n" + BODY)
    kernel.ok("%%stateful --scope team-a\n" + BODY)
    assert counter(kernel.workdir / "side.log") == 2


def test_show_accepts_a_name(kernel):
    kernel.ok("%%stateful --name train_model\n" + BODY)
    shown = repr(kernel.ok("%stateful show train_model").result.result)
    assert "--name train_model" in shown
    assert "score = 0.93" in shown
    assert "scope   default" in shown
    missing = kernel.run("%stateful show no_such_name")
    assert "no %%stateful cell has a key starting with 'no_such_name' or that --name" in missing.stderr + missing.stdout
