"""Knowing that a stored payload is one we (or someone we trust) wrote.

An RSSD is a file people share, commit and merge; unpickling a value from it
runs code chosen by whoever wrote it.  Like Jupyter's notebook trust, every
payload we store is signed with an HMAC keyed by a per-user secret that lives
outside the RSSD, and nothing is unpickled unless the signature checks out.

The chain, from what is signed to the bytes read back:

* a **payload** is a JSON spec (a pickled name, a SQL result table) that names
  its blobs by digest; its id is the SHA-256 of the spec's canonical JSON;
* the HMAC-SHA256 of that id under the user's key is stored in our table
  ``rssd_magic_signature`` (one row per payload and key, so a teammate's
  ``trust`` adds a row and never rewrites ours);
* every blob is checked against its digest when read: pickle streams (which
  decide what code runs) by SHA-256; large raw buffers (numpy data, which is
  never executed) by XXH3-128, fast enough to check 200 MB in ~20 ms.

The secret: ``StatefulMagics.secret`` / ``$RSSD_MAGIC_SECRET`` (a team key), or
a random key created on first use in the Jupyter data directory, mode 0600.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

import xxhash

ENV_SECRET = "RSSD_MAGIC_SECRET"


class IntegrityError(Exception):
    """A blob's bytes don't match the digest its payload names."""


def stream_digest(data: Any) -> str:
    """Digest of a pickle stream or any blob whose bytes get interpreted."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def buffer_digest(data: Any) -> str:
    """Digest of raw data (out-of-band pickle buffers): fast, 128-bit."""
    return "xxh3-128:" + xxhash.xxh3_128_hexdigest(data)


class Verifier:
    """Checks bytes against a digest as they are read, chunk by chunk (one
    pass over a large blob instead of a second one after reading it)."""

    def __init__(self, digest: str):
        self.digest = digest
        algo = digest.partition(":")[0]
        if algo == "sha256":
            self._hash = hashlib.sha256()
        elif algo == "xxh3-128":
            self._hash = xxhash.xxh3_128()
        else:
            raise IntegrityError(f"blob {digest[:24]}…: unknown digest algorithm {algo!r}")
        self._prefix = algo + ":"

    def update(self, data: Any) -> None:
        self._hash.update(data)

    def check(self) -> None:
        """Raise IntegrityError unless what was read has the digest."""
        if not hmac.compare_digest(self._prefix + self._hash.hexdigest(), self.digest):
            raise IntegrityError(
                f"blob {self.digest[:24]}… does not match its digest (changed after it was written)"
            )


def verify(digest: str, data: Any) -> None:
    """Raise IntegrityError unless *data* has *digest*."""
    verifier = Verifier(digest)
    verifier.update(data)
    verifier.check()


def payload_id(spec: dict) -> str:
    """Stable id of a payload spec: what a signature is about."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def default_secret_path() -> Path:
    from jupyter_core.paths import jupyter_data_dir

    return Path(jupyter_data_dir()) / "rssd_magic" / "secret"


class Signer:
    """Signs and checks payload ids with one secret."""

    def __init__(self, secret: bytes):
        self._secret = secret
        # Which key signed a row, without revealing the key.
        self.key_id = hashlib.sha256(b"rssd_magic key id\0" + secret).hexdigest()[:16]

    @classmethod
    def load(cls, configured: str | None = None, path: Path | None = None) -> "Signer":
        """The configured team key, ``$RSSD_MAGIC_SECRET``, or the per-user
        key file (created on first use, readable by its owner only)."""
        team = configured or os.environ.get(ENV_SECRET)
        if team:
            return cls(team.encode("utf-8"))
        path = path or default_secret_path()
        try:
            return cls(path.read_bytes().strip())
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(32).encode("ascii")
        # O_EXCL: two kernels starting at once must not each write a key.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls(path.read_bytes().strip())
        with os.fdopen(fd, "wb") as fh:
            fh.write(key + b"\n")
        return cls(key)

    def sign(self, pid: str) -> str:
        return hmac.new(self._secret, pid.encode("ascii"), hashlib.sha256).hexdigest()

    def check(self, pid: str, signature: str | None) -> bool:
        return signature is not None and hmac.compare_digest(self.sign(pid), signature)


def signed_kinds(spec: Any) -> bool:
    """Specs whose loading interprets bytes (pickles; later, result tables)."""
    return isinstance(spec, dict) and spec.get("kind") in SIGNED_KINDS


#: Spec kinds that are only loaded after their signature is checked.
SIGNED_KINDS = frozenset({"pickle", "frame"})


def sign_specs(signer: Signer, specs: dict[str, dict]) -> list[tuple[str, str, str]]:
    """``(payload_id, key_id, signature)`` rows for the signed specs of a run."""
    rows = []
    for spec in specs.values():
        if signed_kinds(spec):
            pid = payload_id(spec)
            rows.append((pid, signer.key_id, signer.sign(pid)))
    return rows


def trusted_names(signer: Signer, specs: dict, lookup) -> set[str]:
    """Names whose spec carries a valid signature by *signer*.

    *lookup(key_id, payload_ids)* returns the stored signatures (one query
    for the whole cell, not one per name).
    """
    if not isinstance(specs, dict):
        return set()
    ids = {name: payload_id(spec) for name, spec in specs.items() if signed_kinds(spec)}
    if not ids:
        return set()
    stored = lookup(signer.key_id, set(ids.values()))
    return {name for name, pid in ids.items() if signer.check(pid, stored.get(pid))}
