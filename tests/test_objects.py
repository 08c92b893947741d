"""Blobs in an S3 bucket (backends/objects.py), against a real SeaweedFS
started by the tests (s3_util.py): round trips, first writer wins, stored
bytes proven and repaired, sizes refused before allocating, the local cache,
faults as one line naming the bucket, no multipart upload left behind, the
listing gc works from."""

from __future__ import annotations

import os
import secrets
import socket
import threading
from datetime import datetime, timedelta, timezone

import pytest

from rssd_magic.backends import objects
from rssd_magic.store.base import StoreError
from rssd_magic.backends.objects import ObjectLocation, S3Blobs, make_client
from rssd_magic.store.blobcache import LocalCache
from rssd_magic.records.digests import IntegrityError, buffer_digest
from s3_util import Weed, free_ports, s3_env, s3_url, weed_server  # noqa: F401 - fixtures

MiB = 1 << 20
#: Small parts (S3's least is 5 MiB) so multipart and ranged reads are
#: exercised on values that move quickly.
SMALL = {"part": 5 * MiB, "multipart_min": 10 * MiB}


def blob(n: int) -> tuple[str, bytes]:
    data = secrets.token_bytes(n)
    return buffer_digest(data), data


def rotten(data: bytes) -> bytes:
    """*data* with its last byte changed (a fixed byte would be the same
    one time in 256, and the test would pass or fail by chance)."""
    return data[:-1] + bytes([data[-1] ^ 0xFF])


@pytest.fixture
def cache(tmp_path) -> LocalCache:
    return LocalCache(tmp_path / "cache")


@pytest.fixture
def store(s3_url, cache):
    s = S3Blobs(s3_url, cache=cache, **SMALL)
    yield s
    s.close()


@pytest.fixture
def raw(s3_env):
    """The admin's own client, to look behind the store's back."""
    return s3_env.client()


def one_line(exc: BaseException, url: str, *secrets_: str) -> str:
    text = str(exc)
    assert "\n" not in text and text.startswith(f"S3 {url}: "), text
    for secret in secrets_:
        assert secret not in text
    return text


def uploads(raw, bucket: str) -> list:
    return raw.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


# -- where blobs go ------------------------------------------------------------------


def test_locations_parse_and_name_keys_that_list_well():
    assert ObjectLocation.parse("s3://team-blobs/rssd/") == ObjectLocation("team-blobs", "rssd")
    assert ObjectLocation.parse("s3://team-blobs").url == "s3://team-blobs"
    where = ObjectLocation.parse("s3://team-blobs/a/b")
    digest = "blake3:" + "ab" + "cd" * 31
    assert where.key(digest) == f"a/b/blake3/ab/ab{'cd' * 31}"
    assert where.digest(where.key(digest)) == digest
    assert where.digest(where.key(digest) + ".used") == digest
    for foreign in ("a/b/notes.txt", "a/bx/blake3/ab/ab" + "cd" * 31, "a/b/blake3/ff/ab" + "cd" * 31, "a/b/md5/ab/abcd"):
        assert where.digest(foreign) is None
    with pytest.raises(ValueError):
        where.key("blake3:../../etc")
    for bad in ("https://team-blobs/rssd", "s3://Team_Blobs/x", "s3://b/x", "s3://team-blobs/a//b",
                "s3://team-blobs/../x", "s3://team-blobs/x?profile=p", "s3:///rssd"):  # fmt: skip
        with pytest.raises(StoreError) as caught:
            ObjectLocation.parse(bad)
        assert "\n" not in str(caught.value) and repr(bad) in str(caught.value)
    with pytest.raises(StoreError) as caught:
        ObjectLocation.parse("s3://AKIAKEY:hunter2secret@team-blobs/rssd")
    assert "hunter2secret" not in str(caught.value) and "AKIAKEY" not in str(caught.value)


# -- round trips -------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 100_000, 23 * MiB + 17])
def test_round_trip(store, raw, size):
    digest, data = blob(size)
    ranges = []
    store.client.meta.events.register("before-parameter-build.s3.GetObject", lambda params, **_: ranges.append(params.get("Range")))
    assert store.put(digest, data) is True
    out = store.get(digest)
    ranged = list(ranges)
    assert bytes(out) == data
    memoryview(out)[:1] = b"x" if size else b""  # a writable buffer: arrays built on it are writable
    assert store.check(digest) is None
    etag = raw.head_object(Bucket=store.where.bucket, Key=store.where.key(digest))["ETag"]
    if size > SMALL["multipart_min"]:
        assert etag.strip('"').endswith("-5"), etag  # five parts, put up concurrently
        assert len(set(ranged)) == 5 and None not in ranged  # read as five ranged GETs
    else:
        assert "-" not in etag


def test_put_accepts_any_contiguous_buffer(store):
    np = pytest.importorskip("numpy")
    array = np.arange(3 * MiB, dtype="float64")
    digest = buffer_digest(memoryview(array).cast("B"))
    assert store.put(digest, array)
    assert bytes(store.get(digest)) == array.tobytes()


def test_a_missing_object_is_a_key_error(store):
    digest, _ = blob(10)
    with pytest.raises(KeyError):
        store.get(digest)
    with pytest.raises(KeyError):
        store.get("not-a-digest")
    assert store.check(digest) == "missing"


# -- first writer wins; stored bytes are proven, never trusted ---------------------------


@pytest.mark.parametrize("size", [1 * MiB, 12 * MiB])
def test_racing_writers_store_one_object_and_both_succeed(s3_url, raw, size):
    digest, data = blob(size)
    writers = [S3Blobs(s3_url, cache=None, **SMALL) for _ in range(2)]
    start = threading.Barrier(2)
    results: list = []

    def write(s: S3Blobs) -> None:
        start.wait()
        results.append(s.put(digest, data))

    threads = [threading.Thread(target=write, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [False, True]  # one wrote it, the other proved it was there
    bucket = writers[0].where.bucket
    keys = [o["Key"] for o in raw.list_objects_v2(Bucket=bucket)["Contents"] if not o["Key"].endswith(".used")]
    assert keys == [writers[0].where.key(digest)]
    assert writers[1].check(digest) is None and uploads(raw, bucket) == []


@pytest.mark.parametrize("size", [1 * MiB, 12 * MiB])
@pytest.mark.parametrize("planted", ["same", "wrong"])
def test_a_write_refused_as_taken_proves_or_replaces_what_is_there(store, raw, monkeypatch, size, planted):
    """Someone stores the digest between our look and our write: the
    conditional write (one PutObject, or the Complete of a multipart upload)
    is refused, what is there is read back and hashed, and replaced if wrong."""
    digest, data = blob(size)
    key = store.where.key(digest)
    raw.put_object(Bucket=store.where.bucket, Key=key, Body=data if planted == "same" else rotten(data))
    real = store._call
    looks = []

    def blind_once(op, *a, **kw):
        if op == "head_object" and not looks:
            looks.append(op)
            raise KeyError(key)  # our look saw nothing: the write is what finds it taken
        return real(op, *a, **kw)

    monkeypatch.setattr(store, "_call", blind_once)
    assert store.put(digest, data) is (planted == "wrong")
    assert store.check(digest) is None and bytes(store.get(digest)) == data
    assert uploads(raw, store.where.bucket) == []  # a refused multipart upload is aborted


def test_wrong_bytes_under_a_digest_are_detected_and_replaced(store, raw):
    digest, data = blob(3 * MiB)
    raw.put_object(Bucket=store.where.bucket, Key=store.where.key(digest), Body=data[::-1])
    assert store.check(digest) == "its stored bytes do not match its digest"
    with pytest.raises(IntegrityError):
        store.get(digest)
    assert store.put(digest, data) is True
    assert store.check(digest) is None and bytes(store.get(digest)) == data


def test_bytes_that_are_not_their_digest_never_replace_a_good_object(store, raw):
    digest, data = blob(2 * MiB)
    store.put(digest, data)
    assert store.put(digest, rotten(data)) is False  # what is stored is judged by the digest
    assert bytes(store.get(digest)) == data
    raw.put_object(Bucket=store.where.bucket, Key=store.where.key(digest), Body=data[::-1])
    with pytest.raises(IntegrityError, match="still reads back wrong"):
        store.put(digest, rotten(data))  # rewritten, read back, and found wrong again


@pytest.mark.parametrize("planted", ["truncated", "oversized"])
def test_a_size_that_lies_is_refused_before_allocating(store, raw, monkeypatch, planted):
    digest, data = blob(6 * MiB)
    body = data[: 4 * MiB] if planted == "truncated" else data + b"\0" * MiB
    raw.put_object(Bucket=store.where.bucket, Key=store.where.key(digest), Body=body)
    allocated = []
    monkeypatch.setattr(objects, "_buffer", lambda n: allocated.append(n) or bytearray(n))
    with pytest.raises(IntegrityError, match=f"has {len(body)} bytes, {len(data)} expected"):
        store.get(digest, size=len(data))
    store.max_bytes = len(body) - 1  # no size known: more than this machine has is refused too
    with pytest.raises(IntegrityError, match="more than this machine has"):
        store.get(digest)
    assert allocated == []
    assert store.check(digest, size=len(data)) == f"its object has {len(body)} bytes, {len(data)} expected"


# -- the local cache ---------------------------------------------------------------


def test_reads_go_through_the_cache_and_a_rotten_copy_is_dropped(store, raw, cache):
    digest, data = blob(2 * MiB)
    store.put(digest, data)
    assert not cache.path(digest).exists()
    assert bytes(store.get(digest)) == data  # from the bucket, then kept here
    assert cache.path(digest).read_bytes() == data
    key = store.where.key(digest)
    raw.delete_object(Bucket=store.where.bucket, Key=key)
    assert bytes(store.get(digest)) == data  # the bucket was not asked
    assert store.check(digest) == "missing"  # check never takes the cache's word
    cache.path(digest).write_bytes(rotten(data))
    with pytest.raises(KeyError):
        store.get(digest)  # the rotten copy was not served…
    assert not cache.path(digest).exists()  # …and is gone
    raw.put_object(Bucket=store.where.bucket, Key=key, Body=data)
    assert bytes(store.get(digest)) == data and cache.path(digest).read_bytes() == data


# -- faults: one line naming the bucket, no secret ------------------------------------------


def test_wrong_credentials_are_one_line(s3_url, s3_env, monkeypatch):
    digest, data = blob(10)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + s3_env.secret[:8])
    with pytest.raises(StoreError) as caught:
        S3Blobs(s3_url, cache=None).get(digest)
    assert "secret key does not match" in one_line(caught.value, s3_url, s3_env.secret, "wrong-")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(StoreError) as caught:
        S3Blobs(s3_url, cache=None).put(digest, data)
    assert "access key is not known" in one_line(caught.value, s3_url, s3_env.secret)


def test_access_denied_names_what_the_policy_must_allow(s3_url, s3_env, raw, monkeypatch):
    digest, data = blob(10)
    for name, value in s3_env.reader_env().items():
        monkeypatch.setenv(name, value)
    reader = S3Blobs(s3_url, cache=None)
    reader.ping()  # may look
    with pytest.raises(StoreError) as caught:
        reader.put(digest, data)
    text = one_line(caught.value, s3_url, s3_env.reader[1], s3_env.secret)
    assert "access denied" in text and "s3:PutObject" in text and f"arn:aws:s3:::{reader.where.bucket}/rssd/*" in text


def test_a_bucket_that_does_not_exist_is_one_line(s3_env):
    url = "s3://no-such-bucket-" + secrets.token_hex(4) + "/rssd"
    digest, data = blob(10)
    s = S3Blobs(url, cache=None)
    for call in (s.ping, lambda: s.get(digest), lambda: s.put(digest, data), s.objects):
        with pytest.raises(StoreError) as caught:
            call()
        assert "no such bucket" in one_line(caught.value, url, s3_env.secret)


def test_a_closed_port_is_one_line(s3_env, monkeypatch):
    (port,) = free_ports(1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    s = S3Blobs("s3://team-blobs/rssd", cache=None, client=make_client(attempts=2, connect_timeout=1))
    with pytest.raises(StoreError) as caught:
        s.get(blob(10)[0])
    assert f"unreachable at http://127.0.0.1:{port}" in one_line(caught.value, "s3://team-blobs/rssd", s3_env.secret)


def test_a_server_that_never_answers_times_out_in_one_line(s3_env, monkeypatch):
    silent = socket.create_server(("127.0.0.1", 0))  # connections are queued, never answered
    try:
        port = silent.getsockname()[1]
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        s = S3Blobs("s3://team-blobs/rssd", cache=None, client=make_client(attempts=1, read_timeout=0.5))
        with pytest.raises(StoreError) as caught:
            s.put(*blob(10))
        assert f"timed out talking to http://127.0.0.1:{port}" in one_line(caught.value, "s3://team-blobs/rssd", s3_env.secret)
    finally:
        silent.close()


def test_a_server_that_stops_is_one_line(weed_server, monkeypatch):
    """A server of its own, stopped while the store holds open connections."""
    own = Weed()
    try:
        for name, value in own.env().items():
            monkeypatch.setenv(name, value)
        url = f"s3://{own.new_bucket()}/rssd"
        s = S3Blobs(url, cache=None, client=make_client(attempts=2, connect_timeout=1, read_timeout=5))
        digest, data = blob(100)
        s.put(digest, data)
        own.stop()
        for call in (lambda: s.get(digest), lambda: s.put(*blob(100)), s.sizes):
            with pytest.raises(StoreError) as caught:
                call()
            assert "unreachable at http://127.0.0.1" in one_line(caught.value, url, own.secret)
    finally:
        own.stop()


def test_a_failed_multipart_put_leaves_no_upload(store, raw):
    digest, data = blob(23 * MiB)

    def fail_third_part(params, **_):
        if params.get("PartNumber") == 3:
            raise ConnectionError("network gone")

    store.client.meta.events.register("before-parameter-build.s3.UploadPart", fail_third_part)
    with pytest.raises(StoreError) as caught:
        store.put(digest, data)
    one_line(caught.value, store.url)
    assert uploads(raw, store.where.bucket) == []
    assert store.check(digest) == "missing"


# -- what gc works from ---------------------------------------------------------------


def test_objects_lists_sizes_and_times_and_delete_keeps_what_was_used(store, raw):
    (d1, b1), (d2, b2) = blob(2 * MiB), blob(300)
    store.put(d1, b1)
    store.put(d2, b2)
    raw.put_object(Bucket=store.where.bucket, Key="rssd/notes.txt", Body=b"not a blob")
    raw.put_object(Bucket=store.where.bucket, Key="elsewhere/blake3/ab/" + "ab" * 32, Body=b"not ours")
    listed = store.objects()
    assert set(listed) == {d1, d2} and store.sizes() == {d1: len(b1), d2: len(b2)}
    for digest, (size, when) in listed.items():
        head = raw.head_object(Bucket=store.where.bucket, Key=store.where.key(digest))
        assert when == head["LastModified"].astimezone(timezone.utc) and when.tzinfo is not None
    assert store.put(d2, b2) is False  # proven again: its use mark is written
    mark = raw.head_object(Bucket=store.where.bucket, Key=store.where.key(d2) + ".used")["LastModified"]
    assert store.objects()[d2][1] == max(mark.astimezone(timezone.utc), listed[d2][1])
    long_ago = datetime.now(timezone.utc) - timedelta(days=1)
    assert store.delete([d1, d2], unused_since=long_ago) == 0  # both written since: kept
    assert store.delete([d2, "blake3:" + "00" * 32, "junk"]) == 1
    assert set(store.objects()) == {d1}
    keys = {o["Key"] for o in raw.list_objects_v2(Bucket=store.where.bucket)["Contents"]}
    assert store.where.key(d2) + ".used" not in keys and {"rssd/notes.txt", "elsewhere/blake3/ab/" + "ab" * 32} <= keys
    assert store.delete([d2]) == 0


def test_abort_uploads_ends_what_a_killed_writer_left(store, raw):
    digest, _ = blob(10)
    raw.create_multipart_upload(Bucket=store.where.bucket, Key=store.where.key(digest))
    raw.create_multipart_upload(Bucket=store.where.bucket, Key="rssd/not-a-blob")
    assert store.abort_uploads(datetime.now(timezone.utc) - timedelta(hours=1)) == 0  # too recent
    assert store.abort_uploads(datetime.now(timezone.utc) + timedelta(minutes=1)) == 1
    assert [u["Key"] for u in uploads(raw, store.where.bucket)] == ["rssd/not-a-blob"]


def test_settings_come_from_the_environment_not_the_users_files(s3_env, monkeypatch, tmp_path):
    """AWS_ENDPOINT_URL and the key pair in the environment are what the
    client uses; a profile named in AWS_PROFILE is read from AWS_CONFIG_FILE."""
    assert os.environ["AWS_CONFIG_FILE"] == os.environ["AWS_SHARED_CREDENTIALS_FILE"] == os.devnull
    client = make_client()
    assert client.meta.endpoint_url == s3_env.endpoint
    config = tmp_path / "config"
    config.write_text(f"[profile team]\nendpoint_url = {s3_env.endpoint}\nregion = us-east-1\n")
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[team]\naws_access_key_id = {s3_env.key}\naws_secret_access_key = {s3_env.secret}\n")
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_PROFILE", "team")
    s = S3Blobs(f"s3://{s3_env.new_bucket()}/rssd", cache=None)
    digest, data = blob(100)
    assert s.put(digest, data) and bytes(s.get(digest)) == data
    monkeypatch.setenv("AWS_PROFILE", "nobody")
    with pytest.raises(StoreError) as caught:
        S3Blobs("s3://team-blobs/rssd", cache=None).ping()  # the client is made on first use
    one_line(caught.value, "s3://team-blobs/rssd")
