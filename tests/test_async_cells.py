"""Fast tier: ``%%stateful`` cells whose body awaits (issue 15), in an
in-process shell and in terminal IPython (a real ``ipython`` process).
The kernel tier (test_kernel_clients.py) runs them under ipykernel, whose
event loop is already running while a cell runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import counter

APPEND = "open('side.log', 'a').write('ran\\n')\n"

AWAITING = (
    "%%stateful\n"
    "import asyncio\n"
    "async def fetch(prompt):\n"
    "    await asyncio.sleep(0.01)\n"
    "    return prompt.upper()\n"
    + APPEND
    + "reply = await fetch('hello')\n"
    "print('fetched', reply)\n"
    "reply\n"
)


def test_an_awaiting_cell_runs_once_records_and_replays(kernel):
    first = kernel.ok(AWAITING)
    assert counter(kernel.workdir / "side.log") == 1
    assert "fetched HELLO" in first.stdout
    assert first.result.result == "HELLO"
    assert kernel.states() == [("INITIAL", "RUNNING"), ("RUNNING", "EXECUTED")]

    kernel.restart()
    second = kernel.ok(AWAITING)
    assert counter(kernel.workdir / "side.log") == 1, "the body must not run again"
    assert second.banner
    assert "fetched HELLO" in second.stdout
    assert second.result.result == "HELLO"
    assert kernel.shell.user_ns["reply"] == "HELLO"
    assert kernel.shell.user_ns["fetch"].__name__ == "fetch"


def test_an_awaiting_cell_keys_like_the_same_cell_without_the_route(kernel):
    # The route changes how the body runs, not what it is: the key is the
    # body's, so a replay finds the record whichever way it ran.
    kernel.ok(AWAITING)
    routed = kernel.shell.transform_cell(AWAITING)
    assert routed.startswith("await get_ipython().magics_manager.registry['StatefulMagics'].stateful_async(")
    (src,) = kernel.rows("SELECT json_extract(elaboration, '$.source') FROM orchestration_session_entry")[0]
    assert src == AWAITING.split("\n", 1)[1]


@pytest.mark.parametrize(
    "body",
    [
        "async with Ctx() as got:\n    pass\n",
        "got = []\nasync for v in agen():\n    got.append(v)\n",
    ],
)
def test_async_with_and_async_for_at_top_level_run_too(kernel, body):
    define = (
        "import asyncio\n"
        "class Ctx:\n"
        "    async def __aenter__(self): return 'entered'\n"
        "    async def __aexit__(self, *exc): return False\n"
        "async def agen():\n"
        "    for v in (1, 2):\n"
        "        await asyncio.sleep(0)\n"
        "        yield v\n"
    )
    kernel.ok(define)
    kernel.ok("%%stateful\n" + APPEND + body)
    got = kernel.shell.user_ns["got"]
    kernel.restart()
    kernel.ok(define)
    kernel.ok("%%stateful\n" + APPEND + body)
    assert counter(kernel.workdir / "side.log") == 1
    assert kernel.shell.user_ns["got"] == got and got in ("entered", [1, 2])


def test_await_inside_a_function_only_is_not_routed(kernel):
    cell = "%%stateful\nasync def later():\n    await something()\nx = 1\n"
    assert kernel.shell.transform_cell(cell).startswith("get_ipython().run_cell_magic(")
    kernel.ok(cell)
    assert kernel.shell.user_ns["x"] == 1


def test_a_failing_awaiting_cell_shows_its_traceback_once_and_runs_again(kernel):
    cell = "%%stateful\nimport asyncio\n" + APPEND + "await asyncio.sleep(0)\n1 / 0\n"
    first = kernel.run(cell)
    assert isinstance(first.result.error_in_exec, ZeroDivisionError)
    assert first.stdout.count("Traceback (most recent call last)") == 1
    assert "line 5" in first.stdout, "the line of the notebook cell"
    second = kernel.run(cell)
    assert isinstance(second.result.error_in_exec, ZeroDivisionError)
    assert counter(kernel.workdir / "side.log") == 2
    assert [to for _, to in kernel.states()] == ["RUNNING", "FAILED", "RUNNING", "FAILED"]


def test_with_autoawait_off_an_awaiting_body_is_a_syntax_error_as_in_any_cell(kernel):
    kernel.ok("%autoawait off")
    try:
        cell = "%%stateful\nimport asyncio\nawait asyncio.sleep(0)\n"
        assert kernel.shell.transform_cell(cell).startswith("get_ipython().run_cell_magic(")
        ran = kernel.run(cell)
        assert type(ran.result.error_in_exec).__name__ == "SyntaxError"
        assert "outside function" in ran.stdout
        assert [to for _, to in kernel.states()] == ["RUNNING", "FAILED"]
    finally:
        kernel.ok("%autoawait on")


def test_run_cell_magic_with_an_awaiting_body_runs_when_no_loop_is_running(kernel):
    # Called from code, the body is not routed; with no loop running (a
    # terminal, this shell) the shell's loop runner can still await it.
    kernel.ok("get_ipython().run_cell_magic('stateful', '', 'import asyncio\\nawait asyncio.sleep(0)\\nv = 7\\n')")
    assert kernel.shell.user_ns["v"] == 7


def test_the_option_line_of_an_awaiting_cell_is_expanded_as_for_any_magic(kernel):
    kernel.shell.user_ns["run_name"] = "fetch-v1"
    kernel.ok("%%stateful --name {run_name}\nimport asyncio\nawait asyncio.sleep(0)\nw = 1\n")
    (name,) = kernel.rows("SELECT json_extract(elaboration, '$.name') FROM orchestration_session_entry")[0]
    assert name == "fetch-v1"


def test_loading_the_extension_again_keeps_one_route(kernel, monkeypatch):
    import atexit
    import signal

    ours = kernel.magics
    live = []  # our exit hooks registered and not unregistered since
    register, unregister = atexit.register, atexit.unregister
    monkeypatch.setattr(atexit, "register", lambda f, *a, **k: (live.append(f), register(f, *a, **k))[1])
    monkeypatch.setattr(atexit, "unregister", lambda f: (live.remove(f) if f in live else None, unregister(f))[1])
    live.append(ours.close)
    for _ in range(3):
        kernel.ok("%reload_ext rssd_magic")
    try:
        cleanup = kernel.shell.input_transformers_cleanup
        routes = [t for t in cleanup if getattr(t, "__name__", "") == "route_awaiting_stateful_cell"]
        assert len(routes) == 1
        # One exit hook and one SIGTERM handler, however often it was loaded.
        assert live == [kernel.magics.close]
        handler = signal.getsignal(signal.SIGTERM)
        assert not hasattr(getattr(handler, "_rssd_magic_before", None), "_rssd_magic_before")
        kernel.ok(AWAITING)
        assert kernel.shell.user_ns["reply"] == "HELLO"
    finally:
        # The reload made a new StatefulMagics from the shell's config, which
        # other tests' %config lines changed: the fixture's instance goes back.
        kernel.magics.close()
        kernel.shell.register_magics(ours)


def test_terminal_ipython_runs_and_replays_an_awaiting_cell(tmp_path):
    """A real ``ipython`` process (TerminalInteractiveShell) runs a script
    whose one cell awaits, twice: the second run replays."""
    script = tmp_path / "nightly.ipy"
    script.write_text(
        "%%stateful\nimport asyncio\n" + APPEND + "await asyncio.sleep(0.01)\nprint('fetched')\nanswer = 42\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    outs = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "IPython", "--ext", "rssd_magic", "--no-banner", "--colors=NoColor", str(script)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        outs.append(done.stdout + done.stderr)
    assert counter(tmp_path / "side.log") == 1
    assert "fetched" in outs[0] and "fetched" in outs[1]
    assert "replayed" in outs[1] and "replayed" not in outs[0]
    assert "already running" not in outs[0] + outs[1]
