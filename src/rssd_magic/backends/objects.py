"""Blobs in object storage: content-addressed bytes in an S3-compatible bucket
(AWS S3, MinIO, SeaweedFS, Cloudflare R2), named ``s3://bucket/prefix``.

**Layout.**  A blob is the object ``<prefix>/<algorithm>/<first two hex
digits>/<hex>`` (``rssd/blake3/ab/abcdef…``): the prefix lists the blobs, the
two-digit level spreads them over 256 prefixes (S3 scales request rates per
prefix; a listing can be split).  Keys that don't parse as digests are never
read, listed or deleted; ``<key>.used`` is a blob's *use mark* (gc, below).

**Writes: the first writer wins** (:meth:`S3Blobs.put`).  A ``HEAD`` spares
uploading what is stored already; else the blob is written with
``If-None-Match: *``: one ``PutObject``, or from :data:`MULTIPART_MIN` bytes
a multipart upload of :data:`PART`-byte parts sent on :data:`WORKERS`
threads, its ``CompleteMultipartUpload`` the conditional step (a failed or
refused upload is aborted: no parts are left to be billed).  ``412``:
someone stored it first.  An object found there is never trusted for being
there: it is read back and hashed; wrong bytes are replaced (an
unconditional write) and read back again.  A write returns once S3 answered:
the object is durable, by S3's contract.  Each object and part carries a
CRC32 computed here (0.06 s per 200 MB; ``Content-MD5``: 0.27 s), so the
server refuses bytes damaged on the way; the payload is not signed (over
plain HTTP, SigV4 hashes every body: 0.29 s of CPU per 200 MB, not 0.08 s).

**Reads** (:meth:`S3Blobs.get`) take this machine's :class:`LocalCache` copy
when there is one (a digest names its bytes forever, so a copy can't go
stale; it is checked like any read, dropped when wrong).  Else the first
:data:`PART` bytes come with the object's size (``Content-Range``), refused
before anything is allocated when it is not the size expected or more than
this machine's memory; the other parts come as parallel ranged ``GET``s into
one buffer, hashed in order as they land (:class:`Verifier`); the blob is then
kept in the cache.  A missing object is ``KeyError``.

**Faults** are one :class:`StoreError` line naming the bucket URL, never a
credential or a signed URL (``S3 s3://team-blobs/rssd: access denied (check
the bucket policy: …)``, ``… no such bucket``, ``… unreachable at
http://host:9000 …``).  Requests time out (:data:`CONNECT_TIMEOUT`,
:data:`READ_TIMEOUT` per read) and are retried by botocore's ``standard`` mode
unless ``AWS_MAX_ATTEMPTS``/``AWS_RETRY_MODE`` or the profile say otherwise.

**Settings** are AWS's own, read by boto3: ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_PROFILE`` and ``~/.aws``'s
profiles (SSO, roles, ``endpoint_url``, ``addressing_style``), instance roles.

**What the bucket policy must allow** (for ``s3://bucket/prefix``)::

    s3:GetObject, s3:PutObject, s3:AbortMultipartUpload   on arn:aws:s3:::bucket/prefix/*
    s3:DeleteObject                                       on arn:aws:s3:::bucket/prefix/*   (gc)
    s3:ListBucket (condition s3:prefix = "prefix/*")      on arn:aws:s3:::bucket
    s3:ListBucketMultipartUploads                         on arn:aws:s3:::bucket            (gc)

``s3:PutObject`` covers multipart uploads and conditional writes.  Without
``s3:ListBucket`` S3 answers 403 for a missing object ("access denied", not
"gone").  Teammates who only replay need ``s3:GetObject`` and ``s3:ListBucket``.

**gc** is mark and sweep with a grace period: note the time *t*, list
(:meth:`S3Blobs.objects`: each blob's size and when it was last written or
proven), read the records' references, then ``delete(unreferenced,
unused_since=t - grace)``, which looks at each blob again right before
deleting it.  A writer that finds its blob stored writes its use mark, so a
blob a new record is about to name looks fresh.  Left: milliseconds between
that look and ``DeleteObjects``, which a lock in the state store closes
(shared while recording, exclusive while gc deletes, as in postgres_blobs).
:meth:`S3Blobs.abort_uploads` ends the uploads killed writers left.

**Why boto3**, and the figures: README "Large values", bench/bench_objects.py.
The client is made on first use: a replay the local cache answers needs no
boto3 at all (making one takes ~70 ms).
"""

from __future__ import annotations

import base64
import io
import re
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urlsplit

from ..records.digests import KNOWN, IntegrityError, Verifier
from ..store.base import Blob, StoreError
from ..store.blobcache import LocalCache
from ..store.blobs import buffer as _buffer

#: Bytes per multipart part and per ranged GET.
PART = 16 << 20
#: From this size up a blob is uploaded in parts (below: one PutObject).
MULTIPART_MIN = 32 << 20
#: Threads moving parts and ranges (connections kept open: a few more).
WORKERS = 4
#: Seconds to connect, and to wait for each read from the socket.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
#: Attempts per request (botocore's standard retries) unless AWS settings say.
ATTEMPTS = 4
#: Slices a response body is read in.
READ_STEP = 8 << 20
#: Tries at a write while others keep racing to store the same digest.
PUT_TRIES = 3
#: S3's limit on parts: they grow for values over PART * MAX_PARTS.
MAX_PARTS = 10_000
#: The suffix of a blob's use mark.
USED = ".used"
#: Blobs from this size up are kept in the local cache (store/blobcache.py).
CACHE_MIN = 1 << 20

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_HEX = re.compile(r"[0-9a-f]{16,128}")
_DENIED = "access denied (check the bucket policy: it must allow s3:GetObject, s3:PutObject, s3:ListBucket, s3:DeleteObject on {})"
#: What an error code says about the identity or the settings.
_AUTH = {
    "InvalidAccessKeyId": "the access key is not known to the server (check AWS_ACCESS_KEY_ID or the profile)",
    "SignatureDoesNotMatch": "the secret key does not match the access key (check AWS_SECRET_ACCESS_KEY or the profile)",
    "ExpiredToken": "the session token has expired (log in again: aws sso login, or renew AWS_SESSION_TOKEN)",
    "InvalidToken": "the session token is not valid (check AWS_SESSION_TOKEN or the profile)",
    "AuthorizationHeaderMalformed": "the request was signed for another region (set AWS_REGION to the bucket's)",
    "PermanentRedirect": "the bucket is in another region (set AWS_REGION to the bucket's)",
}


@dataclass(frozen=True)
class ObjectLocation:
    """Where blobs go: a bucket and a key prefix (``""`` or ``a/b``)."""

    bucket: str
    prefix: str = ""

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @classmethod
    def parse(cls, url: str) -> "ObjectLocation":
        """``s3://bucket/prefix``; StoreError, one line naming it, otherwise."""
        text = str(url).strip()
        parts = urlsplit(text)
        shown = text if "@" not in parts.netloc else f"s3://…@{parts.netloc.rpartition('@')[2]}{parts.path}"
        prefix = parts.path.strip("/")
        checks = [
            (parts.scheme.lower() != "s3", "not an s3:// URL"),
            ("@" in parts.netloc, "credentials don't go in the URL (use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"),
            ("?" in text or "#" in text, "no query or fragment is understood"),
            (not _BUCKET.fullmatch(parts.netloc) or ".." in parts.netloc, "not a bucket name (3-63 of a-z 0-9 . -)"),
            (prefix and {"", ".", ".."} & set(prefix.split("/")), "the prefix has an empty, '.' or '..' segment"),
            (len(prefix) > 512 or any(ord(c) < 32 or c in "\\\x7f" for c in prefix), "a prefix too long or with a control character"),
        ]  # fmt: skip
        for wrong, why in checks:
            if wrong:
                raise StoreError(f"S3 location {shown!r}: {why} (expected s3://bucket/prefix)")
        return cls(parts.netloc, prefix)

    def key(self, digest: str) -> str:
        """The object key of *digest* (ValueError when it is not ``algorithm:hex``)."""
        algo, _, hexd = str(digest).partition(":")
        if algo not in KNOWN or not _HEX.fullmatch(hexd):
            raise ValueError(f"not a blob digest: {str(digest)[:40]!r}")
        return f"{self.prefix}/{algo}/{hexd[:2]}/{hexd}".lstrip("/")

    def digest(self, key: str) -> str | None:
        """The digest an object key (or its use mark) names, else None."""
        if self.prefix:
            if not key.startswith(self.prefix + "/"):
                return None
            key = key[len(self.prefix) + 1 :]
        algo, _, tail = key.removesuffix(USED).partition("/")
        two, _, hexd = tail.partition("/")
        return f"{algo}:{hexd}" if algo in KNOWN and _HEX.fullmatch(hexd) and two == hexd[:2] else None

    @property
    def root(self) -> str:  # what every key of ours starts with
        return self.prefix + "/" if self.prefix else ""


def make_client(*, connect_timeout: float = CONNECT_TIMEOUT, read_timeout: float = READ_TIMEOUT,
                attempts: int = ATTEMPTS, pool: int = WORKERS + 4) -> Any:  # fmt: skip
    """An S3 client from the standard AWS settings (environment, profiles,
    roles; ``AWS_ENDPOINT_URL``), with our timeouts and retries."""
    import boto3
    import botocore.session
    from botocore.config import Config

    core = botocore.session.get_session()
    retries: dict[str, Any] = {}
    if core.get_config_variable("retry_mode") is None:
        retries["mode"] = "standard"
    if core.get_config_variable("max_attempts") is None:
        retries["total_max_attempts"] = attempts
    # Checksums are computed here (CRC32 per part, see above); botocore's
    # own would add a SHA-256 of every body over plain HTTP.
    config = Config(connect_timeout=connect_timeout, read_timeout=read_timeout, retries=retries or None,
                    max_pool_connections=pool, tcp_keepalive=True, s3={"payload_signing_enabled": False},
                    request_checksum_calculation="when_required", response_checksum_validation="when_required")  # fmt: skip
    return boto3.session.Session(botocore_session=core).client("s3", config=config)


class _ViewReader(io.RawIOBase):
    """A memoryview as a file (read, seek, tell, len: what botocore and
    urllib3 use), so a part of the caller's buffer is streamed, and rewound
    to be retried, without a copy of it."""

    def __init__(self, view: memoryview):
        self.view, self.pos = view, 0

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self.view.nbytes - self.pos))
        b[:n] = self.view[self.pos : self.pos + n]
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = (0, self.pos, self.view.nbytes)[whence] + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def __len__(self) -> int:
        return self.view.nbytes


class _Taken(Exception):
    """A conditional write found the key taken: someone stored it first."""


_DEFAULT: Any = object()


class S3Blobs:
    """The :class:`~rssd_magic.store.base.BlobStore` protocol on an S3-compatible
    bucket, plus :meth:`objects`, :meth:`abort_uploads` and :meth:`ping`.
    *cache*: a :class:`LocalCache` (default: ``$RSSD_MAGIC_BLOB_CACHE``'s) or
    None; *client*: a boto3 S3 client (default: :func:`make_client`, made on
    first use); *max_bytes*: the largest object of unknown size read (RAM)."""

    def __init__(self, location: ObjectLocation | str, *, client: Any = None, cache: Any = _DEFAULT,
                 part: int = PART, multipart_min: int = MULTIPART_MIN, workers: int = WORKERS,
                 max_bytes: int | None = None):  # fmt: skip
        import psutil

        self.where = location if isinstance(location, ObjectLocation) else ObjectLocation.parse(location)
        self.url, self._client, self._making = self.where.url, client, threading.Lock()
        self.cache = _default_cache() if cache is _DEFAULT else cache
        self.part, self.multipart_min, self.workers = part, multipart_min, workers
        self.max_bytes = psutil.virtual_memory().total if max_bytes is None else max_bytes
        # Its threads start on first use (and parts of one blob never wait
        # for another's: a task never submits one).
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="rssd-magic-s3")

    # -- plumbing ---------------------------------------------------------------

    @property
    def client(self) -> Any:
        with self._making:
            if self._client is None:
                try:
                    self._client = make_client(pool=self.workers + 4)
                except Exception as exc:  # noqa: BLE001 - a profile that isn't there, a bad setting: one line
                    raise self._fail(exc) from None
            return self._client

    def _fail(self, exc: BaseException, what: str = "") -> StoreError:
        """One line for an error of botocore's: never its message, which may
        quote a URL (and servers word theirs as they like)."""
        import botocore.exceptions as be

        code, status = _code(exc)
        at = _endpoint(self._client)
        if isinstance(exc, (be.NoCredentialsError, be.PartialCredentialsError)):
            why = "no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        elif isinstance(exc, (be.ConnectTimeoutError, be.ReadTimeoutError)):
            why = f"timed out talking to {at}"
        elif isinstance(exc, be.SSLError):
            why = f"TLS with {at} failed (its certificate?)"
        elif isinstance(exc, (be.EndpointConnectionError, be.ConnectionClosedError, be.ResponseStreamingError)):
            why = f"unreachable at {at} (connection refused or lost)"
        elif isinstance(exc, (be.ProfileNotFound, be.InvalidConfigError, be.InvalidRegionError)):
            why = f"the AWS settings can't be used ({type(exc).__name__})"
        elif code == "NoSuchBucket" or (code in ("404", "NotFound") and what == "bucket"):
            why = "no such bucket"
        elif code in _AUTH or status == 301:
            why = _AUTH.get(code, _AUTH["PermanentRedirect"])
        elif code in ("AccessDenied", "AllAccessDisabled") or status == 403:
            why = _DENIED.format(f"arn:aws:s3:::{self.where.bucket}/{self.where.root}*")
        elif code or status:
            why = f"the server refused {what or 'a request'}: {code or 'HTTP'} {status or ''}".rstrip()
        else:
            why = f"{type(exc).__name__} while talking to {at}"
        return StoreError(f"S3 {self.url}: {why}")

    def _call(self, op: str, what: str = "", **kw: Any) -> Any:
        """One request; a missing object is KeyError, a conditional write
        refused is _Taken, anything else that fails a StoreError."""
        try:
            return getattr(self.client, op)(Bucket=self.where.bucket, **kw)
        except Exception as exc:  # noqa: BLE001 - everything becomes one line
            code, status = _code(exc)
            if code in ("NoSuchKey", "NoSuchUpload") or (status == 404 and code in ("404", "NotFound") and what != "bucket"):
                raise KeyError(kw.get("Key", "")) from None
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):  # 409: AWS, racing writers
                raise _Taken() from None
            if code == "InvalidRange":
                raise  # the first range of an empty object: _fetch asks again
            if status == 403 and op.startswith("head_"):
                exc = self._why_forbidden(exc, kw.get("Key"))
            raise self._fail(exc, what) from None

    def _why_forbidden(self, exc: Exception, key: str | None) -> Exception:
        """Why a HEAD got 403 (it has no body to say): a listing says."""
        try:
            self.client.list_objects_v2(Bucket=self.where.bucket, Prefix=key or self.where.root, MaxKeys=1)
        except Exception as better:  # noqa: BLE001
            return better if _code(better)[0] else exc
        return exc

    def _read(self, read: Callable[..., Any], *args: Any) -> Any:
        """A read from a response body; a dropped or timed-out stream is one line."""
        try:
            return read(*args)
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc) from None

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def ping(self) -> None:
        """StoreError unless the bucket is there and ours to read (for a store that opens)."""
        self._call("head_bucket", "bucket")

    # -- reading ---------------------------------------------------------------

    def get(self, digest: str, size: int | None = None) -> Any:
        """The blob as one writable buffer, checked against *digest* while it
        is read; KeyError when no object holds it.  *size*, when the caller
        knows it, must be the object's size (checked before allocating)."""
        try:
            key = self.where.key(digest)
        except ValueError:
            raise KeyError(digest) from None
        if self.cache is not None:
            out = self._cached(digest, size)
            if out is not None:
                return out
        out = self._fetch(key, digest, size)
        if self.cache is not None and len(out) >= CACHE_MIN:
            self.cache.write(digest, out)
        return out

    def _cached(self, digest: str, size: int | None) -> Any:
        """The cache's checked copy, or None.  Its size is the file's: the
        cache opens only regular files of this user, and hashes them."""
        try:
            found = self.cache.path(digest).lstat().st_size  # a digest get() took: a path
        except OSError:
            return None
        return self.cache.read(digest, found) if size in (None, found) else None

    def _fetch(self, key: str, digest: str, size: int | None) -> Any:
        """Read an object into one buffer: the first part tells the size, the
        others come in parallel, and all are hashed in order as they land."""
        try:
            first = self._call("get_object", Key=key, Range=f"bytes=0-{self.part - 1}")
        except Exception as exc:  # noqa: BLE001 - InvalidRange: an empty object
            if _code(exc)[0] != "InvalidRange":
                raise
            first = self._call("get_object", Key=key)
        body = first["Body"]
        found = re.fullmatch(r"bytes \d+-\d+/(\d+)", str(first.get("ContentRange", "")).strip())
        total = int(found.group(1)) if found else int(first.get("ContentLength", 0))
        why = (f"has {total} bytes, {size} expected" if size is not None and total != size
               else f"claims {total} bytes, more than this machine has" if total > self.max_bytes else None)  # fmt: skip
        if why:  # refused before a buffer of what the server claims is made
            body.close()
            raise IntegrityError(f"blob {digest[:24]}…: its object in {self.url} {why}")
        out = _buffer(total)
        view = memoryview(out)
        verifier = Verifier(digest)
        head = min(total, self.part) if found else total  # a server that ignores Range sends it all
        ranges = [(a, min(total, a + self.part)) for a in range(head, total, self.part)]
        futures = [self.pool.submit(self._range, key, digest, view[a:b], a) for a, b in ranges]
        try:
            self._fill(body, view[:head], int(first.get("ContentLength", head)), digest)
            verifier.update(view[:head])
            for (a, b), future in zip(ranges, futures):
                future.result()
                verifier.update(view[a:b])
        except BaseException:
            _settle(futures)  # no worker may still write into the buffer
            raise
        finally:
            body.close()
        verifier.check()
        view.release()
        return out

    def _range(self, key: str, digest: str, view: memoryview, start: int) -> None:
        got = self._call("get_object", Key=key, Range=f"bytes={start}-{start + view.nbytes - 1}")
        with got["Body"] as body:
            self._fill(body, view, int(got.get("ContentLength", -1)), digest)

    def _fill(self, body: Any, view: memoryview, length: int, digest: str) -> None:
        """Fill *view* from a response of *length* bytes; IntegrityError when
        the object is not as long as its ranges said (changed meanwhile)."""
        at = 0
        while length == view.nbytes and at < view.nbytes:
            n = self._read(body.readinto, view[at : at + READ_STEP])
            if not n:
                break
            at += n
        if at != view.nbytes:
            raise IntegrityError(f"blob {digest[:24]}…: its object in {self.url} changed while read ({at} of {view.nbytes} bytes)")

    def check(self, digest: str, size: int | None = None) -> str | None:
        """None when the bucket holds an object under *digest* with that
        digest (read back and hashed as it streams: never from the cache,
        never allocated whole); else why not, in a few words."""
        try:
            got = self._call("get_object", Key=self.where.key(digest))
        except ValueError:
            return "not a blob digest"
        except KeyError:
            return "missing"
        length, verifier, at = int(got.get("ContentLength", -1)), Verifier(digest), 0
        with got["Body"] as body:
            if size is not None and length != size:
                return f"its object has {length} bytes, {size} expected"
            for piece in iter(lambda: self._read(body.read, READ_STEP), b""):
                verifier.update(piece)  # bytes, immutable: hashed on the verifier's thread
                at += len(piece)
        if at != length:
            return f"its object ended after {at} of {length} bytes"
        try:
            verifier.check()
        except IntegrityError:
            return "its stored bytes do not match its digest"
        return None

    # -- writing ---------------------------------------------------------------

    def put_many(self, blobs: Iterable[Blob]) -> None:
        """Store blobs (each as :meth:`put` does)."""
        for digest, data in blobs:
            self.put(digest, data)

    def put(self, digest: str, data: Any) -> bool:
        """Store one blob; True when its bytes were written, False when the
        object there was proven to hold them (its use mark is then written,
        for gc).  Returns once the object is durable."""
        key = self.where.key(digest)
        view = memoryview(data)
        view = (view if view.c_contiguous else memoryview(view.tobytes())).cast("B")
        for _ in range(PUT_TRIES):
            try:
                self._call("head_object", Key=key)
            except KeyError:
                try:
                    self._upload(key, view, conditional=True)
                    return True
                except _Taken:
                    continue  # stored first by someone else: proven on the next turn
            if self.check(digest, view.nbytes) is None:
                self._call("put_object", Key=key + USED, Body=b"")
                return False
            self._upload(key, view, conditional=False)  # wrong bytes under the digest: replaced
            why = self.check(digest, view.nbytes)
            if why is not None:
                raise IntegrityError(f"blob {digest[:24]}…: rewritten in {self.url}, it still reads back wrong ({why})")
            return True
        raise StoreError(f"S3 {self.url}: blob {digest[:24]}… is being rewritten by others; try again")

    def _upload(self, key: str, view: memoryview, conditional: bool) -> None:
        cond = {"IfNoneMatch": "*"} if conditional else {}
        if view.nbytes < self.multipart_min:
            self._call("put_object", Key=key, Body=_ViewReader(view), ChecksumCRC32=_crc32(view), **cond)
            return
        part = max(self.part, -(-view.nbytes // MAX_PARTS))
        upload = self._call("create_multipart_upload", Key=key, ChecksumAlgorithm="CRC32")["UploadId"]
        futures: list[Future] = []
        try:
            for n, a in enumerate(range(0, view.nbytes, part), 1):
                futures.append(self.pool.submit(self._part, key, upload, n, view[a : a + part]))
            parts = [f.result() for f in futures]
            self._call("complete_multipart_upload", Key=key, UploadId=upload, MultipartUpload={"Parts": parts}, **cond)
        except BaseException:
            _settle(futures)  # aborted with parts in flight, an upload may keep them
            with suppress(StoreError, KeyError):  # the caller hears what failed first
                self._call("abort_multipart_upload", Key=key, UploadId=upload)
            raise

    def _part(self, key: str, upload: str, n: int, view: memoryview) -> dict:
        crc = _crc32(view)
        got = self._call("upload_part", Key=key, UploadId=upload, PartNumber=n, Body=_ViewReader(view), ChecksumCRC32=crc)
        return {"PartNumber": n, "ETag": got["ETag"], "ChecksumCRC32": crc}

    # -- listing and gc -----------------------------------------------------------

    def objects(self) -> dict[str, tuple[int, datetime]]:
        """``{digest: (size, when last written or proven, UTC)}`` of every
        blob under the prefix, in one listing (keys that aren't blobs left out)."""
        sizes: dict[str, int] = {}
        times: dict[str, datetime] = {}
        for key, size, when in self._list(self.where.root):
            digest = self.where.digest(key)
            if digest is not None:
                if not key.endswith(USED):
                    sizes[digest] = size
                times[digest] = max(times.get(digest, when), when)
        return {d: (s, times[d]) for d, s in sizes.items()}

    def sizes(self) -> dict[str, int]:
        return {d: s for d, (s, _) in self.objects().items()}

    def _list(self, prefix: str) -> Iterator[tuple[str, int, datetime]]:
        more: dict[str, str] = {}
        while True:
            page = self._call("list_objects_v2", "the listing", Prefix=prefix, **more)
            for item in page.get("Contents", ()):
                yield item["Key"], int(item["Size"]), _utc(item["LastModified"])
            if not page.get("IsTruncated"):
                return
            more = {"ContinuationToken": page["NextContinuationToken"]}

    def delete(self, digests: Iterable[str], *, unused_since: datetime | None = None) -> int:
        """Delete blobs and their use marks; returns how many existed.  With
        *unused_since*, a blob written or proven at or after that time is
        kept: each is looked at again right before it is deleted."""
        keys = []
        for digest in dict.fromkeys(digests):
            with suppress(ValueError):  # not a digest: names no object of ours
                keys.append(self.where.key(digest))

        def look(key: str) -> tuple[bool, list[str]]:
            found = {k: when for k, _, when in self._list(key) if k in (key, key + USED)}
            if key in found and unused_since is not None and max(found.values()) >= unused_since:
                return False, []
            return key in found, list(found)

        existed, doomed = 0, []
        for there, found in self.pool.map(look, keys):
            existed, doomed = existed + there, doomed + found
        for i in range(0, len(doomed), 1000):  # DeleteObjects takes 1000 keys at most
            batch = {"Objects": [{"Key": k} for k in doomed[i : i + 1000]], "Quiet": True}
            failed = self._call("delete_objects", "a delete", Delete=batch).get("Errors")
            if failed:
                raise StoreError(f"S3 {self.url}: {len(failed)} objects could not be deleted ({failed[0].get('Code')})")
        return existed

    def abort_uploads(self, initiated_before: datetime) -> int:
        """Abort the multipart uploads of blobs begun before that time (what
        killed writers left); returns how many."""
        aborted, more = 0, {}
        while True:
            page = self._call("list_multipart_uploads", "the upload listing", Prefix=self.where.root, **more)
            for up in page.get("Uploads", ()):
                if _utc(up["Initiated"]) < initiated_before and self.where.digest(up["Key"]):
                    with suppress(KeyError):  # completed or aborted meanwhile
                        self._call("abort_multipart_upload", Key=up["Key"], UploadId=up["UploadId"])
                        aborted += 1
            if not page.get("IsTruncated"):
                return aborted
            more = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}


def _code(exc: BaseException) -> tuple[str, int]:
    """A ClientError's code and HTTP status (``""``, 0 for other errors)."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")), int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _endpoint(client: Any) -> str:
    """``scheme://host:port`` of the client's endpoint: nothing else of the URL."""
    parts = urlsplit(str(getattr(getattr(client, "meta", None), "endpoint_url", "") or ""))
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def _crc32(view: memoryview) -> str:
    return base64.b64encode(zlib.crc32(view).to_bytes(4, "big")).decode()


def _utc(when: datetime) -> datetime:
    return when.astimezone(timezone.utc) if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _settle(futures: list[Future]) -> None:
    """Cancel what has not started, wait for what has (the caller hears the
    error that came first, not theirs)."""
    wait([f for f in futures if not f.cancel()])


def _default_cache() -> Any:
    return LocalCache.from_env()
