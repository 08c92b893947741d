"""The stores: one module group per backend (``sqlite*``: an RSSD file;
``postgres*``: a schema on a PostgreSQL server), each a
:class:`~rssd_magic.store.journal.Journal` with its own transactions, hot
path, claim row, blobs and dialect.  :func:`open_backend` picks one by the
location's scheme through :data:`REGISTRY`, so a new backend is one
dialect module, one blob module and one line here (store/locations.py says
where ``--db`` points).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..store.base import StoreError
from ..store.locations import DEFAULT_RSSD, ENV_DB, ENV_RSSD, redact, redact_text, resolve_location, scheme_of

if TYPE_CHECKING:  # the type only: importing the journal here would close an import loop
    from ..store.journal import StateBackend

#: URL scheme -> "module:Class".  Modules are imported on first use, so a
#: backend's driver is only needed by those who use it.
REGISTRY = {
    "file": "rssd_magic.backends.sqlite:SqliteBackend",
    "postgresql": "rssd_magic.backends.postgres:PostgresBackend",
    "postgres": "rssd_magic.backends.postgres:PostgresBackend",
}
#: What to install when a backend's module or driver is missing.
INSTALL_HINT = {
    "postgresql": "pip install 'rssd_magic[postgres]'",
    "postgres": "pip install 'rssd_magic[postgres]'",
}


def backend_class(location: str) -> type:
    """The backend class for *location* (StoreError when none can serve it)."""
    scheme = scheme_of(location)
    target = REGISTRY.get(scheme)
    if target is None:
        known = ", ".join(sorted(s for s in REGISTRY if s != "file"))
        raise StoreError(f"{redact(location)}: no backend for {scheme}:// URLs (known: a file path, {known})")
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = INSTALL_HINT.get(scheme, "")
        raise StoreError(
            f"{redact(location)}: the {scheme} backend can't be loaded ({exc})" + (f"; {hint}" if hint else "")
        ) from None
    return getattr(module, cls_name)


def open_backend(location: str, **options) -> StateBackend:
    """Open the store at *location* (see the backend's ``open`` for options:
    ``session_args``, ``create``, ``readonly``, ``busy_timeout_s`` …)."""
    return backend_class(location).open(location, **options)


__all__ = [
    "DEFAULT_RSSD",
    "ENV_DB",
    "ENV_RSSD",
    "REGISTRY",
    "StoreError",
    "backend_class",
    "open_backend",
    "redact",
    "redact_text",
    "resolve_location",
    "scheme_of",
]
