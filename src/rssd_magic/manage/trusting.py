"""``trust``: show what records would make active, then sign the chosen ones
with the person's own key.

Signing a record is deciding that its pickles may run code in your kernel,
its modules be imported, its HTML and JavaScript be published.  So the
command never signs blind:

1. :func:`review` picks the records — the store's current EXECUTED records
   no trusted key signed yet (records of your own and of your trusted
   signers already act), or only one cell's, or only those a given key
   signed — and says for each what it would do once trusted: who signed it
   now, the host it ran on, the types it unpickles, the modules it imports,
   the MIME types it publishes beyond text and images.  Records that can't
   be trusted are listed with why (unreadable; a blob missing or not
   matching its digest, each one read to check; blobs named by XXH3-128, an
   older digest that is not collision-resistant);
2. the adapter shows that and asks (a prompt on a terminal; ``--yes`` in a
   script or a notebook);
3. :func:`sign` adds one row of the person's key per record, exactly for
   the records reviewed (other keys' rows are left as they are).

All signature rows of the records considered are read in one query.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from ..store import buckets, tables
from ..store.journal import StateBackend
from ..records.canonical import printable
from ..records.digests import IntegrityError
from ..engine.keys import URI_PREFIX
from ..records.record import RESULT_VALUE, RecordError, RunRecord
from ..records.serialize import NotRestored, spec_blobs
from ..store.tables import CellRow
from ..records.trust import Row, Signer, payload_id


@dataclass
class Review:
    """What :func:`review` found: the records to sign (``records``, each a
    JSON-ready dict; those with ``refused`` set are not signed), how many
    current records were considered (``cells``) and how many already act
    (``already``)."""

    records: list[dict] = field(default_factory=list)
    cells: int = 0
    already: int = 0
    messages: dict[str, bytes] = field(default_factory=dict)  # payload id -> message

    @property
    def signable(self) -> list[dict]:
        return [r for r in self.records if r["refused"] is None]

    @property
    def refused(self) -> list[dict]:
        return [{"key": r["key"], **r["refused"]} for r in self.records if r["refused"] is not None]


def _key(cell: CellRow) -> str:
    digest = cell.ingest_src[len(URI_PREFIX) :].partition("#")[2]
    return str(cell.elaboration.get("key") or digest)


def review(
    backend: StateBackend, signer: Signer, cell: str | None = None, signed_by: Iterable[str] | None = None
) -> Review:
    """The records ``trust`` would sign: every current EXECUTED record no
    trusted key signed, or only the cell filed under ``ingest_src`` *cell*,
    or only those a key of *signed_by* (key ids) signed."""
    found = Review()
    parsed: list[tuple[CellRow, RunRecord | None, str | None, str]] = []
    for row in list(tables.cells(backend, srcs=[cell] if cell is not None else None, executed=True, with_results=True)):
        text = row.latest.result_json
        if not text:
            continue
        found.cells += 1
        try:
            record = RunRecord.from_json(text)
        except RecordError as exc:
            parsed.append((row, None, None, f"unreadable ({exc})"))
            continue
        (message,) = record.payloads_to_sign(row.ingest_src)
        pid = payload_id(message)
        found.messages[pid] = message
        parsed.append((row, record, pid, ""))
    rows = backend.signatures([pid for _, _, pid, _ in parsed if pid is not None])
    wanted = list(signed_by) if signed_by is not None else None
    for row, record, pid, unreadable in parsed:
        verdict = signer.judge(pid, rows.get(pid)) if pid is not None else None
        if wanted is not None and not any(signer.signed_by(pid, rows.get(pid), k) for k in wanted if pid):
            continue
        if verdict is not None and verdict.trusted:
            found.already += 1
            continue
        item = {
            "key": _key(row),
            "name": row.elaboration.get("name") if isinstance(row.elaboration.get("name"), str) else None,
            "ingest_src": row.ingest_src,
            "payload_id": pid,
            "signer": verdict.label if verdict is not None else "?",
            "signature": verdict.why if verdict is not None else None,
            "host": record.host if record is not None else None,
            **(record.what_acts() if record is not None else {"names": [], "pickled": [], "modules": [], "active": []}),
            "refused": {"name": "(record)", "why": unreadable} if record is None else _refusal(backend, record),
        }
        found.records.append(item)
    return found


def _refusal(backend: StateBackend, record: RunRecord) -> dict | None:
    """``{name, why}`` when *record* can't be trusted: a blob named by a
    digest no loader accepts, or one that is missing or doesn't match its
    digest (each blob is read, which checks it)."""
    weak = record.weak_digests()
    if weak:
        return {
            "name": "(record)",
            "why": f"names {len(weak)} blob(s) by a digest that is not collision-resistant ({printable(weak[0].partition(':')[0], 20)}, "
            "as raw buffers were named before BLAKE3): it can't be trusted; --force runs the cell again and records it anew",
        }
    get = buckets.reader(backend, record.blob_store)
    for name, spec in record.specs().items():
        try:
            for digest in spec_blobs(spec):
                get(digest)
        except (KeyError, IntegrityError, NotRestored) as exc:
            why = "a blob is missing" if isinstance(exc, KeyError) else printable(str(exc).strip("()"), 300)
            return {"name": "(result)" if name == RESULT_VALUE else printable(name), "why": why}
    return None


def sign(backend: StateBackend, signer: Signer, found: Review) -> list[Row]:
    """Sign the reviewed records that can be trusted with the person's own
    key (one row each); returns the rows added."""
    rows = [signer.sign_own(found.messages[r["payload_id"]]) for r in found.signable]
    backend.add_signatures(rows)
    return rows
