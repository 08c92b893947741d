"""Whose signatures count in this kernel: the person's own key, their
trusted signers, and a team's shared secret — and the verdict on the
signature rows of one record.

A record acts only if one of its rows checks under a key the person trusts
(:meth:`Keyring.judge`), tried in this order:

1. **their own Ed25519 key** (signing.py), made on first use; always trusted;
2. **a trusted signer's** Ed25519 key, from the signers file (signers.py);
3. **the team secret**, when one is configured (``StatefulMagics.secret`` or
   ``$RSSD_MAGIC_SECRET``): HMAC-SHA256, for teams that keep one;
4. **their old per-user HMAC key** (``secret`` in the same folder), when it
   exists: it still checks the records it signed before Ed25519 keys; it
   signs nothing new.

New records are signed with the person's key and, when a team secret is
configured, with it too (two rows), so teammates who share the secret trust
each other's records as before.

**The team secret is stretched.**  The HMAC key and the row's ``key_id``
are derived from it with scrypt (N=2^15, r=8, p=1: ~0.1 s and 32 MB per
try) under a fixed salt, so every teammate derives the same ones, but the
``key_id`` in every row — ``team:`` and 32 hex digits — no longer lets
anyone who can read the store test guesses at a weak secret at the speed of
SHA-256.  It is derived once per process.

**Revocation.**  :meth:`Keyring.refresh` looks at the signers file (one
``stat``) and re-reads it when it changed, bumping :attr:`Keyring.generation`;
the replayer drops every good verdict it cached when the generation moves,
so a revoked key's records are untrusted at their next replay, in the same
kernel too.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from .keyfiles import KeyProblem, read_private
from .signers import ENV_SIGNERS, SIGNERS_FILE, SignersFile
from .signing import KEY_FILE, PersonalKey, PublicKey, is_fingerprint, parse_row
from .trust import ENV_SECRET, Row, Verdict, payload_id

#: The old per-user HMAC key's file name (read, never made any more).
LEGACY_FILE = "secret"
#: An HMAC signature as written: SHA-256, lowercase hex.
_HMAC = re.compile(r"[0-9a-f]{64}")
#: scrypt's cost for the team secret (see the module docstring).
TEAM_KDF = {"n": 2**15, "r": 8, "p": 1, "maxmem": 64 << 20}
TEAM_SALT = b"rssd_magic team secret v1"

UNSIGNED = Verdict(False, "unsigned", None, "unsigned")


def data_dir() -> Path:
    """``<jupyter data dir>/rssd_magic``: where the person's keys live."""
    from jupyter_core.paths import jupyter_data_dir

    return Path(jupyter_data_dir()) / "rssd_magic"


def signers_path(configured: str | None = None, folder: Path | None = None) -> Path:
    """The trusted-signers file: *configured*, ``$RSSD_MAGIC_TRUSTED_SIGNERS``,
    else ``allowed_signers`` in *folder* (the Jupyter data directory's)."""
    chosen = configured or os.environ.get(ENV_SIGNERS)
    return Path(chosen).expanduser().absolute() if chosen else (folder or data_dir()) / SIGNERS_FILE


class HmacKey:
    """A shared secret that signs payload ids with HMAC-SHA256."""

    def __init__(self, key: bytes, key_id: str, label: str):
        self._key = key
        self.key_id = key_id
        self.label = label

    @classmethod
    def team(cls, secret: str) -> "HmacKey":
        key, key_id = _stretched(secret.encode("utf-8"))
        return cls(key, key_id, "the team key")

    @classmethod
    def legacy(cls, path: Path) -> "HmacKey | None":
        """The old per-user key file (None when there is none; KeyProblem
        when it exists but can't be used: keyfiles.py)."""
        data = read_private(path, 32)
        if data is None:
            return None
        secret = data.strip()
        key_id = hashlib.sha256(b"rssd_magic key id\0" + secret).hexdigest()[:16]  # random: nothing to guess
        return cls(secret, key_id, "you")

    def sign(self, pid: str) -> str:
        return hmac.new(self._key, pid.encode("ascii"), hashlib.sha256).hexdigest()

    def check(self, pid: str, signature: Any) -> bool:
        """True when *signature* (a row another tool may have written: any
        type) is this key's signature of *pid*."""
        return (
            isinstance(signature, str)
            and signature.isascii()  # compare_digest refuses non-ASCII text
            and _HMAC.fullmatch(signature) is not None
            and hmac.compare_digest(self.sign(pid), signature)
        )


@lru_cache(maxsize=8)
def _stretched(secret: bytes) -> tuple[bytes, str]:
    derived = hashlib.scrypt(secret, salt=TEAM_SALT, dklen=48, **TEAM_KDF)
    return derived[:32], "team:" + derived[32:].hex()


class Keyring:
    """The keys one kernel (or one CLI command) signs with and trusts."""

    def __init__(
        self, own: PersonalKey, signers: SignersFile, team: HmacKey | None = None, legacy: HmacKey | None = None
    ):
        self.own = own
        self.signers = signers
        self.team = team
        self.legacy = legacy
        self.key_id = own.key_id
        self.generation = 0
        self._hmac = {k.key_id: k for k in (team, legacy) if k is not None}

    @classmethod
    def load(cls, secret: str | None = None, signers: str | None = None, folder: Path | None = None) -> "Keyring":
        """The person's keys from *folder* (default: :func:`data_dir`), the
        signers file (:func:`signers_path`), and the team *secret* (else
        ``$RSSD_MAGIC_SECRET``).  KeyProblem when any can't be used."""
        folder = folder or data_dir()
        team = secret if secret is not None else os.environ.get(ENV_SECRET)
        return cls(
            PersonalKey.load(folder / KEY_FILE),
            SignersFile(signers_path(signers, folder)),
            HmacKey.team(team) if team else None,
            HmacKey.legacy(folder / LEGACY_FILE),
        )

    # -- signing ---------------------------------------------------------------

    def sign_own(self, message: bytes) -> Row:
        """The row of the person's own key for *message*."""
        pid = payload_id(message)
        return pid, self.own.key_id, self.own.sign(pid)

    def sign(self, message: bytes) -> list[Row]:
        rows = [self.sign_own(message)]
        if self.team is not None:
            rows.append((rows[0][0], self.team.key_id, self.team.sign(rows[0][0])))
        return rows

    # -- judging ---------------------------------------------------------------

    def refresh(self) -> None:
        if self.signers.refresh():
            self.generation += 1

    def _trusted_key(self, key_id: Any) -> tuple[PublicKey, str] | None:
        if key_id == self.own.key_id:
            return self.own.public, "you"
        signer = self.signers.by_fingerprint.get(key_id) if isinstance(key_id, str) else None
        return (signer.key, signer.name) if signer is not None else None

    def judge(self, pid: str, rows: Any) -> Verdict:
        if not isinstance(rows, dict) or not rows:
            return UNSIGNED
        # Your own row first: a record you signed replays as yours.
        ordered = sorted(rows.items(), key=lambda kv: kv[0] != self.own.key_id)
        doubtful: tuple[str, str] | None = None  # (name, why) of a trusted key's row that didn't check
        for key_id, signature in ordered:
            trusted = self._trusted_key(key_id)
            if trusted is not None:
                key, name = trusted
                parsed = parse_row(key_id, signature)
                if parsed is not None and parsed[0] == key and key.verify(pid, parsed[1]):
                    return Verdict(True, name, key_id)
                doubtful = doubtful or (name, "is not a signature" if parsed is None else "does not match")
            elif key_id in self._hmac:
                shared = self._hmac[key_id]
                if shared.check(pid, signature):
                    return Verdict(True, shared.label, key_id)
                malformed = not (isinstance(signature, str) and signature.isascii() and _HMAC.fullmatch(signature))
                doubtful = doubtful or (shared.label, "is not a signature" if malformed else "does not match")
        if doubtful is not None:
            name, why = doubtful
            owner = "your key" if name == "you" else name
            if why == "does not match":
                return Verdict(False, name, None, f"its signature by {owner} does not match (changed after it was signed)")
            return Verdict(False, name, None, f"its signature row by {owner} is not a signature")
        # Nobody trusted signed it: say who did, when a row proves it.
        for key_id, signature in ordered:
            parsed = parse_row(key_id, signature)
            if parsed is not None and parsed[0].verify(pid, parsed[1]):
                return Verdict(False, key_id, key_id, f"signed by {key_id}, a key you don't trust")
        return Verdict(False, "an unknown key", None, "signed by no key you trust")

    def signed_by(self, pid: str, rows: Any, key_id: str) -> bool:
        """Did the key *key_id* sign *pid* (its row checks, under the key
        the row embeds for a key not trusted here)?"""
        if not isinstance(rows, dict) or key_id not in rows:
            return False
        if key_id in self._hmac:
            return self._hmac[key_id].check(pid, rows[key_id])
        parsed = parse_row(key_id, rows[key_id])
        trusted = self._trusted_key(key_id)
        return parsed is not None and (trusted is None or parsed[0] == trusted[0]) and parsed[0].verify(pid, parsed[1])

    # -- names -----------------------------------------------------------------

    def resolve(self, what: str) -> list[str]:
        """The key ids ``--signer WHAT`` means: a trusted signer's name, a
        fingerprint (any key's), ``you``, or a key id as stored."""
        if what == "you":
            return [self.own.key_id]
        named = [s.fingerprint for s in self.signers.find(what)]
        if named:
            return list(dict.fromkeys(named))
        if is_fingerprint(what) or what in self._hmac:
            return [what]
        raise KeyProblem(
            f"--signer {what!r} is neither a name in trusted signers {self.signers.path} nor a key fingerprint "
            "(SHA256:…, as the untrusted-record line or rssd-magic keys list shows)"
        )

    def label(self, key_id: str | None) -> str:
        """``you``, a trusted signer's name, ``the team key``, else the id."""
        if key_id is None:
            return "unsigned"
        trusted = self._trusted_key(key_id)
        if trusted is not None:
            return trusted[1]
        return self._hmac[key_id].label if key_id in self._hmac else key_id

    def listing(self) -> list[dict]:
        """``keys list``: every trusted key, yours first."""
        out = [{"name": "(you)", "fingerprint": self.own.key_id, "source": str(self.own.path)}]
        out += [{"name": s.name, "fingerprint": s.fingerprint, "source": s.source} for s in self.signers.signers]
        if self.team is not None:
            out.append({"name": "(team secret)", "fingerprint": self.team.key_id, "source": "$" + ENV_SECRET + " or StatefulMagics.secret"})
        if self.legacy is not None:
            out.append({"name": "(your old HMAC key)", "fingerprint": self.legacy.key_id, "source": "checks old records only"})
        return out
