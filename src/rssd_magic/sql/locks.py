"""DuckDB lock conflicts, said in words: which process holds the file.

DuckDB lets one process write a database file; a second one gets "Could not
set lock on file … Conflicting lock is held in <program> (PID n)".  In a
notebook that is usually another kernel (or the same one, through a second
connection), so :func:`describe_lock_error` names it, with its command line
when ``/proc`` can tell, and says what to do.
"""

from __future__ import annotations

import os
import re

from ..engine.claims import command_line

_LOCK_RE = re.compile(
    r'Could not set lock on file "(?P<path>[^"]*)":\s*Conflicting lock is held in\s+'
    r"(?P<program>.*?)\s*\(PID (?P<pid>\d+)\)(?:\s+by user (?P<user>[^.\s]+))?"
)
# The same error when DuckDB's wording of the holder is not the one above.
_LOCK_PATH_RE = re.compile(r'lock on file "([^"]*)"')


def describe_lock_error(exc: BaseException | str) -> str | None:
    """One line naming the process that holds a DuckDB file's lock, or None
    when *exc* is not a lock conflict."""
    text = str(exc)
    m = _LOCK_RE.search(text)
    if not m:
        if "Could not set lock on file" not in text:
            return None
        path = _LOCK_PATH_RE.search(text)
        where = path.group(1) if path else "the database file"
        return f"DuckDB database {where} is locked by another process (DuckDB allows one writing process per file)"
    pid = int(m.group("pid"))
    who = command_line(pid) or m.group("program")
    if pid == os.getpid():
        holder = f"this process (PID {pid}), through another connection opened with a different configuration"
    else:
        holder = f"another process: PID {pid} ({who})"
        if m.group("user"):
            holder += f", user {m.group('user')}"
    return (
        f"DuckDB database {m.group('path')} is locked by {holder}. "
        "DuckDB allows one writing process per file: close the database there and run the cell again"
    )
