"""Knowing that a stored record is one we (or someone we trust) wrote, and
what may be shown of one that isn't.

An RSSD is a file people share, commit and merge.  Whatever a record holds
acts in the notebook when it is replayed: its names are bound, its modules
imported, its pickles unpickled (code chosen by whoever wrote them), its HTML
and JavaScript published as live kernel output, which Jupyter trusts.  So,
like Jupyter's notebook trust, **a record acts only if a key the user trusts
signed it**; anyone else's record is shown as inert text and images.

What is signed — one signature per record, over one message
(:func:`signed_bytes`), the canonical JSON (:func:`canonical.canonical_bytes`)
of:

* ``record``: everything ``transition_result`` holds, as parsed
  (:meth:`RunRecord.to_json`): outputs, names and their specs, the result
  value, fields of other versions — nothing in it is left unsigned;
* ``blobs``: the digests of every blob it refers to (they are inside the
  specs too; naming them says that the bytes are covered, through their
  digests, which every read checks — all cryptographic: digests.py);
* ``cell``: the ``ingest_src`` the record is filed under (the cell's scope
  and key).  **This binds a record to its cell**: a validly signed record
  copied under another cell's key does not check there, so whoever can
  write the RSSD can't make one cell replay what another cell showed and
  bound (say, a cell that binds ``model`` replaying a record that binds
  ``threshold``).  The key is enough to bind: it is computed from the cell's
  code, scope and inputs, the same everywhere the cell runs;
* the form's version (``signed``) and the canonical encoding's
  (``canonical``), so a change of either can never alias an old signature.

The **payload id** is the SHA-256 of that message; the HMAC-SHA256 of the id
under the key is stored in ``rssd_magic_signature(payload_id, key_id,
signature)``: one row per record and key, so a teammate's ``trust`` adds a
row and never rewrites ours.  A replay computes the message from the record
it read, looks up one row (its key's), and acts on the record only if the
row is lowercase hex text equal to the HMAC (anything else in the row — a
BLOB, non-ASCII text, a number — is "not signed").  The message differs in
form from anything signed before whole-record signatures (each pickle spec
alone, always with a ``kind`` field; the message has none), so an old
signature never checks as a new one: old records replay untrusted until
``%stateful trust`` re-signs them.

What is *not* covered: which record is the latest.  Whoever can write the
RSSD can append an older signed record of the same cell, or delete rows; a
signature says who wrote a record, not that it is the newest.

The secret: ``StatefulMagics.secret`` / ``$RSSD_MAGIC_SECRET`` (a team key), or
a random key created on first use in the Jupyter data directory, mode 0600.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .canonical import CANONICAL_VERSION, canonical_bytes
# Re-exported: the blob readers and older callers import them from here.
from .digests import IntegrityError, Verifier, buffer_digest, stream_digest, verify  # noqa: F401

ENV_SECRET = "RSSD_MAGIC_SECRET"

#: The form of the signed message; bumped whenever what is signed changes.
SIGNED_FORM = "rssd_magic.record-signature.v2"


# -- keys -----------------------------------------------------------------------------


def default_secret_path() -> Path:
    from jupyter_core.paths import jupyter_data_dir

    return Path(jupyter_data_dir()) / "rssd_magic" / "secret"


#: A signature as we write it: HMAC-SHA256 as lowercase hex.
_SIGNATURE = re.compile(r"[0-9a-f]{64}")


class Signer:
    """Signs and checks payload ids with one secret."""

    def __init__(self, secret: bytes):
        self._secret = secret
        # Which key signed a row, without revealing the key.
        self.key_id = hashlib.sha256(b"rssd_magic key id\0" + secret).hexdigest()[:16]
        self._good: set[tuple[str, str]] = set()  # (payload id, signature) pairs checked good

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

    def check(self, pid: str, signature: Any) -> bool:
        """True when *signature* (a row another tool may have written: any
        type) is this key's signature of *pid*.  A pair found good is
        remembered: a notebook replays the same records again and again, and
        the HMAC was a third of a replay's own cost."""
        if (pid, signature) in self._good:
            return True
        good = (
            isinstance(signature, str)
            and signature.isascii()  # compare_digest refuses non-ASCII text
            and _SIGNATURE.fullmatch(signature) is not None
            and hmac.compare_digest(self.sign(pid), signature)
        )
        if good:
            if len(self._good) >= 4096:
                self._good.clear()
            self._good.add((pid, signature))
        return good


# -- records --------------------------------------------------------------------------


def signed_bytes(cell: str, record: dict, blobs: Iterable[str]) -> bytes:
    """The message signed for one record: the record's JSON, its blobs'
    digests and the ``ingest_src`` of the cell it is filed under (see the
    module docstring for why each is there)."""
    return canonical_bytes(
        {
            "signed": SIGNED_FORM,
            "canonical": CANONICAL_VERSION,
            "cell": cell,
            "record": record,
            "blobs": sorted(blobs),
        }
    )


def payload_id(message: bytes) -> str:
    """What a signature row is about: the SHA-256 of the signed message."""
    return hashlib.sha256(message).hexdigest()


def sign_message(signer: Signer, message: bytes) -> tuple[str, str, str]:
    """The ``(payload_id, key_id, signature)`` row that signs *message*."""
    pid = payload_id(message)
    return pid, signer.key_id, signer.sign(pid)


Lookup = Callable[[str, list[str]], dict]


def unsigned_because(signer: Signer, pid: str, lookup: Lookup) -> str | None:
    """None when *signer*'s key signed the payload *pid*, else why not, in a
    few words.  *lookup(key_id, payload_ids)* is the store's one signature
    query."""
    stored = lookup(signer.key_id, [pid])
    signature = stored.get(pid) if isinstance(stored, dict) else None
    if signature is None:
        return "not signed by your key"
    if signer.check(pid, signature):
        return None
    if not (isinstance(signature, str) and signature.isascii() and _SIGNATURE.fullmatch(signature)):
        return "its signature row is not a signature (not 64 hex digits)"
    return "its signature does not match (changed after it was signed)"


# -- what an unsigned record may show ---------------------------------------------------

#: MIME types an unsigned record's displays may publish: text, and raster
#: images, which a browser shows as pixels and never runs.  Everything else
#: — HTML, JavaScript, Markdown (it may hold HTML), SVG (it may hold
#: script), LaTeX, widgets, PDFs, vendor types a renderer extension
#: interprets — is withheld.
SAFE_MIME = frozenset({"text/plain", "image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp"})



def untrusted_metadata() -> dict:
    """Metadata of every display an unsigned record shows (tools and people
    can tell it from a trusted replay); a new dict each time, since a
    display publisher may keep or change the one it is given."""
    return {"rssd_magic": {"untrusted": True}}

_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]*")


def _text(value: Any) -> str | None:
    """nbformat text: a string or a list of strings."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(part, str) for part in value):
        return "".join(value)
    return None


def inert_outputs(outputs: Any) -> tuple[list[dict], list[str]]:
    """What an unsigned record may show of its *outputs*, and what it may not.

    Returns ``(shown, withheld)``: *shown* are nbformat outputs safe to
    replay — streams as text, and displays and results reduced to
    :data:`SAFE_MIME` (images only when their data is base64 text), each a
    ``display_data`` marked by :func:`untrusted_metadata` with no other
    metadata (a result becomes a display, so no name, not even ``_``, is
    bound to it); *withheld* names each thing left out (a MIME type, or a
    malformed output), for the one line that says so.
    """
    shown: list[dict] = []
    withheld: list[str] = []
    if not isinstance(outputs, list):
        return shown, ["outputs (not a list)"]
    for out in outputs:
        kind = out.get("output_type") if isinstance(out, dict) else None
        if kind == "stream":
            text = _text(out.get("text"))
            name = out.get("name")
            if text is None or name not in ("stdout", "stderr"):
                withheld.append("a malformed stream")
                continue
            shown.append({"output_type": "stream", "name": name, "text": text})
        elif kind in ("display_data", "execute_result"):
            data = out.get("data")
            if not isinstance(data, dict):
                withheld.append("a malformed display")
                continue
            safe: dict[str, str] = {}
            for mime, value in data.items():
                text = _text(value) if mime in SAFE_MIME else None
                if text is not None and (mime == "text/plain" or _BASE64.fullmatch(text)):
                    safe[mime] = text
                else:
                    withheld.append(str(mime)[:60])
            if safe:
                shown.append({"output_type": "display_data", "data": safe, "metadata": untrusted_metadata()})
        elif kind != "error":  # a failed run's traceback is never replayed
            withheld.append("a malformed output")
    return shown, withheld
