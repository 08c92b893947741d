"""A real PostgreSQL server for the tests: started once per test session by
``pgserver`` (a PyPI package that ships the server's binaries, so nothing
needs installing; as root it runs the server as a user of its own), in a
temporary folder, reached over a unix socket, stopped at the end — or the
server ``$RSSD_MAGIC_TEST_PG_URL`` names (to test another version).

Each test gets a schema of its own (:func:`fresh_url`), chosen through the
URL's ``options=-c search_path=…`` — which is also how a team keeps
projects apart on one server, so every test exercises ``search_path``.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile
import uuid
import warnings
from urllib.parse import quote

import psycopg
import pytest

_server = None
_base: str | None = None
_counter = itertools.count()


#: A server to use instead of starting one (a CI service, another version).
ENV_URL = "RSSD_MAGIC_TEST_PG_URL"


def server_url() -> str:
    """The URL of the session's server (started on first use, unless
    ``$RSSD_MAGIC_TEST_PG_URL`` names one: then only schemas are made there)."""
    global _server, _base
    if _base is None and os.environ.get(ENV_URL):
        _base = os.environ[ENV_URL]
        os.environ.setdefault("RSSD_MAGIC_BLOB_CACHE", tempfile.mkdtemp(prefix="rssd-magic-blob-cache-"))
    if _base is None:
        folder = tempfile.mkdtemp(prefix="rssd-magic-pg-")
        # atexit runs last-registered first: the server is stopped (by us,
        # before pgserver's own hook, which does nothing once its folder is
        # gone), then the folder removed.
        atexit.register(shutil.rmtree, folder, True)
        # The blob cache of every backend (and kernel) the tests start: never the user's.
        os.environ.setdefault("RSSD_MAGIC_BLOB_CACHE", os.path.join(folder, "blob-cache"))
        with warnings.catch_warnings():  # platformdirs: "XDG_RUNTIME_DIR is not set" in containers
            warnings.simplefilter("ignore")
            import pgserver

            _server = pgserver.get_server(os.path.join(folder, "data"), cleanup_mode="delete")
        atexit.register(stop_server)
        _base = _server.get_uri()
        with psycopg.connect(_base, autocommit=True) as conn:
            # A test server: durability is not what is tested.
            conn.execute("ALTER SYSTEM SET fsync = off")
            conn.execute("ALTER SYSTEM SET synchronous_commit = off")
            conn.execute("ALTER SYSTEM SET full_page_writes = off")
            conn.execute("SELECT pg_reload_conf()")
    return _base


def stop_server() -> None:
    global _server, _base
    if _server is not None:
        _server.cleanup()
    _server = _base = None


def with_options(url: str, **params: str) -> str:
    sep = "&" if "?" in url else "?"
    return url + sep + "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())


def fresh_schema(prefix: str = "t") -> str:
    """A new, empty schema on the server; its name."""
    name = f"{prefix}_{next(_counter)}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url(), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    return name


def fresh_url(prefix: str = "t") -> str:
    """The URL of a new, empty schema on the session's server."""
    return with_options(server_url(), options=f"-c search_path={fresh_schema(prefix)}")


def schema_of(url: str) -> str:
    """The schema a :func:`fresh_url` names."""
    return url.rsplit("search_path%3D", 1)[1]


def raw(url: str, query: str, params: tuple = ()) -> list[tuple]:
    """Run SQL as another tool would (``?`` placeholders, as sqlite3 takes)."""
    if params:
        query = query.replace("%", "%%").replace("?", "%s")
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params or None)
        return cur.fetchall() if cur.description else []


@pytest.fixture(scope="session")
def pg_server():
    url = server_url()
    yield url


@pytest.fixture
def pg_url(pg_server) -> str:
    """A fresh schema's URL, for one test."""
    return fresh_url()
