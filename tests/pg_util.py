"""A real PostgreSQL server for the tests: started once per test session by
``pgserver`` (a PyPI package that ships the server's binaries, so nothing
needs installing; as root it runs the server as a user of its own), in a
temporary folder, reached over a unix socket, stopped at the end — or the
server ``$RSSD_MAGIC_TEST_PG_URL`` names (to test another version).

Each test gets a schema of its own (:func:`fresh_url`), chosen through the
URL's ``options=-c search_path=…`` — which is also how a team keeps
projects apart on one server, so every test exercises ``search_path``.

Tests that stop, restart or cut off a server get one of their own
(:class:`OwnServer`: ``initdb`` and ``pg_ctl`` from pgserver's binaries), so
nothing else in the session is disturbed.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import subprocess
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


def params_of_url(url: str) -> dict:
    from psycopg.conninfo import conninfo_to_dict

    return conninfo_to_dict(url)


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


def _bin(name: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver._commands import POSTGRES_BIN_PATH
    return str(POSTGRES_BIN_PATH / name)


#: The system user servers run as when the tests run as root (pgserver's own).
SERVER_USER = "pgserver" if os.geteuid() == 0 else None


class OwnServer:
    """A PostgreSQL server for one test module alone, on a unix socket in a
    folder of its own, that tests may stop, start and restart."""

    def __init__(self):
        server_url()  # pgserver's set-up: its binaries' permissions, its system user
        self.folder = tempfile.mkdtemp(prefix="rssd-own-pg-")
        self.data = os.path.join(self.folder, "data")
        if SERVER_USER:
            shutil.chown(self.folder, SERVER_USER)
        self._run(_bin("initdb"), "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "utf8", "-N")
        with open(os.path.join(self.data, "postgresql.conf"), "a") as conf:
            conf.write(f"listen_addresses = ''\nunix_socket_directories = '{self.folder}'\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")  # fmt: skip
        self.url = f"postgresql://postgres@/postgres?host={self.folder}"
        self.start()

    def _run(self, *args: str) -> None:
        subprocess.run(args, check=True, capture_output=True, timeout=120, user=SERVER_USER)

    def _ctl(self, *args: str) -> None:
        self._run(_bin("pg_ctl"), "-D", self.data, "-l", os.path.join(self.folder, "log"), "-w", *args)

    def start(self) -> None:
        self._ctl("start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "stop")

    def restart(self) -> None:
        self._ctl("-m", "fast", "restart")

    def running(self) -> bool:
        return os.path.exists(os.path.join(self.data, "postmaster.pid"))

    def fresh_url(self, prefix: str = "own") -> str:
        """A new, empty schema of this server; its URL."""
        name = f"{prefix}_{next(_counter)}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')
        return with_options(self.url, options=f"-c search_path={name}")

    def close(self) -> None:
        try:
            self._ctl("-m", "immediate", "stop")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass  # not running
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def own_server():
    """A server of this module's own (see :class:`OwnServer`), running at
    the start of every test that uses it (:func:`own_pg`)."""
    server = OwnServer()
    yield server
    server.close()


@pytest.fixture
def own_pg(own_server) -> OwnServer:
    if not own_server.running():
        own_server.start()
    yield own_server
    if not own_server.running():
        own_server.start()
