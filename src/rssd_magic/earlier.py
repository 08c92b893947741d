"""Keys an earlier version of this package computed for a cell, looked up
when the current key has no record: a cell recorded under such a key keeps
it, so it replays and never runs again just because keys changed form."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import sql
from .backends.base import StateBackend, Transition
from .keys import CellKey, cell_key
from .lifecycle import EXECUTED, RUNNING
from .runs import SQLCell


class EarlierKeys:
    """Finds records under earlier key forms, for one shell (its port tells
    the notebook; the folders looked at are remembered)."""

    def __init__(self, port: Any):
        self.port = port
        #: Per folder, RSSD and notebook: scopes earlier versions keyed cells by.
        self._scopes: dict[tuple, list[str]] = {}

    def clear(self) -> None:
        self._scopes.clear()

    def find(
        self, backend: StateBackend, key: CellKey, cell: str, scope: str, opts: Any, sql_cell: SQLCell | None
    ) -> tuple[CellKey, Transition | None]:
        """A cell recorded under a key an earlier version computed keeps that
        key: it replays, and never runs again just because keys changed form.
        Looked up only when the current key has no record (a few indexed
        reads, on the way to running anyway).

        Two earlier forms: SQL keys v1 (parameters keyed differently), and
        keys scoped by the notebook's path, which versions up to 0.1 used by
        default when the client told the kernel the path.  A cell in the
        default scope finds a record made under the scope of its own
        notebook, or of a notebook beside it: the same code on the same
        inputs, which the default scope now replays whichever notebook or
        client runs it."""
        scopes = [scope]
        if not opts.scope:
            scopes += self._notebook_scopes(backend)
        extras = [sql_cell.extra if sql_cell is not None else ""]
        if sql_cell is not None and opts.name is None:
            try:
                extras.append(sql.legacy_key_extra(sql_cell.body, sql_cell.conn, sql_cell.params))
            except sql.SQLUsageError:
                pass  # no v1 key exists for such parameters
        for earlier_scope in scopes:
            for extra in extras:
                if sql_cell is not None:
                    earlier = cell_key(sql.normalize_sql(cell), earlier_scope, opts.name, extra=extra)
                else:
                    earlier = cell_key(cell, earlier_scope, opts.name, inputs=key.inputs, strict=opts.strict)
                if earlier == key:
                    continue  # looked up already
                latest = backend.latest(earlier)
                # A notebook scope's record counts when it replays (or an
                # earlier version's kernel runs it now); one that failed or was
                # forgotten runs again under the current key, in the shared scope.
                if latest is not None and (earlier_scope == scope or latest.to_state in (EXECUTED, RUNNING)):
                    return earlier, latest
        return key, None

    def _notebook_scopes(self, backend: StateBackend) -> list[str]:
        """The scopes an earlier version may have filed this kernel's cells
        under: its own notebook's, and those of the notebooks in the
        kernel's folder and the RSSD's (``jupyter execute``, nbclient and
        papermill start the kernel in the notebook's folder, as Lab does).
        Listed once per folder, RSSD and notebook: a look at two folders,
        where listing the store's scopes costs a query over every cell."""
        path = getattr(backend, "path", None)
        rssd_dir = path.parent if path is not None else None
        notebook = self.port.notebook()
        where = (os.getcwd(), rssd_dir, notebook)
        scopes = self._scopes.get(where)
        if scopes is None:
            found = [notebook] if notebook else []
            for folder in dict.fromkeys(f for f in (Path.cwd(), rssd_dir) if f is not None):
                try:
                    found += sorted(str(nb) for nb in folder.glob("*.ipynb"))
                except OSError:
                    pass  # an unreadable folder: nothing to find there
            scopes = list(dict.fromkeys(_notebook_scope(nb, rssd_dir) for nb in found))
            if len(self._scopes) > 64:
                self._scopes.clear()
            self._scopes[where] = scopes
        return scopes


@lru_cache(maxsize=64)
def _notebook_scope(notebook: str, rssd_dir: Path | None) -> str:
    """The scope versions up to 0.1 gave a notebook's cells: its path,
    relative to the RSSD's folder when below it."""
    nb = Path(notebook)
    if nb.is_absolute() and rssd_dir is not None:
        try:
            return nb.relative_to(rssd_dir).as_posix()
        except ValueError:
            pass
    return nb.as_posix()
