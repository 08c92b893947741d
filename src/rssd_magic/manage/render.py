"""Text and HTML renderings of what report.py returns, shared by the
``rssd-magic`` CLI and the ``%stateful`` line magic (no IPython, no click).

*prog* is how the reader runs commands where they are: ``rssd-magic`` in a
shell, ``%stateful`` in a notebook, so a hint names what they can type.
"""

from __future__ import annotations

import html
import re

from ..records import outputs
from ..records.canonical import fmt_bytes, fmt_duration, plural
from ..records.outputs import Output
from .report import label_of

def table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """Columns padded to their widest cell (the last one is not padded)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = []
    for cells in [headers, *rows]:
        parts = []
        for i, cell in enumerate(cells):
            if i in right:
                parts.append(cell.rjust(widths[i]))
            elif i == len(cells) - 1:
                parts.append(cell)
            else:
                parts.append(cell.ljust(widths[i]))
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines()) or prefix


def _output_text(out: Output) -> tuple[str, str]:
    kind = outputs.kind(out)
    if kind == outputs.STREAM:
        return out.get("name", "stream"), outputs.text_of(out)
    if kind in (outputs.RESULT, outputs.DISPLAY):
        label = "result" if kind == outputs.RESULT else "display"
        plain = outputs.plain_of(out)
        return label, plain if plain is not None else "<" + ", ".join(sorted(out.get("data", {}))) + ">"
    if kind == outputs.ERROR:
        return "error", f"{out.get('ename')}: {out.get('evalue')}"
    return str(kind), ""


CELL_HEADERS = ["KEY", "NAME", "SCOPE", "STATE", "SOURCE", "EXECUTED AT (UTC)", "HOST", "DURATION", "HITS"]
#: Columns holding numbers (right-aligned); text reads left-aligned.
NUMERIC = {7, 8}


def cells_text(cells: list[dict]) -> str:
    """``list``: one aligned line per cell."""
    return table(CELL_HEADERS, [_cell_row(c) for c in cells], right=NUMERIC)


def cells_html(cells: list[dict]) -> str:
    """``list`` as an HTML table, for notebooks.  Alignment is set on every
    cell: JupyterLab's stylesheet right-aligns table cells by default."""

    def td(i: int, value: str, tag: str = "td") -> str:
        return f'<{tag} style="text-align:{"right" if i in NUMERIC else "left"}">{html.escape(value)}</{tag}>'

    head = "".join(td(i, h, "th") for i, h in enumerate(CELL_HEADERS))
    body = "".join("<tr>" + "".join(td(i, v) for i, v in enumerate(_cell_row(c))) + "</tr>" for c in cells)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell_row(c: dict) -> list[str]:
    return [
        c["key"][:12],
        c["name"] if c["name"] is not None else "-",
        c["scope"] or "-",
        c["state"] or "-",
        label_of(c, 40),
        c["executed_at"] or "-",
        c["host"] or "-",
        fmt_duration(c["duration_s"]),
        str(c["hits"]),
    ]


def cell_text(cell: dict) -> str:
    """``show``: source, every transition, what the next run replays."""
    state = cell["state"] or "-"
    if cell["state"] == "EXECUTED":
        state += (
            f" (executed {cell['executed_at']} UTC on {cell['host'] or '?'} "
            f"in {fmt_duration(cell['duration_s'])}; replayed {plural(cell['hits'], 'time')})"
        )
    lines = [
        f"key     {cell['key']}",
        f"scope   {cell['scope']}",
        f"kind    {cell['kind']}" + (f" (--name {cell['name']})" if cell["name"] is not None else ""),
        f"state   {state}",
        "",
        "source",
        _indent(cell["source"] or ""),
        "",
        "transitions (UTC)",
    ]
    rows = [
        [t["id"], t["at"] or "-", t["from"], t["to"], t["host"] or "-", t["session"] or "-", t["reason"] or ""]
        for t in cell["transitions"]
    ]
    lines.append(_indent(table(["ID", "AT", "FROM", "TO", "HOST", "SESSION", "REASON"], rows), "  "))
    if cell["outputs"] is not None:
        lines += ["", "outputs replayed on the next run"]
        if not cell["outputs"]:
            lines.append("    (none)")
        for out in cell["outputs"]:
            label, text = _output_text(out)
            lines.append(_indent(text.rstrip("\n"), f"    {label:<8}| "))
        lines += ["", "names restored on the next run"]
        names = cell["names"] or {}
        if not names:
            lines.append("    (none)")
        else:
            rows = [
                [
                    name,
                    spec.get("kind") or "-",
                    spec.get("type") or "-",
                    fmt_bytes(spec["size"]) if spec.get("size") is not None else "-",
                    spec.get("error") or "",
                ]
                for name, spec in names.items()
            ]
            lines.append(_indent(table(["NAME", "KIND", "TYPE", "SIZE", "NOTE"], rows, right={3}), "    "))
    if cell["error"]:
        err = cell["error"]
        lines += ["", f"last failure ({err.get('state')}, {err.get('at')} UTC)", f"    {err.get('ename')}: {err.get('evalue')}"]
    return "\n".join(lines)


def _where(s: dict) -> list[str]:
    """The store's own line: a file and its WAL, or a server schema and what
    our tables take on its disk."""
    st = s["storage"]
    if "schema" in st:
        return ["server", f"{s['path']}, schema {st['schema']} ({fmt_bytes(st['file_bytes'])} on disk)"]
    return ["file", f"{s['path']} ({fmt_bytes(st['file_bytes'])}, WAL {fmt_bytes(st['wal_bytes'])})"]


def stats_text(s: dict, prog: str = "rssd-magic") -> str:
    """``stats`` as aligned label/value lines."""
    st = s["storage"]
    states = ", ".join(f"{n} {state.lower()}" for state, n in sorted(s["by_state"].items()))
    rows = [
        _where(s),
        ["cells", f"{s['cells']}" + (f" ({states})" if states else "")],
        ["executed", str(s["executed"])],
        ["transitions", str(s["transitions"])],
        ["hits", str(s["hits"])],
        ["time saved", fmt_duration(s["time_saved_s"])],
        ["blobs", f"{st['blobs']} ({fmt_bytes(st['blob_bytes'])})"],
        ["result JSON", fmt_bytes(st["result_json_bytes"])],
        ["unreferenced", f"{st['unreferenced_blobs']} blobs ({fmt_bytes(st['unreferenced_blob_bytes'])}; `{prog} gc` frees them)"],
    ]
    return "\n".join(f"{k:<13}{v}" for k, v in rows)


def gc_text(r: dict) -> str:
    """What ``gc`` freed (or would): the store's line, then one per bucket."""
    verb = "would free" if r["dry_run"] else "freed"
    lines = [f"{verb} {plural(r['deleted'], 'blob')}, {fmt_bytes(r['bytes_freed'])}; "
             f"kept {plural(r['kept'], 'blob')}, {fmt_bytes(r['kept_bytes'])}"]  # fmt: skip
    for b in r.get("buckets", ()):
        if b["left"] is not None:
            lines.append(f"{b['bucket']}: left alone: {b['left']}")
        else:
            lines.append(f"{b['bucket']}: {verb} {plural(b['deleted'], 'object')}, {fmt_bytes(b['bytes_freed'])}; "
                         f"kept {plural(b['kept'], 'object')}, {fmt_bytes(b['kept_bytes'])}")  # fmt: skip
            shown = b.get("objects") or []
            lines += [f"  {o['digest']}  {fmt_bytes(o['size'])}" for o in shown[:20]]
            if len(shown) > 20:
                lines.append(f"  … and {len(shown) - 20} more (--json lists them all)")
    return "\n".join(lines)


def verify_text(r: dict, prog: str = "rssd-magic") -> str:
    """What ``verify`` found: one line when every blob is intact, else one
    line per bad blob and the cells that name it, and what to do."""
    head = (
        f"checked {plural(r['checked'], 'blob')} ({fmt_bytes(r['bytes'])}) named by "
        f"{plural(r['records'], 'current record')}"
    )
    unchecked = r.get("unchecked") or []
    differs = (r.get("tally") or {}).get("differs") or []
    told = []
    if differs:
        told.append(f"the tally `stats` reads differs from the records ({', '.join(differs)}): " + (
            "recounted" if r["tally"]["recounted"] else f"`{prog} verify --repair` recounts it"))
    if not r["bad"] and not unchecked:
        return "\n".join([head + ": all intact", *told])
    lines = [head + f": {len(r['bad'])} bad" + (f", {len(unchecked)} not checked" if unchecked else ""), *told]
    if unchecked:
        lines.append(f"not checked ({len(unchecked)}, nothing repaired for them): {unchecked[0]['why']}")
    if not r["bad"]:
        return "\n".join(lines)
    for b in r["bad"]:
        named = ", ".join(f"{c['key'][:12]} ({c['name']})" for c in b["cells"])
        lines.append(f"bad blob {b['digest'][:24]}…: {b['why']}; named by {named}")
    if r["repaired"]:
        forgotten = ", ".join(f["key"][:12] for f in r["forgotten"]) or "none"
        lines.append(f"repaired: bad blobs deleted; forgotten (they run again next time): {forgotten}")
    else:
        lines.append(f"`{prog} verify --repair` deletes them and forgets those cells, so they run again")
    return "\n".join(lines)


# -- trust -------------------------------------------------------------------------------

TRUST_HEADERS = ["KEY", "NAME", "SIGNED BY", "HOST", "UNPICKLES", "IMPORTS", "PUBLISHES"]


def _few(items: list[str], most: int = 4) -> str:
    items = [str(i) for i in items]
    more = f" +{len(items) - most}" if len(items) > most else ""
    return ", ".join(items[:most]) + more if items else "-"


def _trust_row(r: dict) -> list[str]:
    # Types, modules, MIME types and the host come from the record: another
    # tool's text, shown without terminal escapes wherever it is shown.
    return [
        strip_escapes(cell)
        for cell in (
            r["key"][:12],
            r["name"] if r["name"] is not None else "-",
            r["signer"],
            r["host"] or "-",
            _few(r["pickled"]),
            _few(r["modules"]),
            _few(r["active"]),
        )
    ]


def _trust_notes(p: dict) -> tuple[str | None, list[str]]:
    """The preview's heading (None when nothing can be signed) and its notes."""
    ok = [r for r in p["records"] if r["refused"] is None]
    heading = f"{plural(len(ok), 'record')} would act once signed with your key {p['key_id']}:" if ok else None
    notes = [
        f"can't be trusted: {r['key'][:12]} {r['refused']['name']}: {r['refused']['why']}"
        for r in p["records"]
        if r["refused"] is not None
    ]
    if not ok:
        notes.append("nothing to sign")
    if p["already"]:
        notes.append(f"({plural(p['already'], 'record')} of {p['cells']} already act: signed by you or a key you trust)")
    return heading, notes


def trust_preview_text(p: dict) -> str:
    """``trust``'s preview: per record to sign, who signed it now and what
    it would make active once trusted; then the records that can't be."""
    heading, notes = _trust_notes(p)
    rows = [_trust_row(r) for r in p["records"] if r["refused"] is None]
    return "\n".join(([heading, table(TRUST_HEADERS, rows)] if heading else []) + notes)


def trust_preview_html(p: dict) -> str:
    heading, notes = _trust_notes(p)
    out = []
    if heading:
        head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in TRUST_HEADERS)
        body = "".join(
            "<tr>" + "".join(f"<td style='text-align:left'>{html.escape(v)}</td>" for v in _trust_row(r)) + "</tr>"
            for r in p["records"]
            if r["refused"] is None
        )
        out += [f"<p>{html.escape(heading)}</p>", f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"]
    return "".join(out + [f"<p>{html.escape(n)}</p>" for n in notes])


#: Terminal control sequences: CSI (ESC [ … final byte), OSC (ESC ] … BEL or
#: ESC \), other two-byte escapes, 8-bit C1 controls, and C0 controls but
#: newline and tab.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[PX^_][^\x1b]*(?:\x1b\\)?|\x1b.?|[\x80-\x9f]|[\x00-\x08\x0b-\x1f\x7f]"
)


def strip_escapes(text: str) -> str:
    """*text* without terminal control sequences: what another tool wrote
    into a record (or a cell printed) can't move the cursor, retitle the
    window, write a link or hide text on the terminal that shows it."""
    return _ESCAPES.sub("", text)
