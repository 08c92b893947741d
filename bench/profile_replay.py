#!/usr/bin/env python
"""Profile the two replay paths of ``%%stateful`` (issue 6) and the first
recording of a large value (issue 17):

1. the trivial replay ``%%stateful\\nx = 1`` (thousands of replays),
2. the replay restoring a 200 MB float64 array (a few replays), and
3. the first recording of a new 200 MB array (a few recordings, a new
   array each time),

with pyinstrument (falling back to cProfile when it is not installed), and
print the hottest functions: a flat self-time list and the call tree.

Usage::

    python bench/profile_replay.py               # both
    python bench/profile_replay.py --only trivial
    python bench/profile_replay.py --only record   # first recordings
    python bench/profile_replay.py --cprofile    # force cProfile
    python bench/profile_replay.py --html DIR    # also save pyinstrument HTML

Not part of the pytest run.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import NullWriter, machine, machine_line  # noqa: E402

OUT = sys.__stdout__


def make_big(n):
    import numpy as np

    return np.random.default_rng(0).random(n)


def setup(workdir: Path, big_n: int):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "rssd_magic")
    magics = shell.magics_manager.registry["StatefulMagics"]
    magics.rssd_path = str(workdir / "profile.sqlite.db")
    shell.user_ns["make_big"] = make_big
    shell.user_ns["BIG_N"] = big_n
    return shell, magics


def run(shell, code: str) -> None:
    result = shell.run_cell(code)
    if not result.success:
        raise RuntimeError(f"cell failed: {code!r}: {result.error_before_exec or result.error_in_exec!r}")


def profile(label: str, fn, use_pyinstrument: bool, interval: float, top: int, html_dir: str | None) -> None:
    print(f"\n=== {label} ===", file=OUT, flush=True)
    saved = sys.stdout, sys.stderr
    if use_pyinstrument:
        from pyinstrument import Profiler
        from pyinstrument.renderers import ConsoleRenderer

        profiler = Profiler(interval=interval)
        sys.stdout = sys.stderr = NullWriter()
        try:
            profiler.start()
            wall = fn()
            profiler.stop()
        finally:
            sys.stdout, sys.stderr = saved
        print(f"(pyinstrument, interval {interval * 1e6:.0f} us; {wall})", file=OUT)
        flat = profiler.output(ConsoleRenderer(flat=True, flat_time="self", time="percent_of_total"))
        lines = flat.splitlines()
        # The header of the flat renderer, then the top N functions by self time.
        body = [ln for ln in lines if ln.strip()]
        print("-- hottest functions by self time --", file=OUT)
        print("\n".join(body[: top + 6]), file=OUT)
        print("-- call tree --", file=OUT)
        tree = profiler.output(ConsoleRenderer(show_all=False, time="percent_of_total", short_mode=False))
        print(tree, file=OUT)
        if html_dir:
            path = Path(html_dir) / (label.split(":")[0].replace(" ", "_") + ".html")
            path.write_text(profiler.output_html())
            print(f"saved {path}", file=OUT)
    else:
        prof = cProfile.Profile()
        sys.stdout = sys.stderr = NullWriter()
        try:
            prof.enable()
            wall = fn()
            prof.disable()
        finally:
            sys.stdout, sys.stderr = saved
        print(f"(cProfile; {wall})", file=OUT)
        for key in ("tottime", "cumulative"):
            s = io.StringIO()
            pstats.Stats(prof, stream=s).strip_dirs().sort_stats(key).print_stats(top)
            print(f"-- top {top} by {key} --", file=OUT)
            print(s.getvalue().split("\n\n", 1)[-1].rstrip(), file=OUT)
    OUT.flush()


def line_times(func, call, repeat: int):
    """Wall time spent on each line of *func* while ``call()`` runs, summed
    over *repeat* calls (a minimal line profiler on sys.settrace, traced in
    *func*'s own frames only; fine for functions with few, slow lines)."""
    import inspect
    import linecache

    code = getattr(func, "__code__", None)
    if code is None:
        return None
    spent: dict[int, float] = {}
    last: dict[int, tuple[int, float]] = {}  # frame id -> (line, since)
    clock = time.perf_counter

    def local(frame, event, arg):
        now = clock()
        prev = last.get(id(frame))
        if prev is not None:
            spent[prev[0]] = spent.get(prev[0], 0.0) + now - prev[1]
        if event == "return":
            last.pop(id(frame), None)
        else:
            last[id(frame)] = (frame.f_lineno, clock())
        return local

    def tracer(frame, event, arg):
        if frame.f_code is code:
            return local(frame, event, arg)
        return None

    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = NullWriter()
    old = sys.gettrace()
    try:
        for _ in range(repeat):
            sys.settrace(tracer)
            try:
                call()
            finally:
                sys.settrace(old)
    finally:
        sys.stdout, sys.stderr = saved
    total = sum(spent.values()) or 1.0
    path = inspect.getsourcefile(func)
    rows = []
    for line in sorted(spent):
        text = linecache.getline(path, line).rstrip()
        rows.append(f"{spent[line] / repeat * 1e3:9.1f} ms {spent[line] / total * 100:5.1f}%  {line:4d}  {text}")
    return f"{func.__qualname__} ({path}), per call, {repeat} calls:\n" + "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("trivial", "big", "record"), help="profile one path only")
    ap.add_argument("--cprofile", action="store_true", help="use cProfile even if pyinstrument is installed")
    ap.add_argument("--replays", type=int, default=3000, help="trivial replays to profile (default 3000)")
    ap.add_argument("--big-mb", type=int, default=200, help="array size for the big replay (default 200)")
    ap.add_argument("--big-replays", type=int, default=3, help="big replays to profile (default 3)")
    ap.add_argument("--recordings", type=int, default=3, help="first recordings to profile (default 3)")
    ap.add_argument("--top", type=int, default=20, help="functions to list (default 20)")
    ap.add_argument("--html", metavar="DIR", help="also save pyinstrument HTML reports in DIR")
    args = ap.parse_args(argv)

    try:
        import pyinstrument  # noqa: F401

        use_pyi = not args.cprofile
    except ImportError:
        print("pyinstrument is not installed (pip install -e '.[bench]'); using cProfile", file=OUT)
        use_pyi = False

    print(machine_line(machine()), file=OUT)
    workdir = Path(tempfile.mkdtemp(prefix="rssd-profile-"))
    try:
        shell, magics = setup(workdir, args.big_mb * 1_000_000 // 8)
        trivial = "%%stateful\nx = 1"
        big = "%%stateful\nbig = make_big(BIG_N)"
        saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = NullWriter()
        try:
            run(shell, trivial)  # record
            for _ in range(200):  # warm up
                run(shell, trivial)
            if args.only in (None, "big"):
                run(shell, big)  # record
                run(shell, big)  # one warm replay: page cache warm
        finally:
            sys.stdout, sys.stderr = saved

        if args.only in (None, "trivial"):
            n = args.replays

            def trivial_loop():
                t0 = time.perf_counter()
                for _ in range(n):
                    run(shell, trivial)
                dt = time.perf_counter() - t0
                return f"{n} replays, {dt / n * 1e3:.3f} ms each under the profiler"

            profile("trivial replay: %%stateful x = 1", trivial_loop, use_pyi, 0.0001, args.top, args.html)

        if args.only in (None, "big"):
            n = args.big_replays

            def big_loop():
                t0 = time.perf_counter()
                for _ in range(n):
                    run(shell, big)
                dt = time.perf_counter() - t0
                return f"{n} replays of {args.big_mb} MB, {dt / n * 1e3:.1f} ms each under the profiler"

            from rssd_magic.backends import sqlite_blobs

            profile(f"big replay: {args.big_mb} MB float64 array", big_loop, use_pyi, 0.001, args.top, args.html)
            # pyinstrument can't split a function's own time between its
            # lines; for the blob reader that split is the whole story.
            report = line_times(sqlite_blobs._read, lambda: run(shell, big), n)
            if report:
                print("\n-- line times inside " + report, file=OUT, flush=True)

        if args.only in (None, "record"):
            n = args.recordings
            run(shell, "import numpy as np")
            # One cell text (so the profile adds its runs up); K, which its
            # key fingerprints, makes each run a first recording of new data.
            body = "%%stateful --quiet\nfresh = np.arange(BIG_N, dtype='float64') + K"

            def record_loop():
                t0 = time.perf_counter()
                for _ in range(n):
                    shell.user_ns["K"] += 1
                    run(shell, body)
                dt = time.perf_counter() - t0
                return f"{n} first recordings of {args.big_mb} MB, {dt / n * 1e3:.1f} ms each under the profiler"

            shell.user_ns["K"] = 0
            run(shell, body)  # warm-up
            profile(f"first recording: {args.big_mb} MB float64 array", record_loop, use_pyi, 0.001, args.top, args.html)
        magics.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
