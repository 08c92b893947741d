"""Shared helpers for the benchmarks in this folder (not part of the package,
not collected by pytest): machine description, interleaved timing, the
result table."""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"

# The benchmarks measure the code beside them (this checkout's src/), even
# when the editable install points at another copy; RSSD_BENCH_INSTALLED=1
# measures whatever ``import rssd_magic`` finds instead.
USE_CHECKOUT = os.environ.get("RSSD_BENCH_INSTALLED") != "1" and (SRC / "rssd_magic").is_dir()
if USE_CHECKOUT and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


def child_env(extra: dict | None = None) -> dict:
    """Environment for child processes (kernels) importing the same code."""
    env = {**os.environ, **(extra or {})}
    if USE_CHECKOUT:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    return env

# Stored values are signed (issue 5): a fixed team key, and a Jupyter data
# directory of the benchmarks' own, keep them from creating key files in
# yours (each person's signing key is made there on first use, issue 22).
# Kernels started by bench_waiters inherit both.
os.environ.setdefault("RSSD_MAGIC_SECRET", "rssd-magic-bench-key")
os.environ.setdefault("JUPYTER_DATA_DIR", tempfile.mkdtemp(prefix="rssd-bench-jupyter-"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "src"], capture_output=True, text=True
        ).stdout.strip()
        return rev + ("+dirty(src)" if dirty else "")
    except Exception:  # noqa: BLE001
        return "?"


def machine() -> dict:
    import IPython

    import rssd_magic

    pkg = Path(rssd_magic.__file__).resolve().parent
    try:
        pkg.relative_to(REPO / "src")
        rev = git_rev()
    except ValueError:  # imported from elsewhere (PYTHONPATH=an exported snapshot)
        rev = f"(not this checkout: {pkg})"
    info = {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "ipython": IPython.__version__,
        "rssd_magic": rssd_magic.__version__,
        "git": rev,
    }
    for mod in ("numpy", "joblib", "pyinstrument"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    return info


def loadavg() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average ?"


def machine_line(info: dict) -> str:
    return (
        f"machine: {info['nproc']} CPU(s), {info['cpu']}; Python {info['python']}, SQLite {info['sqlite']}, "
        f"IPython {info['ipython']}, numpy {info.get('numpy', '-')}, joblib {info.get('joblib', '-')}; "
        f"rssd_magic {info['rssd_magic']} @ {info['git']}; {loadavg()} at start"
    )


def interleaved(
    variants: dict[str, Callable[[], object]],
    rounds: int,
    setup: dict[str, Callable[[], object]] | None = None,
) -> dict[str, list[float]]:
    """Time each variant once per round, in turn (A, B, C, A, B, C, ...):
    drift (thermal, page cache, other load) hits every variant alike.
    ``setup[name]``, if given, runs untimed just before each call of *name*.
    Returns per-call seconds for each variant."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    setup = setup or {}
    clock = time.perf_counter
    for _ in range(rounds):
        for name, fn in variants.items():
            if name in setup:
                setup[name]()
            t0 = clock()
            fn()
            samples[name].append(clock() - t0)
    return samples


def summary(xs: list[float]) -> dict:
    xs_sorted = sorted(xs)
    return {
        "n": len(xs),
        "median": statistics.median(xs),
        "mean": statistics.fmean(xs),
        "p10": xs_sorted[int(0.1 * (len(xs) - 1))],
        "p90": xs_sorted[int(0.9 * (len(xs) - 1))],
        "p99": xs_sorted[int(0.99 * (len(xs) - 1))],
        "min": xs_sorted[0],
        "max": xs_sorted[-1],
    }


@dataclass
class Row:
    """One line of the result table."""

    figure: str
    ours: str
    peer: str
    compare: str  # the difference or ratio the target is about
    target: str
    verdict: str  # PASS / MISS / info
    data: dict = field(default_factory=dict)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def verdict(value: float, limit: float) -> str:
    return "PASS" if value <= limit else "MISS"


def print_table(rows: list[Row], out=None) -> None:
    head = ("figure", "ours", "peer", "ours vs peer / plain", "target", "")
    text_table(head, [(r.figure, r.ours, r.peer, r.compare, r.target, r.verdict) for r in rows], out)


def text_table(head: tuple[str, ...], rows: list[tuple[str, ...]], out=None) -> None:
    """*rows* under *head* in aligned columns between rules."""
    out = out or sys.__stdout__
    cols = [head, *rows]
    widths = [max(len(c[i]) for c in cols) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)
    print(line, file=out)
    for i, c in enumerate(cols):
        print("  ".join(s.ljust(w) for s, w in zip(c, widths)).rstrip(), file=out)
        if i == 0:
            print(line, file=out)
    print(line, file=out)
    out.flush()


def report(rows: list[Row], started: float, *, quick: bool, json_path: str | None, info: dict, raw: dict) -> None:
    """The end of a bench run: the table, the time, the load, the missed
    targets, and the raw samples as JSON when asked."""
    out = sys.__stdout__
    print_table(rows, out)
    missed = [r.figure for r in rows if r.verdict == "MISS"]
    print(f"total {time.perf_counter() - started:.0f} s; {loadavg()} at end; "
          + (f"MISSED: {', '.join(missed)}" if missed else "all targets met"), file=out)  # fmt: skip
    if quick:
        print("(--quick: smaller values and fewer rounds; a smoke run, not the figures of record)", file=out)
    if json_path:
        save_json(json_path, {"machine": info, "quick": quick, "rows": rows, "raw": raw})
        print(f"saved {json_path}", file=out)


def save_json(path: str, payload: dict) -> None:
    def default(o):
        return asdict(o) if isinstance(o, Row) else str(o)

    Path(path).write_text(json.dumps(payload, indent=2, default=default) + "\n")


class NullWriter:
    """A text sink standing in for the notebook's output channel while timing:
    everything is accepted and thrown away (the same for every variant)."""

    encoding = "utf-8"

    def write(self, text: str) -> int:
        return len(text)

    def writelines(self, lines) -> None:
        pass

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def record_run(backend, key, source: str, result: dict | str, blobs=()):
    """Record one EXECUTED run of a cell through the backend's public API,
    as ``%%stateful`` does: claim it, then finish it with its blobs."""
    from rssd_magic.store.base import ClaimRequest
    from rssd_magic.records.canonical import dumps
    from rssd_magic.engine.claims import current_holder
    from rssd_magic.engine.lifecycle import EXECUTED

    request = ClaimRequest(
        key, source, {"source": source, "code_hash": key.code_hash}, current_holder(backend.session_id or ""), 60.0
    )
    outcome = backend.claim(request)
    if outcome.kind != "run":
        raise RuntimeError(f"cannot record {key.digest[:12]}: claim says {outcome.kind}")
    text = result if isinstance(result, str) else dumps(result)
    return backend.finish(outcome.running, outcome.claim.token, EXECUTED, text, "completed", blobs)


def files_bytes(db: Path) -> int:
    """Bytes the RSSD takes on disk: the file and its ``-wal`` (allocated
    blocks, or the size when larger)."""
    total = 0
    for path in (db, Path(str(db) + "-wal")):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        total += max(st.st_size, st.st_blocks * 512)
    return total


class DiskSampler:
    """Samples :func:`files_bytes` in a thread every *every* seconds while
    in a ``with`` block; ``peak`` is the largest value seen (also sampled
    once at entry and exit)."""

    def __init__(self, db: Path, every: float = 0.002):
        import threading

        self.db, self.every = db, every
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.peak = max(self.peak, files_bytes(self.db))
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> "DiskSampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
