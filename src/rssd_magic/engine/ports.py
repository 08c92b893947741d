"""What the engine and its adapters say to each other, in one module both
import (so nothing has to type them as ``Any`` to dodge an import cycle):
the options of one ``%%stateful`` line, what the runner needs from the shell
(:class:`ShellPort`) and from the settings (:class:`Config`), and what
running a body gave (:class:`Executed`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from ..records.trust import Signer


@dataclass
class Executed:
    """What running the body gave: its result, or the error and the
    traceback lines the shell formatted for it (the port's ``execute``)."""

    result: Any = None
    error: BaseException | None = None
    traceback: list[str] | None = None


@dataclass(frozen=True)
class CellOptions:
    """The options of one ``%%stateful`` line (see the magic's help)."""

    db: str | None = None
    line: str = ""  # the option line as typed (surveilr's exec row keeps it)
    name: str | None = None
    scope: str | None = None
    force: bool = False
    quiet: bool = False
    wait_s: float | None = None
    ttl_s: float | None = None
    ttl_text: str = ""
    replay_only: bool = False
    strict: bool = False
    ignore: tuple[str, ...] = ()
    deps_file: tuple[str, ...] = ()
    deps_env: tuple[str, ...] = ()
    deps_package: tuple[str, ...] = ()
    sql: bool = False
    conn: str | None = None
    out: str | None = None


class ShellPort(Protocol):
    """What the runner needs from the shell (the adapter implements it)."""

    shell: Any  # duck-typed by capture.py: display_pub, displayhook
    user_ns: dict
    live: bool  # True when displays can be updated in place (a Jupyter kernel)

    def transform_cell(self, cell: str) -> str: ...
    def execute(self, cell: str) -> Executed: ...
    async def execute_async(self, cell: str) -> Executed: ...
    def publish(self, data: dict, metadata: dict, display_id: str | None = None, update: bool = False) -> None: ...
    def show_result(self, value: Any, data: dict, metadata: dict) -> None: ...
    def say(self, text: str, tag: str | None = None) -> None: ...
    def note(self, text: str) -> None: ...
    def notebook(self) -> str | None: ...
    def session_args(self) -> dict: ...


class Config(Protocol):
    """Settings read on every run (the adapter's traitlets)."""

    rssd_path: str | None
    default_scope: str
    quiet: bool
    wait_seconds: float | None
    lease_seconds: float
    max_output_size: int | None
    busy_timeout_seconds: float
    allow_network_fs: bool
    blob_store: str | None
    blob_min_bytes: int
    clock: Callable[[], float]
    signer: Signer
