"""Fixtures for the fast tier: one in-process IPython shell, a fresh working
directory and RSSD per test, and helpers to read the RSSD with plain sqlite3."""

from __future__ import annotations

import copy
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config
from IPython.utils.capture import capture_output

from pg_util import pg_server, pg_url  # noqa: F401 - the PostgreSQL fixtures, for every test module
from rssd_magic.adapters.magic import ENV_RSSD


@dataclass
class Ran:
    """What one ``run_cell`` gave: the ExecutionResult and what it showed."""

    result: object
    stdout: str
    stderr: str
    displays: list  # RichOutput objects: .data, .metadata

    @property
    def banner(self) -> list:
        return [d for d in self.displays if d.metadata.get("rssd_magic", {}).get("banner")]

    @property
    def notes(self) -> list:
        """Notes shown as displays of their own (a new RSSD created)."""
        return [d for d in self.displays if d.metadata.get("rssd_magic", {}).get("note")]

    @property
    def shown(self) -> list:
        """What the cell itself showed: no banner, no note of ours."""
        return [d for d in self.displays if not {"banner", "note"} & set(d.metadata.get("rssd_magic", {}))]


class Kernel:
    """Drives the shell like a notebook does, and can "restart" it: the
    extension's stores are closed (as at kernel shutdown) and the names the
    test defined are dropped, so the next run sees what a fresh kernel sees."""

    def __init__(self, shell: InteractiveShell, workdir: Path):
        self.shell = shell
        self.workdir = workdir
        self.db = workdir / "resource-surveillance.sqlite.db"
        self._baseline = set(shell.user_ns)

    def run(self, code: str) -> Ran:
        with capture_output() as cap:
            result = self.shell.run_cell(code, store_history=True)
        return Ran(result, cap.stdout, cap.stderr, cap.outputs)

    def ok(self, code: str) -> Ran:
        ran = self.run(code)
        assert ran.result.success, (ran.result.error_before_exec or ran.result.error_in_exec, ran.stdout, ran.stderr)
        return ran

    @property
    def magics(self):
        return self.shell.magics_manager.registry["StatefulMagics"]

    def restart(self) -> None:
        self.magics.close()
        for name in set(self.shell.user_ns) - self._baseline:
            del self.shell.user_ns[name]

    def rows(self, sql: str, params=(), db: Path | None = None) -> list[tuple]:
        conn = sqlite3.connect(db or self.db)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def states(self, db: Path | None = None) -> list[tuple[str, str]]:
        return self.rows(
            "SELECT from_state, to_state FROM orchestration_session_state WHERE session_entry_id IS NOT NULL ORDER BY rowid",
            db=db,
        )


@pytest.fixture(scope="session", autouse=True)
def user_secret_dir(tmp_path_factory):
    """Keep the per-user signing key (trust.py) out of the real home: every
    shell and kernel the tests start uses this data directory."""
    path = tmp_path_factory.mktemp("jupyter-data")
    old = os.environ.get("JUPYTER_DATA_DIR")
    os.environ["JUPYTER_DATA_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("JUPYTER_DATA_DIR", None)
    else:
        os.environ["JUPYTER_DATA_DIR"] = old


@pytest.fixture(scope="session")
def shell() -> InteractiveShell:
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "rssd_magic")
    return shell


@pytest.fixture
def kernel(shell, tmp_path, monkeypatch) -> Kernel:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_RSSD, raising=False)
    k = Kernel(shell, tmp_path)
    magics = k.magics
    # Every setting a test may change (%config or directly), and the shell's
    # own config section %config writes to: restored, so no test leaks a
    # setting into the next and the suite passes in any order.
    settings = {name: getattr(magics, name) for name in magics.trait_names(config=True)}
    config = copy.deepcopy(shell.config.get("StatefulMagics", Config()))
    clock = magics.clock
    yield k
    k.restart()
    shell.config.StatefulMagics = config
    magics.clock = clock
    for name, value in settings.items():
        if getattr(magics, name) != value:
            setattr(magics, name, value)


def counter(path: Path) -> int:
    """Lines in a side-effect file (0 when missing)."""
    return len(path.read_text().splitlines()) if path.exists() else 0


def forge_record(kernel, cell: str, record: dict, signature: str | None = None) -> str:
    """Write *record* as the EXECUTED record of the ``--name`` *cell*, as
    another tool could, before the cell ever ran here: the cell's key
    computed in advance, ids from the future; with a *signature* row by
    this kernel's key id.  Returns the cell's ingest_src."""
    from rssd_magic.engine.keys import cell_key

    line, _, body = cell.partition("\n")
    name = line.split("--name ", 1)[1].split()[0]
    key = cell_key(body, "default", name)
    (session,) = kernel.rows("SELECT orchestration_session_id FROM orchestration_session LIMIT 1")[0]
    conn = sqlite3.connect(kernel.db)
    conn.execute(
        "INSERT INTO orchestration_session_entry (orchestration_session_entry_id, session_id, ingest_src, elaboration) "
        "VALUES ('ZZZZZZZZZZZZZZZZZZZZZZZZZ1', ?, ?, '{}')",
        (session, key.ingest_src),
    )
    conn.execute(
        "INSERT INTO orchestration_session_state (orchestration_session_state_id, session_id, session_entry_id, "
        "from_state, to_state, transition_result, transition_reason, transitioned_at) "
        "VALUES ('ZZZZZZZZZZZZZZZZZZZZZZZZZ2', ?, 'ZZZZZZZZZZZZZZZZZZZZZZZZZ1', 'RUNNING', 'EXECUTED', ?, 'completed', '2099-01-01 00:00:00')",
        (session, json.dumps(record)),
    )
    if signature is not None:
        conn.execute(
            "INSERT INTO rssd_magic_signature (payload_id, key_id, signature) VALUES (?, ?, ?)",
            ("0" * 64, kernel.magics.signer.key_id, signature),
        )
    conn.commit()
    conn.close()
    return key.ingest_src
