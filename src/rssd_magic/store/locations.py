"""Where ``--db`` points, and how a store is named in what people read.

A location is a file path (a surveilr RSSD, SQLite) or a URL whose scheme
names a backend (``postgresql://…``).  :func:`resolve_location` applies the
precedence users configure; :func:`redact` and :func:`redact_text` keep
passwords out of every message and every stored text.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

#: surveilr's default RSSD file name, and the variable surveilr reads for it
#: (a file path only: surveilr opens it).
DEFAULT_RSSD = "resource-surveillance.sqlite.db"
ENV_RSSD = "SURVEILR_STATEDB_FS_PATH"
#: Our own variable: a path or any backend URL; checked before surveilr's.
ENV_DB = "RSSD_MAGIC_DB"

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme_of(location: str) -> str:
    """``postgresql`` for a PostgreSQL URL, ``file`` for a path or file URL."""
    match = _URL.match(location)
    return match.group(1).lower() if match else "file"


def resolve_location(db: str | os.PathLike | None = None, configured: str | None = None) -> str:
    """Which store: *db* (``--db``), then *configured* (``rssd_path``), then
    ``$RSSD_MAGIC_DB``, then ``$SURVEILR_STATEDB_FS_PATH``, then surveilr's
    default ``./resource-surveillance.sqlite.db``.  Paths come back absolute;
    URLs as given."""
    raw = os.fspath(db) if db else (configured or os.environ.get(ENV_DB) or os.environ.get(ENV_RSSD) or DEFAULT_RSSD)
    scheme = scheme_of(raw)
    if scheme == "file":
        if raw.startswith("file://"):
            raw = urlsplit(raw).path
        return str(Path(raw).expanduser().absolute())
    return raw


def redact(location: str) -> str:
    """*location* fit for a message: a URL loses its password, whether in
    ``user:password@`` or in a ``password=`` query parameter (libpq takes
    both)."""
    if scheme_of(location) == "file":
        return location
    parts = urlsplit(location)
    if not parts.password and "password=" not in parts.query.lower():
        return location  # as given (urlunsplit would drop an empty host: postgresql:///db)
    if parts.password:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1))
    if "password=" in parts.query.lower():
        query = "&".join(
            "password=***" if p.partition("=")[0].strip().lower() == "password" else p for p in parts.query.split("&")
        )
        parts = parts._replace(query=query)
    return urlunsplit(parts)


#: A URL inside free text (an option line, a message, an argv entry).
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")
#: libpq's keyword form (``host=db password=s3cret``), anywhere in text.
_PASSWORD_WORD = re.compile(r"(?i)\b(password\s*=\s*)('[^']*'|\"[^\"]*\"|[^\s&'\"]+)")


def redact_text(text: str) -> str:
    """*text* with the password of every URL in it removed (see
    :func:`redact`), and of every ``password=…`` keyword: what is stored
    (an option line, a session's argv) and shown never carries one."""
    if "://" not in text and "password" not in text.lower():
        return text
    text = _URL_IN_TEXT.sub(lambda m: redact(m.group(0)), text)
    return _PASSWORD_WORD.sub(lambda m: m.group(1) + "***", text)
