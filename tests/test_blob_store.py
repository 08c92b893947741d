"""Large values in a bucket (store/buckets.py, manage/sweep.py): with
``StatefulMagics.blob_store`` set, blobs of at least ``blob_min_bytes`` go to
an S3 bucket — a real SeaweedFS started by the tests (s3_util.py) — before
the record that names them; the record names the bucket, so a kernel with
nothing set replays it; gc sweeps only what the store wrote; verify reads
the objects back; an exported RSSD holds the bytes itself; faults are one
line, and a cell whose values can't be stored runs again next time."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import counter
from rssd_magic.backends.objects import S3Blobs
from rssd_magic.cli import main
from rssd_magic.records.digests import buffer_digest
from rssd_magic.store import buckets
from s3_util import free_ports, s3_env, s3_url, weed_server  # noqa: F401 - fixtures

APPEND = "open('side.log', 'a').write('ran\\n')\n"
# 4 MB: goes to the bucket (and is written in the background); 7 stays in the store.
CELL = "%%stateful\nimport numpy as np\n" + APPEND + "big = np.arange(500_000, dtype='float64')\nsmall = 7\n"


@pytest.fixture
def bucket_kernel(kernel, s3_url, tmp_path, monkeypatch):
    """A kernel whose large values go to a new bucket; this machine's blob
    cache is the test's own, and no S3 client is shared with another test."""
    monkeypatch.setenv("RSSD_MAGIC_BLOB_CACHE", str(tmp_path / "blob-cache"))
    monkeypatch.delenv(buckets.ENV_BLOBS, raising=False)
    buckets._open.clear()
    kernel.magics.blob_store = s3_url
    yield kernel
    kernel.magics.runner.settle()
    buckets._open.clear()


def record_of(kernel) -> dict:
    (text,) = kernel.rows(
        "SELECT transition_result FROM orchestration_session_state WHERE to_state = 'EXECUTED' ORDER BY rowid DESC LIMIT 1"
    )[0]
    return json.loads(text)


def objects(url: str) -> dict:
    return S3Blobs(url, cache=None).objects()


def forget_cache(kernel, tmp_path, monkeypatch, name: str) -> None:
    """A fresh kernel on another machine: nothing cached, no client kept."""
    kernel.magics.runner.settle()
    kernel.restart()
    monkeypatch.setenv("RSSD_MAGIC_BLOB_CACHE", str(tmp_path / name))
    buckets._open.clear()


def test_large_values_go_to_the_bucket_and_a_kernel_with_nothing_set_replays_them(bucket_kernel, s3_url, tmp_path, monkeypatch):
    k = bucket_kernel
    k.ok(CELL)
    k.magics.runner.settle()
    record = record_of(k)
    assert record["blob_store"] == s3_url, "the record names where its bytes are"
    digest = buffer_digest(np.arange(500_000, dtype="float64").view(np.uint8))
    assert set(objects(s3_url)) == {digest}
    assert k.rows("SELECT count(*) FROM rssd_magic_blob WHERE size >= ?", (1 << 20,)) == [(0,)], "not in the RSSD"
    cached = list((tmp_path / "blob-cache").rglob("*"))
    assert [p for p in cached if p.is_file() and p.stat().st_size == 4_000_000], "the recording kept a copy here"
    forget_cache(k, tmp_path, monkeypatch, "cache-2")
    k.magics.blob_store = None  # a teammate who set nothing
    ran = k.ok(CELL)
    assert counter(tmp_path / "side.log") == 1, "replayed, not run again"
    assert ran.banner, "a replay"
    assert np.array_equal(k.shell.user_ns["big"], np.arange(500_000, dtype="float64"))
    assert k.shell.user_ns["small"] == 7


def test_small_values_stay_in_the_store_and_the_record_names_no_bucket(bucket_kernel, s3_url):
    bucket_kernel.ok("%%stateful\nx = list(range(10))\n")
    assert "blob_store" not in record_of(bucket_kernel)
    assert objects(s3_url) == {}


def test_a_replay_whose_object_is_gone_says_so_in_one_line(bucket_kernel, s3_url, s3_env, tmp_path, monkeypatch):
    k = bucket_kernel
    k.ok(CELL)
    forget_cache(k, tmp_path, monkeypatch, "cache-2")
    where = S3Blobs(s3_url, cache=None)
    (digest,) = objects(s3_url)
    s3_env.client().delete_object(Bucket=where.where.bucket, Key=where.where.key(digest))
    ran = k.ok(CELL)
    assert counter(tmp_path / "side.log") == 1
    (line,) = [ln for ln in ran.stderr.splitlines() + ran.stdout.splitlines() if "not restored" in ln]
    assert f"big (its bytes, blob {digest[:24]}…, are gone from {s3_url})" in line, line
    assert k.shell.user_ns["small"] == 7, "what the store holds is restored"


def test_an_unreachable_bucket_shows_the_output_records_nothing_and_the_cell_runs_again(bucket_kernel, tmp_path, monkeypatch):
    k = bucket_kernel
    (port,) = free_ports(1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    buckets._open.clear()
    ran = k.ok(CELL.replace("small = 7\n", "small = 7\nprint('shown')\n"))
    assert "shown" in ran.stdout
    k.magics.runner.settle()
    said = k.run("pass")  # what a record written in the background became is said before the next cell
    text = ran.stdout + ran.stderr + said.stdout + said.stderr
    assert "could not be recorded" in text and k.magics.blob_store in text, text
    assert "\n[stateful]" not in text.split("could not be recorded")[1].split("\n")[0]
    assert k.rows("SELECT to_state FROM orchestration_session_state WHERE session_entry_id IS NOT NULL ORDER BY rowid")[-1] == ("FAILED",)
    assert k.rows("SELECT count(*) FROM rssd_magic_claim WHERE state_id IS NOT NULL") == [(0,)], "claim released"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    buckets._open.clear()
    k.restart()
    k.magics.blob_store = None
    k.ok(CELL)
    assert counter(tmp_path / "side.log") == 2, "not recorded: it ran again"


def test_a_bad_blob_store_is_one_line_and_the_cell_is_not_run(bucket_kernel, tmp_path):
    bucket_kernel.magics.blob_store = "s3://Not_A_Bucket/x"
    ran = bucket_kernel.run(CELL)
    assert not ran.result.success
    assert counter(tmp_path / "side.log") == 0
    err = str(ran.result.error_in_exec)
    assert "blob_store" in err and "Not_A_Bucket" in err and "not run" in err and "\n" not in err


def test_gc_deletes_objects_no_current_record_names_after_the_grace_period(bucket_kernel, s3_url):
    k = bucket_kernel
    k.ok(CELL)
    k.magics.runner.settle()
    (digest,) = objects(s3_url)
    k.ok("%stateful forget --all")
    young = k.ok("%stateful gc --grace 1h")
    assert f"{s3_url}: freed 0 objects" in young.stdout and set(objects(s3_url)) == {digest}, "kept: in its grace period"
    dry = k.ok("%stateful gc --dry-run --grace 0s")
    assert f"{s3_url}: would free 1 object" in dry.stdout and set(objects(s3_url)) == {digest}
    assert f"  {digest}  " in dry.stdout, "the dry run lists what it would delete"
    done = k.ok("%stateful gc --grace 0s")
    assert f"{s3_url}: freed 1 object" in done.stdout, done.stdout
    assert objects(s3_url) == {}


def test_gc_keeps_what_current_records_name_and_leaves_a_shared_prefix_alone(bucket_kernel, s3_url):
    k = bucket_kernel
    k.ok(CELL)
    k.magics.runner.settle()
    kept = k.ok("%stateful gc --grace 0s")
    assert f"{s3_url}: freed 0 objects" in kept.stdout and len(objects(s3_url)) == 1, "named by a current record"
    other = np.ones(300_000).view(np.uint8)  # another store's blob under the same prefix
    S3Blobs(s3_url, cache=None).put(buffer_digest(other), other)
    k.ok("%stateful forget --all")
    left = k.ok("%stateful gc --grace 0s")
    assert f"{s3_url}: left alone: 1 object(s)" in left.stdout and "prefix of its own" in left.stdout, left.stdout
    assert len(objects(s3_url)) == 2, "nothing deleted in a shared prefix"


def test_gc_sweeps_only_the_bucket_set_here_never_one_because_a_record_names_it(bucket_kernel, s3_url, tmp_path):
    k = bucket_kernel
    k.ok(CELL)
    k.ok("%stateful forget --all")
    k.magics.blob_store = None
    unset = k.ok("%stateful gc --grace 0s")
    assert f"{s3_url}: left alone: not swept: not the bucket large values go to here" in unset.stdout, unset.stdout
    assert len(objects(s3_url)) == 1
    given = CliRunner().invoke(main, ["--db", str(k.db), "gc", "--grace", "0s", "--blob-store", s3_url])
    assert given.exit_code == 0 and f"{s3_url}: freed 1 object" in given.output, given.output
    assert objects(s3_url) == {}
    bad = CliRunner().invoke(main, ["--db", str(k.db), "gc", "--blob-store", "s3://x"])
    assert bad.exit_code != 0 and "--blob-store" in bad.output and "s3://x" in bad.output and "Traceback" not in bad.output


def test_verify_reads_the_objects_back(bucket_kernel, s3_url, s3_env):
    k = bucket_kernel
    k.ok(CELL)
    k.magics.runner.settle()
    assert "all intact" in k.ok("%stateful verify").stdout
    where = S3Blobs(s3_url, cache=None).where
    (digest,) = objects(s3_url)
    s3_env.client().put_object(Bucket=where.bucket, Key=where.key(digest), Body=b"planted")
    bad = k.run("%stateful verify")
    assert f"bad blob {digest[:24]}" in bad.stdout, bad.stdout


def test_an_exported_rssd_holds_the_bytes_and_replays_with_no_bucket(bucket_kernel, tmp_path, monkeypatch):
    k = bucket_kernel
    k.ok(CELL)
    k.magics.runner.settle()
    out = tmp_path / "published.db"
    k.ok(f"%stateful export --to {out}")
    forget_cache(k, tmp_path, monkeypatch, "cache-2")
    (port,) = free_ports(1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")  # no bucket reachable at all
    k.magics.blob_store = None
    ran = k.ok(f"%%stateful --db {out}\nimport numpy as np\n" + APPEND + "big = np.arange(500_000, dtype='float64')\nsmall = 7\n")
    assert counter(tmp_path / "side.log") == 1 and ran.banner
    assert np.array_equal(k.shell.user_ns["big"], np.arange(500_000, dtype="float64"))


def test_on_postgresql_the_server_keeps_the_records_and_the_bucket_the_bytes(bucket_kernel, s3_url, pg_url, tmp_path, monkeypatch):
    from pg_util import raw

    k = bucket_kernel
    cell = CELL.replace("%%stateful\n", f"%%stateful --db {pg_url}\n")
    k.ok(cell)
    k.magics.runner.settle()
    assert raw(pg_url, "SELECT count(*) FROM rssd_magic_blob WHERE size >= 1048576") == [(0,)]
    (text,) = raw(pg_url, "SELECT transition_result FROM orchestration_session_state WHERE to_state = 'EXECUTED'")[0]
    assert json.loads(text)["blob_store"] == s3_url and len(objects(s3_url)) == 1
    forget_cache(k, tmp_path, monkeypatch, "cache-2")
    k.magics.blob_store = None
    k.ok(cell)
    assert counter(tmp_path / "side.log") == 1
    assert np.array_equal(k.shell.user_ns["big"], np.arange(500_000, dtype="float64"))


def test_a_replay_the_local_cache_answers_makes_no_s3_client(bucket_kernel, tmp_path, monkeypatch):
    k = bucket_kernel
    k.ok(CELL)
    k.magics.runner.settle()
    k.restart()
    buckets._open.clear()
    (port,) = free_ports(1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")  # the bucket is out of reach
    k.ok(CELL)
    assert counter(tmp_path / "side.log") == 1
    assert np.array_equal(k.shell.user_ns["big"], np.arange(500_000, dtype="float64"))
    assert all(b._client is None for b in buckets._open.values()), "read from this machine's cache, no client made"


def test_a_teammate_who_may_only_read_the_bucket_replays_and_cannot_record(bucket_kernel, s3_url, s3_env, tmp_path, monkeypatch):
    """Read-only credentials (Read and List, no Write): records others made
    replay; a cell whose large values can't be stored shows its output, ends
    "could not record" in one line naming the bucket (no credential), and
    runs again next time."""
    k = bucket_kernel
    k.ok(CELL)  # recorded by someone who may write
    forget_cache(k, tmp_path, monkeypatch, "cache-reader")
    for name, value in s3_env.reader_env().items():
        monkeypatch.setenv(name, value)
    k.ok(CELL)
    assert counter(tmp_path / "side.log") == 1 and k.shell.user_ns["small"] == 7, "replayed with read access only"
    other = CELL.replace("small = 7", "small = 8")
    ran = k.ok(other)
    assert counter(tmp_path / "side.log") == 2
    k.magics.runner.settle()
    said = k.run("pass")
    text = ran.stdout + ran.stderr + said.stdout + said.stderr
    (line,) = [ln for ln in text.splitlines() if "could not be recorded" in ln]
    assert f"S3 {s3_url}: access denied" in line, line
    assert s3_env.reader[1] not in text and s3_env.secret not in text
    assert k.rows("SELECT count(*) FROM rssd_magic_claim WHERE state_id IS NOT NULL") == [(0,)], "claim released"
    k.ok(other)
    assert counter(tmp_path / "side.log") == 3, "not recorded: it runs again"


def test_bytes_planted_under_the_digest_in_the_bucket_are_replaced_not_trusted(bucket_kernel, s3_url, s3_env, tmp_path, monkeypatch):
    k = bucket_kernel
    value = np.arange(500_000, dtype="float64")
    digest = buffer_digest(value.view(np.uint8))
    where = S3Blobs(s3_url, cache=None).where
    s3_env.client().put_object(Bucket=where.bucket, Key=where.key(digest), Body=b"\0" * value.nbytes)  # planted first
    k.ok(CELL)
    forget_cache(k, tmp_path, monkeypatch, "cache-2")
    k.magics.blob_store = None
    k.ok(CELL)
    assert counter(tmp_path / "side.log") == 1
    assert np.array_equal(k.shell.user_ns["big"], value), "the record's bytes, not the planted ones"


def test_verify_repair_never_forgets_cells_because_the_bucket_is_out_of_reach(bucket_kernel, tmp_path, monkeypatch):
    k = bucket_kernel
    k.ok(CELL)
    k.magics.runner.settle()
    (port,) = free_ports(1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")  # an outage
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    buckets._open.clear()
    out = k.run("%stateful verify --repair")
    assert "1 not checked" in out.stdout and "nothing repaired" in out.stdout and "unreachable" in out.stdout, out.stdout
    assert "forgotten" not in out.stdout
    assert k.rows("SELECT to_state FROM orchestration_session_state WHERE session_entry_id IS NOT NULL ORDER BY rowid")[-1] == ("EXECUTED",)


HANG_AFTER_ONE_PART = (
    "import threading\n"
    "from rssd_magic.backends.objects import S3Blobs\n"
    "_real_part = S3Blobs._part\n"
    "def _one_then_hang(self, *args):\n"
    "    if getattr(self, '_sent', 0):\n"
    "        threading.Event().wait()\n"
    "    self._sent = 1\n"
    "    return _real_part(self, *args)\n"
    "S3Blobs._part = _one_then_hang\n"
)
# 48 MB: a multipart upload of three 16 MiB parts, written in the background.
KILLED = "%%stateful\nimport numpy as np\n" + APPEND + "big = np.arange(6_000_000, dtype='float64')\n"


@pytest.mark.kernel
def test_a_kernel_killed_mid_upload_is_taken_over_and_gc_aborts_what_it_left(s3_url, s3_env, tmp_path, monkeypatch):
    """A kernel SIGKILLed while its large value is being uploaded (one part
    sent, the rest hanging): nothing of it replays; another kernel takes
    the cell over and records it; gc aborts the upload the dead one left."""
    from shell_process import ShellProcess

    monkeypatch.setenv(buckets.ENV_BLOBS, s3_url)
    monkeypatch.setenv("RSSD_MAGIC_BLOB_CACHE", str(tmp_path / "blob-cache"))
    where = S3Blobs(s3_url, cache=None).where
    uploads = lambda: s3_env.client().list_multipart_uploads(Bucket=where.bucket).get("Uploads", [])  # noqa: E731
    victim = ShellProcess(tmp_path)
    try:
        victim.ok(HANG_AFTER_ONE_PART)
        victim.ok(KILLED)  # the cell returned; its upload hangs after one part
        deadline = time.monotonic() + 30
        while not uploads() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(uploads()) == 1, "a multipart upload was begun"
    finally:
        victim.kill()
    survivor = ShellProcess(tmp_path, lease_seconds=2)
    try:
        ran = survivor.ok(KILLED)
        assert "took over" in ran["stdout"], ran
        assert survivor.value("float(big[-1])") == 6_000_000 - 1
        survivor.ok("get_ipython().run_line_magic('stateful', 'list')")  # waits for its record to land
        swept = survivor.ok("%stateful gc --grace 0s")
        assert f"{s3_url}: freed 0 objects" in swept["stdout"], swept
    finally:
        survivor.close()
    assert counter(tmp_path / "side.log") == 2, "the killed kernel's run recorded nothing: it ran again"
    assert uploads() == [], "gc aborted the upload the killed kernel left"
    assert len(objects(s3_url)) == 1
