"""Hooks the extension installs in the shell (IPython adapter): DuckDB lock
conflicts shown as one line naming the holder; hit counts and sessions
written when the kernel is stopped with SIGTERM; and, before every cell,
how the records written in the background since the last one ended."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any


def watch_for_duckdb(shell) -> None:
    """Once the notebook imports duckdb, show its lock conflicts as one line
    naming the process that holds the file (DuckDB allows one writer per
    file; its raw error is an IO Error dump).  Installed on first sight of
    the module, so loading the extension does not import duckdb, and only
    when the user has no custom exception handler of their own."""
    from .. import sql

    def check(*_args) -> None:
        duckdb = sys.modules.get("duckdb")
        if duckdb is None:
            return
        shell.events.unregister("pre_run_cell", check)
        if shell.custom_exceptions:
            return

        def on_io_error(shell, etype, value, tb, tb_offset=None):
            message = sql.describe_lock_error(value)
            if message is None:
                return shell.showtraceback((etype, value, tb), tb_offset=tb_offset)
            shell._showtraceback(etype, value, [f"{etype.__name__}: {message}"])
            return None

        shell.set_custom_exc((duckdb.IOException,), on_io_error)

    shell.events.register("pre_run_cell", check)
    check()


def close_on_sigterm(magics: Any) -> None:
    """Write buffered hit counts and finish sessions when the kernel is
    stopped with SIGTERM (the default action would skip atexit), then let
    the signal do what it did before."""
    if threading.current_thread() is not threading.main_thread():
        return
    before = signal.getsignal(signal.SIGTERM)
    # Ours from an earlier load (%reload_ext): replaced, never chained, so
    # one SIGTERM closes the current instance once.
    before = getattr(before, "_rssd_magic_before", before)
    if before is signal.SIG_IGN:
        return

    def on_sigterm(signum, frame):
        magics.close()
        if callable(before):
            before(signum, frame)
        else:  # the default: end the process, as if we had not been here
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    on_sigterm._rssd_magic_before = before  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, on_sigterm)


def report_records_before_each_cell(shell) -> None:
    """Before every cell (a ``%%stateful`` one or not), say how the records
    written in the background since the last cell ended: a failed write
    is said at the next cell, whatever it is."""

    def report(*_args) -> None:
        magics = shell.magics_manager.registry.get("StatefulMagics")  # the loaded one, after any reload
        if magics is not None:
            magics.runner.report_finished_records()

    report.__name__ = "rssd_magic_report_records"
    for hook in list(shell.events.callbacks["pre_run_cell"]):
        if getattr(hook, "__name__", "") == "rssd_magic_report_records":
            shell.events.unregister("pre_run_cell", hook)
    shell.events.register("pre_run_cell", report)
