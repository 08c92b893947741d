"""A real PgBouncer in front of the test server (pg_util.py), for the tests
that run the package through a pooler.

PgBouncer is a system package (Debian's ``pgbouncer``, in /usr/sbin).  When
it is missing the tests that need it skip, saying how to install it —
unless ``$RSSD_MAGIC_REQUIRE_PGBOUNCER=1`` (CI sets it), then they fail.

Each :class:`Bouncer` listens on a free port of 127.0.0.1 with
``auth_type=trust`` and two databases on the test server: ``tx``
(transaction pooling) and ``session`` (session pooling).  PgBouncer drops
the ``options`` startup parameter (``ignore_startup_parameters``), so a
schema is chosen the way a team behind a pooler chooses it: a role whose
default ``search_path`` is that schema (:func:`role_with_schema`).  As
root, PgBouncer refuses to run: it is started as the server's own user.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import psycopg
import pytest

from pg_util import SERVER_USER, params_of_url

ENV_REQUIRE = "RSSD_MAGIC_REQUIRE_PGBOUNCER"


def binary() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    return "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None


def require() -> str:
    """PgBouncer's path; skips (or fails, when CI requires it) without it."""
    found = binary()
    if found is None:
        if os.environ.get(ENV_REQUIRE) == "1":
            pytest.fail(f"pgbouncer is not installed and ${ENV_REQUIRE}=1: apt-get install pgbouncer")
        pytest.skip("apt-get install pgbouncer")
    return found


def role_with_schema(server_url: str) -> tuple[str, str]:
    """A new login role owning a new schema that is its default search_path."""
    role, schema = f"bouncer_{uuid.uuid4().hex[:10]}", f"pooled_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}" LOGIN')
        conn.execute(f'CREATE SCHEMA "{schema}" AUTHORIZATION "{role}"')
        conn.execute(f'ALTER ROLE "{role}" SET search_path = "{schema}"')
    return role, schema


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bouncer:
    """PgBouncer for *users*, in front of the server at *server_url*."""

    def __init__(self, server_url: str, users: list[str], pool_size: int = 2):
        exe = require()
        server = params_of_url(server_url)
        self.folder = tempfile.mkdtemp(prefix="rssd-pgbouncer-")
        self.port = _free_port()
        backend = f"host={server.get('host')} port={server.get('port') or 5432} dbname={server.get('dbname') or 'postgres'}"
        ini = os.path.join(self.folder, "pgbouncer.ini")
        with open(ini, "w") as fh:
            fh.write(
                f"[databases]\ntx = {backend} pool_mode=transaction\nsession = {backend} pool_mode=session\n"
                f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
                f"auth_type = trust\nauth_file = {self.folder}/users.txt\n"
                f"default_pool_size = {pool_size}\nmax_client_conn = 200\n"
                "ignore_startup_parameters = options, extra_float_digits\n"
                f"logfile = {self.folder}/pgbouncer.log\npidfile = {self.folder}/pgbouncer.pid\n"
            )
        with open(os.path.join(self.folder, "users.txt"), "w") as fh:
            fh.writelines(f'"{user}" ""\n' for user in users)
        if SERVER_USER:
            for path in (self.folder, ini, os.path.join(self.folder, "users.txt")):
                shutil.chown(path, SERVER_USER)
        command = [exe, *(["-u", SERVER_USER] if SERVER_USER else []), ini]
        # Its log goes to its logfile (stderr too, which nobody reads: a pipe would fill and stall it).
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    err = self.log()
                    self.close()
                    raise RuntimeError(f"pgbouncer did not start: {err}")
                time.sleep(0.02)

    def log(self) -> str:
        try:
            with open(os.path.join(self.folder, "pgbouncer.log"), errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def url(self, database: str, user: str) -> str:
        """A client URL: *database* is ``tx`` or ``session``."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
