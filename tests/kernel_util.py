"""Helpers for the kernel tier: build notebooks, run them in fresh kernels
through nbclient, normalize their outputs, and check an RSSD with plain
``sqlite3`` (no rssd_magic code involved, as a third-party reader would).
"""

from __future__ import annotations

import copy
import os
import re
import sqlite3
from pathlib import Path
from typing import Iterable

import nbformat
from nbclient import NotebookClient

KERNEL_NAME = "python3"
TIMEOUT_S = 60


def make_notebook(sources: Iterable[str]) -> nbformat.NotebookNode:
    """An nbformat v4 notebook with one code cell per source."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in sources]
    return nb


def execute(
    nb: nbformat.NotebookNode | Iterable[str],
    cwd: str | os.PathLike,
    *,
    allow_errors: bool = False,
    timeout: int = TIMEOUT_S,
    env: dict[str, str] | None = None,
    **client_options,
) -> nbformat.NotebookNode:
    """Run *nb* (a notebook, or a list of cell sources) top to bottom in a
    fresh ``python3`` kernel whose working directory is *cwd*; return the
    executed copy.  The kernel is shut down cleanly before this returns.
    *env* is added to the kernel's environment (``JPY_SESSION_NAME`` is how
    JupyterLab tells a kernel its notebook).  *client_options* go to
    :class:`nbclient.NotebookClient` (e.g. ``timeout_func`` and
    ``interrupt_on_timeout`` to interrupt one cell)."""
    if not isinstance(nb, nbformat.NotebookNode):
        nb = make_notebook(nb)
    nb = copy.deepcopy(nb)
    client = NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=timeout,
        allow_errors=allow_errors,
        resources={"metadata": {"path": str(cwd)}},
        **client_options,
    )
    client.execute(**({"env": {**os.environ, **env}} if env else {}))
    return nb


def _ours(output: dict) -> dict:
    meta = output.get("metadata") or {}
    ours = meta.get("rssd_magic") if isinstance(meta, dict) else None
    return ours if isinstance(ours, dict) else {}


def is_banner(output: dict) -> bool:
    """True for the replay banner %%stateful shows before a replay."""
    return bool(_ours(output).get("banner"))


def is_note(output: dict) -> bool:
    """True for a note %%stateful shows as a display of its own (a new RSSD
    created): what a first run shows and a replay never does."""
    return bool(_ours(output).get("note"))


def banners(cell) -> list[dict]:
    return [o for o in cell.get("outputs", []) if is_banner(o)]


def strip_volatile(nb: nbformat.NotebookNode) -> list[list[dict]]:
    """Per code cell, its outputs without what legitimately differs between a
    first run and a replay: execution counts, the replay banner, the note
    of a new RSSD, and transient display ids.  Plain dicts, comparable
    with ``==``."""
    cells = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outs = []
        for out in cell.get("outputs", []):
            if is_banner(out) or is_note(out):
                continue
            out = copy.deepcopy(dict(out))
            out.pop("execution_count", None)
            out.pop("transient", None)
            outs.append(_plain(out))
        cells.append(outs)
    return cells


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def text_of(cell, name: str | None = None) -> str:
    """All stream text of a cell (``name`` = "stdout"/"stderr" to pick one)."""
    return "".join(
        o.get("text", "")
        for o in cell.get("outputs", [])
        if o.get("output_type") == "stream" and (name is None or o.get("name") == name)
    )


def errors_of(cell) -> list[dict]:
    return [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def plain_traceback(error_output: dict) -> str:
    """An error output's traceback as plain text (ANSI colours removed)."""
    return _ANSI.sub("", "\n".join(error_output.get("traceback", [])))


JSON_COLUMNS = {
    "orchestration_session_state": ("transition_result", "elaboration"),
    "orchestration_session_entry": ("elaboration",),
    "orchestration_session": ("elaboration", "args_json"),
}


def check_rssd(path: str | os.PathLike) -> None:
    """Assert that the RSSD is sound as plain SQLite sees it: integrity ok,
    no foreign-key violations, every non-null JSON column valid JSON."""
    path = Path(path)
    assert path.is_file(), f"no RSSD at {path}"
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        for table, columns in JSON_COLUMNS.items():
            for column in columns:
                bad = conn.execute(
                    f'SELECT rowid FROM "{table}" WHERE "{column}" IS NOT NULL AND NOT json_valid("{column}")'
                ).fetchall()
                assert bad == [], f"{table}.{column}: invalid JSON in rows {bad}"
    finally:
        conn.close()


def query(path: str | os.PathLike, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of *sql* against the RSSD, opened read-only with plain sqlite3."""
    conn = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def transitions(path: str | os.PathLike) -> list[tuple[str, str, str, str]]:
    """(ingest_src, from_state, to_state, session_id) of every transition we
    wrote, in the order they were written."""
    return query(
        path,
        """SELECT e.ingest_src, s.from_state, s.to_state, s.session_id
           FROM orchestration_session_state AS s
           JOIN orchestration_session_entry AS e
             ON e.orchestration_session_entry_id = s.session_entry_id
           WHERE e.ingest_src LIKE 'rssd-magic:%'
           ORDER BY s.rowid""",
    )
