"""``rssd-magic``: inspect and maintain the ``%%stateful`` cells of an RSSD.

A thin click adapter over :mod:`rssd_magic.report`: it finds the file, opens
it (read-only unless the command writes), calls one report function and
prints the answer as aligned text or, with ``--json``, as JSON.  It never
creates a file: a missing, non-SQLite or non-RSSD path is one line on stderr
and exit status 1.  Importing it does not import IPython.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import click

from . import __version__, report
from .store import DEFAULT_RSSD, ENV_RSSD, RSSDError, Store


class Fail(click.ClickException):
    """One line on stderr, exit status 1."""

    def show(self, file=None) -> None:
        click.echo(f"rssd-magic: {self.format_message()}", err=True)


def resolve_db(db: str | None) -> Path:
    """--db, then $SURVEILR_STATEDB_FS_PATH, then ./resource-surveillance.sqlite.db."""
    raw = db or os.environ.get(ENV_RSSD) or DEFAULT_RSSD
    return Path(raw).expanduser().absolute()


@contextmanager
def opened(ctx: click.Context, write: bool = False) -> Iterator[Store]:
    """The RSSD, validated read-only first (so a SQLite file that is not an
    RSSD is refused, never given tables), then reopened for writing if asked."""
    path: Path = ctx.obj["db"]
    try:
        store = Store.open(path, create=False, readonly=True)
        if write:
            store.close()
            store = Store.open(path, create=False)
    except RSSDError as exc:
        raise Fail(str(exc)) from None
    try:
        yield store
    except sqlite3.Error as exc:
        raise Fail(f"RSSD {path}: {exc}") from None
    except report.ReportError as exc:
        raise Fail(str(exc)) from None
    finally:
        store.close()


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


# -- formatting -------------------------------------------------------------------


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.3g}ms"
    if seconds < 120:
        return f"{seconds:.3g}s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 120:
        return f"{int(minutes)}m{int(sec):02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)}h{int(minutes):02d}m"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


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


def _output_text(out: dict) -> tuple[str, str]:
    kind = out.get("output_type")
    if kind == "stream":
        text = out.get("text", "")
        return out.get("name", "stream"), "".join(text) if isinstance(text, list) else text
    if kind in ("execute_result", "display_data"):
        data = out.get("data", {})
        label = "result" if kind == "execute_result" else "display"
        plain = data.get("text/plain")
        if plain is not None:
            return label, "".join(plain) if isinstance(plain, list) else plain
        return label, "<" + ", ".join(sorted(data)) + ">"
    if kind == "error":
        return "error", f"{out.get('ename')}: {out.get('evalue')}"
    return str(kind), ""


# -- commands ---------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    metavar="PATH",
    help=f"RSSD file (default: ${ENV_RSSD}, then ./{DEFAULT_RSSD}). Never created.",
)
@click.version_option(__version__, prog_name="rssd-magic")
@click.pass_context
def main(ctx: click.Context, db: str | None) -> None:
    """Inspect and maintain the %%stateful cells recorded in a surveilr RSSD.

    KEY arguments take any unique prefix of a cell's 64-hex key (or a
    --name given to the cell).
    """
    ctx.ensure_object(dict)
    ctx.obj["db"] = resolve_db(db)


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of cells.")
@click.pass_context
def list_cmd(ctx: click.Context, as_json: bool) -> None:
    """One line per cell, in the order first seen."""
    with opened(ctx) as store:
        cells = report.list_cells(store)
    if as_json:
        emit_json(cells)
        return
    if not cells:
        click.echo(f"no %%stateful cells in {ctx.obj['db']}", err=True)
        return
    rows = [
        [
            c["key"][:12],
            c["name"] if c["name"] is not None else "-",
            c["state"] or "-",
            report.first_line(c["source"] or "", 40),
            c["executed_at"] or "-",
            c["host"] or "-",
            fmt_duration(c["duration_s"]),
            str(c["hits"]),
        ]
        for c in cells
    ]
    headers = ["KEY", "NAME", "STATE", "SOURCE", "EXECUTED AT (UTC)", "HOST", "DURATION", "HITS"]
    click.echo(table(headers, rows, right={6, 7}))


@main.command("show")
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="Print the cell as a JSON object.")
@click.pass_context
def show_cmd(ctx: click.Context, key: str, as_json: bool) -> None:
    """A cell's source, every transition, and what its next run replays."""
    with opened(ctx) as store:
        cell = report.show_cell(store, report.resolve_key(store, key)["key"])
    if as_json:
        emit_json(cell)
        return
    state = cell["state"] or "-"
    if cell["state"] == "EXECUTED":
        state += (
            f" (executed {cell['executed_at']} UTC on {cell['host'] or '?'} "
            f"in {fmt_duration(cell['duration_s'])}; replayed {cell['hits']} time(s))"
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
    click.echo("\n".join(lines))


@main.command("forget")
@click.argument("key", required=False)
@click.option("--all", "all_", is_flag=True, help="Forget every executed cell.")
@click.option("--json", "as_json", is_flag=True, help="Print what was forgotten as JSON.")
@click.pass_context
def forget_cmd(ctx: click.Context, key: str | None, all_: bool, as_json: bool) -> None:
    """Make executed cells run again next time (EXECUTED → FORGOTTEN).

    History is kept: a FORGOTTEN transition is appended, nothing is deleted.
    Give KEY or --all.
    """
    if bool(key) == all_:
        raise click.UsageError("give either KEY or --all")
    with opened(ctx, write=True) as store:
        if all_:
            done = report.forget_all(store)
        else:
            cell = report.resolve_key(store, key)
            done = report.forget(store, cell["key"])
            if not done:
                click.echo(
                    f"nothing to forget: cell {cell['key'][:12]} is {cell['state'] or 'not run'}, not EXECUTED",
                    err=True,
                )
    if as_json:
        emit_json(done)
        return
    for d in done:
        label = f" (--name {d['name']})" if d["name"] is not None else ""
        click.echo(f"forgot {d['key'][:12]}{label}: {d['from_state']} → {d['to_state']}")
    if all_:
        click.echo(f"{len(done)} cell(s) forgotten")


@main.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as a JSON object.")
@click.pass_context
def stats_cmd(ctx: click.Context, as_json: bool) -> None:
    """Cells, replays, time saved and storage."""
    with opened(ctx) as store:
        s = report.stats(store)
    if as_json:
        emit_json(s)
        return
    st = s["storage"]
    states = ", ".join(f"{n} {state.lower()}" for state, n in sorted(s["by_state"].items()))
    rows = [
        ["file", f"{s['path']} ({fmt_bytes(st['file_bytes'])}, WAL {fmt_bytes(st['wal_bytes'])})"],
        ["cells", f"{s['cells']}" + (f" ({states})" if states else "")],
        ["executed", str(s["executed"])],
        ["transitions", str(s["transitions"])],
        ["hits", str(s["hits"])],
        ["time saved", fmt_duration(s["time_saved_s"])],
        ["blobs", f"{st['blobs']} ({fmt_bytes(st['blob_bytes'])})"],
        ["result JSON", fmt_bytes(st["result_json_bytes"])],
        ["unreferenced", f"{st['unreferenced_blobs']} blobs ({fmt_bytes(st['unreferenced_blob_bytes'])}; `rssd-magic gc` frees them)"],
    ]
    click.echo("\n".join(f"{k:<13}{v}" for k, v in rows))


@main.command("gc")
@click.option("--dry-run", is_flag=True, help="Only report what would be deleted.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def gc_cmd(ctx: click.Context, dry_run: bool, as_json: bool) -> None:
    """Delete blobs no cell's current EXECUTED record refers to.

    Only rows of rssd_magic_blob are deleted; SQLite reuses the freed pages
    (run VACUUM yourself to shrink the file).
    """
    with opened(ctx, write=not dry_run) as store:
        r = report.gc(store, dry_run=dry_run)
    if as_json:
        emit_json(r)
        return
    verb = "would free" if dry_run else "freed"
    click.echo(
        f"{verb} {r['deleted']} blob(s), {fmt_bytes(r['bytes_freed'])}; "
        f"kept {r['kept']} blob(s), {fmt_bytes(r['kept_bytes'])}"
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
