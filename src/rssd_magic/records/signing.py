"""Ed25519 signatures of records: a person's key pair, what a public key is
called, and the text of a signature row.

Each person has one key pair, made on first use: the private key in the
Jupyter data directory (``rssd_magic/ed25519_key``, OpenSSH's format, mode
0600, written whole: keyfiles.py), the public key shown by ``rssd-magic keys
show`` as one line of OpenSSH's allowed-signers format.

**A row** of ``rssd_magic_signature`` signed by such a key::

    payload_id  the record's payload id (trust.py), 64 hex digits
    key_id      SHA256:<base64 of the SHA-256 of the public key's wire
                blob, no padding>  — what ``ssh-keygen -l`` prints
    signature   ssh-ed25519 <public key blob, base64> <signature, base64>

The signature is Ed25519 over ``rssd_magic.records.record-signature.ed25519.v1``,
a NUL byte and the payload id in ASCII: a domain of its own, so nothing
else this key might sign reads as a record signature.  The row carries the
public key, so anyone holding it can check it and see who signed — a
verifier first checks that the embedded key's fingerprint *is* the row's
``key_id`` (:func:`parse_row`), then whether that key is one they trust
(keyring.py).  Every field is checked in its canonical form (one base64
spelling, exact lengths): a row in any other shape is not a signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .keyfiles import KeyProblem, read_private, write_new

KEY_TYPE = "ssh-ed25519"
#: What the signature is over: this, then the payload id.
DOMAIN = b"rssd_magic.records.record-signature.ed25519.v1\0"
#: The private key's file name, in ``<jupyter data dir>/rssd_magic/``.
KEY_FILE = "ed25519_key"
#: An OpenSSH Ed25519 private key is ~400 bytes; less is a truncated file.
MIN_PRIVATE_BYTES = 200

_WIRE_PREFIX = struct.pack(">I", len(KEY_TYPE)) + KEY_TYPE.encode("ascii") + struct.pack(">I", 32)
_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


def fingerprint(blob: bytes) -> str:
    """``SHA256:…`` of a public key's wire blob, as ``ssh-keygen -l`` prints it."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


def is_fingerprint(text: Any) -> bool:
    return isinstance(text, str) and _FINGERPRINT.fullmatch(text) is not None


def _b64(text: str) -> bytes | None:
    """The bytes of canonical base64 *text* (None for any other text)."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if base64.b64encode(data).decode("ascii") == text else None


class PublicKey:
    """An Ed25519 public key, by its OpenSSH wire blob."""

    __slots__ = ("blob", "fingerprint", "_key")

    def __init__(self, blob: bytes):
        if len(blob) != len(_WIRE_PREFIX) + 32 or not blob.startswith(_WIRE_PREFIX):
            raise ValueError("not an ssh-ed25519 public key")
        self.blob = bytes(blob)
        self.fingerprint = fingerprint(self.blob)
        self._key = Ed25519PublicKey.from_public_bytes(self.blob[len(_WIRE_PREFIX) :])

    @classmethod
    def from_base64(cls, text: str) -> "PublicKey":
        """The key whose wire blob *text* encodes (ValueError otherwise)."""
        blob = _b64(text) if isinstance(text, str) and text.isascii() else None
        if blob is None:
            raise ValueError("the key is not base64")
        return cls(blob)

    @property
    def openssh(self) -> str:
        """``ssh-ed25519 AAAA…``."""
        return f"{KEY_TYPE} {base64.b64encode(self.blob).decode('ascii')}"

    def verify(self, pid: str, signature: bytes) -> bool:
        try:
            self._key.verify(signature, DOMAIN + pid.encode("ascii"))
        except (InvalidSignature, ValueError, UnicodeEncodeError):
            return False
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.blob == self.blob

    def __hash__(self) -> int:
        return hash(self.blob)


def parse_row(key_id: Any, text: Any) -> tuple[PublicKey, bytes] | None:
    """The public key and signature of a signature row whose ``key_id`` is
    the fingerprint of the key it embeds; None for anything else."""
    if not (is_fingerprint(key_id) and isinstance(text, str) and text.isascii() and len(text) < 400):
        return None
    parts = text.split(" ")
    if len(parts) != 3 or parts[0] != KEY_TYPE:
        return None
    signature = _b64(parts[2])
    if signature is None or len(signature) != 64:
        return None
    try:
        key = PublicKey.from_base64(parts[1])
    except ValueError:
        return None
    if key.fingerprint != key_id:
        return None
    return key, signature


class PersonalKey:
    """The person's Ed25519 key pair (the private key stays in its file)."""

    def __init__(self, private: Ed25519PrivateKey, path: Path | None = None):
        self._private = private
        self.path = path
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public = PublicKey(_WIRE_PREFIX + raw)
        self.key_id = self.public.fingerprint

    @classmethod
    def load(cls, path: Path) -> "PersonalKey":
        """The key in *path*, made there on first use (KeyProblem when the
        file exists but can't be used: keyfiles.py)."""
        data = read_private(path, MIN_PRIVATE_BYTES)
        if data is None:
            made = Ed25519PrivateKey.generate()
            pem = made.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            )
            try:
                written = write_new(path, pem)
            except OSError as exc:
                raise KeyProblem(f"key file {path} can't be made ({exc.strerror or exc})") from None
            if written:
                return cls(made, path)
            data = read_private(path, MIN_PRIVATE_BYTES)  # another kernel made it first: theirs it is
            if data is None:
                raise KeyProblem(f"key file {path} vanished while it was being made")
        try:
            private = serialization.load_ssh_private_key(data, password=None)
        except TypeError:
            raise KeyProblem(f"key file {path} is protected by a passphrase, which rssd_magic can't ask for") from None
        except (ValueError, binascii.Error) as exc:
            raise KeyProblem(f"key file {path} is not an OpenSSH private key ({exc}): it is not used") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise KeyProblem(f"key file {path} holds a {type(private).__name__}, not an Ed25519 key: it is not used")
        return cls(private, path)

    def sign(self, pid: str) -> str:
        """The ``signature`` column of this key's row for payload *pid*."""
        signature = self._private.sign(DOMAIN + pid.encode("ascii"))
        return f"{self.public.openssh} {base64.b64encode(signature).decode('ascii')}"
