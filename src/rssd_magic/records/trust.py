"""Knowing that a stored record is one someone the user trusts wrote, and
what may be shown of one that isn't.

An RSSD is a file people share, commit and merge, and a PostgreSQL store is
shared by a team.  Whatever a record holds acts in the notebook when it is
replayed: its names are bound, its modules imported, its pickles unpickled
(code chosen by whoever wrote them), its HTML and JavaScript published as
live kernel output, which Jupyter trusts.  So, like Jupyter's notebook
trust, **a record acts only if a key the user trusts signed it**; anyone
else's record is shown as inert text and images.

What is signed — one message per record (:func:`signed_bytes`), the
canonical JSON (:func:`canonical.canonical_bytes`) of:

* ``record``: everything ``transition_result`` holds, as parsed
  (:meth:`RunRecord.to_json`): outputs, names and their specs, the result
  value, fields of other versions — nothing in it is left unsigned;
* ``blobs``: the digests of every blob it refers to (they are inside the
  specs too; naming them says that the bytes are covered, through their
  digests, which every read checks — all cryptographic: digests.py);
* ``cell``: the ``ingest_src`` the record is filed under (the cell's scope
  and key).  **This binds a record to its cell**: a validly signed record
  copied under another cell's key does not check there, so whoever can
  write the store can't make one cell replay what another cell showed and
  bound.  The key is enough to bind: it is computed from the cell's code,
  scope and inputs, the same everywhere the cell runs;
* the form's version (``signed``) and the canonical encoding's
  (``canonical``), so a change of either can never alias an old signature.

The **payload id** is the SHA-256 of that message.  Each signature is one
row ``rssd_magic_signature(payload_id, key_id, signature)``: one per record
and key, so a teammate's ``trust`` adds a row and never rewrites ours.
Who signs and whose rows count is the :class:`Signer` (keyring.py): the
person's Ed25519 key (signing.py says the row's format), the keys of their
trusted signers (signers.py), and a team's shared HMAC secret when one is
configured.  A replay reads every row of the payload id in one query and
acts on the record only if one checks under a trusted key
(:class:`Verdict`); a row of any other shape is "not a signature".

What is *not* covered: which record is the latest.  Whoever can write the
store can append an older signed record of the same cell, or delete rows;
a signature says who wrote a record, not that it is the newest.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Iterable, Protocol

from . import outputs
from .outputs import Output
from .canonical import CANONICAL_VERSION, canonical_bytes
# Re-exported: the blob readers and older callers import them from here.
from .digests import IntegrityError, Verifier, buffer_digest, stream_digest, verify  # noqa: F401

ENV_SECRET = "RSSD_MAGIC_SECRET"

#: The form of the signed message; bumped whenever what is signed changes.
SIGNED_FORM = "rssd_magic.records.record-signature.v2"

Row = tuple[str, str, str]


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


@dataclass(frozen=True)
class Verdict:
    """What the signature rows of one payload say.

    ``trusted``: a row checked under a key the user trusts.  ``label`` names
    the signer for people: ``you``, a trusted signer's name, ``the team
    key``; for an untrusted record the fingerprint of a key that really
    signed it, or ``unsigned``.  ``key_id`` is that key's id (None when no
    row checked under any key); ``why`` says in a few words why an
    untrusted record is not trusted.
    """

    trusted: bool
    label: str
    key_id: str | None = None
    why: str | None = None

    @property
    def mine(self) -> bool:
        return self.trusted and self.label == "you"


class Signer(Protocol):
    """Signs what this kernel records and judges what it replays
    (keyring.Keyring)."""

    key_id: str
    #: Bumped whenever the set of trusted keys changes (a revocation).
    generation: int

    def sign(self, message: bytes) -> list[Row]:
        """The rows that sign *message* (the person's key, and the team key
        when one is configured)."""

    def sign_own(self, message: bytes) -> Row:
        """The row of the person's own key for *message* (``trust``)."""

    def refresh(self) -> None:
        """Look again at what decides trust (the signers file): at most one
        ``stat`` per call."""

    def judge(self, pid: str, rows: Any) -> Verdict:
        """The verdict of *rows* (``{key_id: signature}`` as stored) on *pid*."""

    def signed_by(self, pid: str, rows: Any, key_id: str) -> bool:
        """Did the key *key_id* sign *pid*, trusted here or not?"""

    def resolve(self, what: str) -> list[str]:
        """The key ids ``--signer WHAT`` names (a signer's name or a fingerprint)."""


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


def inert_outputs(recorded: Any) -> tuple[list[Output], list[str]]:
    """What an unsigned record may show of its *recorded* outputs, and what it may not.

    Returns ``(shown, withheld)``: *shown* are nbformat outputs safe to
    replay — streams as text, and displays and results reduced to
    :data:`SAFE_MIME` (images only when their data is base64 text), each a
    ``display_data`` marked by :func:`untrusted_metadata` with no other
    metadata (a result becomes a display, so no name, not even ``_``, is
    bound to it); *withheld* names each thing left out (a MIME type, or a
    malformed output), for the one line that says so.
    """
    shown: list[Output] = []
    withheld: list[str] = []
    if not isinstance(recorded, list):
        return shown, ["outputs (not a list)"]
    for out in recorded:
        kind = outputs.kind(out)
        if kind == outputs.STREAM:
            text = _text(out.get("text"))
            name = out.get("name")
            if text is None or name not in ("stdout", "stderr"):
                withheld.append("a malformed stream")
                continue
            shown.append(outputs.stream(name, text))
        elif kind in (outputs.DISPLAY, outputs.RESULT):
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
                shown.append(outputs.display(safe, untrusted_metadata()))
        elif kind != outputs.ERROR:  # a failed run's traceback is never replayed
            withheld.append("a malformed output")
    return shown, withheld
