"""The shortcut for ``%%stateful`` cells' input transform (adapters/transform.py),
against IPython's own ``InteractiveShell.transform_cell`` on the real shell:
the same text for any cell, and the whole way whenever someone else has a
say in it (a token transformer, another wrapper)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from IPython.core.interactiveshell import InteractiveShell

from rssd_magic.adapters import transform

LINES = st.sampled_from(["", " --quiet", " --name load_once", " --ttl 1h --scope x", "  --force  ", " --sql --conn db"])
BODY = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80) | st.sampled_from([
    "x = 1\n", "print('a')?\n", "!ls\n", "%time 1\n", "a = %env\n", "b = !echo\n", "x?", "'''\n%%x\n'''",
    "\\\n", "\r\n\r\nx = 1", "\u2028x\u2029", "# -*- PYTHON-MODE\n", "await f()\n",
])  # fmt: skip


def ipython_s(shell, raw: str) -> str:
    """What IPython's own method makes of *raw* (no wrapper of ours)."""
    return InteractiveShell.transform_cell(shell, raw)


@pytest.fixture
def token_passes(shell, monkeypatch):
    """Counts IPython's token passes (the step the shortcut skips)."""
    manager = shell.input_transformer_manager
    calls = []
    real = manager.do_token_transforms
    monkeypatch.setattr(manager, "do_token_transforms", lambda lines: calls.append(1) or real(lines))
    return calls


@settings(max_examples=300, deadline=None)
@given(line=LINES, body=BODY, lead=st.sampled_from(["", "\n", "\n\n", "  "]))
def test_a_stateful_cell_becomes_exactly_what_ipython_makes_of_it(shell, line, body, lead):
    raw = f"{lead}%%stateful{line}\n{body}"
    assert shell.transform_cell(raw) == ipython_s(shell, raw)


def test_the_token_pass_is_skipped_for_stateful_cells_only(shell, token_passes):
    shell.transform_cell("%%stateful\nx = 1\n")
    assert token_passes == [], "a %%stateful cell's one call has nothing to tokenize for"
    for other in ("x = 1\n", "%%time\nx = 1\n", "%%statefulness\nx\n", "%%stateful?\n"):
        shell.transform_cell(other)
    assert len(token_passes) == 4, "every other cell takes IPython's whole way"


def test_a_token_transformer_of_someone_elses_sees_stateful_cells(shell, token_passes, monkeypatch):
    seen = []

    class Watcher:
        @classmethod
        def find(cls, tokens_by_line):
            seen.append(tokens_by_line[0][0].string)
            return None

    manager = shell.input_transformer_manager
    monkeypatch.setattr(manager, "token_transformers", [*manager.token_transformers, Watcher])
    raw = "%%stateful\nx = 1\n"
    ours = shell.transform_cell(raw)
    assert seen == ["get_ipython"] and token_passes == [1]
    assert ours == ipython_s(shell, raw)


def test_another_wrapper_installed_first_keeps_seeing_every_cell(shell):
    seen = []
    transform.uninstall(shell)
    own = shell.transform_cell

    def theirs(raw_cell):
        seen.append(raw_cell)
        return own(raw_cell)

    shell.transform_cell = theirs
    try:
        transform.install(shell)
        assert shell.transform_cell("%%stateful\nx = 1\n") == ipython_s(shell, "%%stateful\nx = 1\n")
        assert seen == ["%%stateful\nx = 1\n"]
        transform.uninstall(shell)
        assert shell.transform_cell is theirs
    finally:
        del shell.transform_cell
        transform.install(shell)


def test_unload_puts_ipythons_method_back_and_a_reload_wraps_once(shell):
    shell.run_line_magic("unload_ext", "rssd_magic")
    try:
        assert "transform_cell" not in vars(shell)
        assert shell.transform_cell.__func__ is InteractiveShell.transform_cell
    finally:
        shell.run_line_magic("load_ext", "rssd_magic")
    shell.run_line_magic("reload_ext", "rssd_magic")
    wrapper = vars(shell)["transform_cell"]
    assert wrapper.rssd_magic_previous.__func__ is InteractiveShell.transform_cell, "one wrapper, not two"


def test_a_shell_class_with_a_transform_of_its_own_keeps_it():
    class Shell:  # a transform_cell that is not IPython's: nothing is skipped past it
        def transform_cell(self, raw_cell):
            return "theirs\n"

    shell = Shell()
    transform.install(shell)
    assert shell.transform_cell("%%stateful\nx = 1\n") == "theirs\n"
    transform.uninstall(shell)
    assert "transform_cell" not in vars(shell)


def test_the_options_line_is_filled_in_from_the_notebook_only_when_it_asks(kernel, monkeypatch):
    kernel.shell.user_ns.update(run_name="alpha", result="mine")
    expansions = []
    real = kernel.shell.var_expand
    monkeypatch.setattr(kernel.shell, "var_expand", lambda *a, **kw: expansions.append(a) or real(*a, **kw))
    kernel.ok("%%stateful --name {run_name}\nx = 1\n")
    kernel.ok("%%stateful --name $result\ny = 2\n")  # the user's `result`, not IPython's own
    kernel.ok("%%stateful --name {unclosed\nz = 3\n")  # not a template: taken as it is
    kernel.ok("%%stateful\nw = 4\n")
    names = {n for (n,) in kernel.rows("SELECT json_extract(elaboration, '$.name') FROM orchestration_session_entry")}
    assert names == {"alpha", "mine", "{unclosed", None}
    assert expansions == [], "IPython's expansion (a copy of the whole namespace per cell) is not made"
