"""A "kernel" in a process of its own for the tests that need real
processes: an IPython shell with rssd_magic loaded, driven line by line
over a pipe (JSON in, JSON out), so a test can keep it running while other
processes lock, delete or replace the files under it.

Optionally started under a command prefix (``unshare --mount …``) and with
StatefulMagics settings applied before the first cell.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

DRIVER = r"""
import json, os, sys
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
shell = InteractiveShell.instance()
shell.run_line_magic("load_ext", "rssd_magic")
magics = shell.magics_manager.registry["StatefulMagics"]
for name, value in json.loads(sys.argv[1]).items():
    setattr(magics, name, value)
print(json.dumps({"pid": os.getpid()}), flush=True)
for line in sys.stdin:
    msg = json.loads(line)
    if "cell" in msg:
        with capture_output() as cap:
            result = shell.run_cell(msg["cell"])
        err = result.error_before_exec or result.error_in_exec
        out = {
            "ok": result.success, "stdout": cap.stdout, "stderr": cap.stderr,
            "error": None if err is None else f"{type(err).__name__}: {err}",
            "displays": [d.data.get("text/plain", "") for d in cap.outputs],
        }
    elif "eval" in msg:
        out = {"value": eval(msg["eval"], shell.user_ns)}
    else:
        magics.close()
        out = {"closed": True}
    print(json.dumps(out, default=repr), flush=True)
    if "close" in msg:
        break
"""


class ShellProcess:
    """One IPython shell process.  :meth:`run` a cell, :meth:`value` of an
    expression (JSON-able), :meth:`close` it (the extension closes its
    stores, as at kernel shutdown)."""

    def __init__(self, cwd: Path, *, prefix: Sequence[str] = (), env: dict | None = None, **settings: Any):
        full = {**os.environ, **(env or {})}
        full.pop("PYTEST_CURRENT_TEST", None)
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", DRIVER, json.dumps(settings)],
            cwd=cwd, env=full, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.pid = self._read()["pid"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the shell process ended: {self.proc.stderr.read()}")
        return json.loads(line)

    def _ask(self, msg: dict) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def run(self, cell: str) -> dict:
        return self._ask({"cell": cell})

    def ok(self, cell: str) -> dict:
        ran = self.run(cell)
        assert ran["ok"], ran
        return ran

    def value(self, expr: str) -> Any:
        return self._ask({"eval": expr})["value"]

    def close(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            self._ask({"close": True})
            self.proc.wait(timeout=timeout)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()
