"""FdTee on its own: fds 1 and 2 redirected, read by the process's one
reader thread.  Each scenario runs in a child process with a deadline, so a
capture that blocks fails the test instead of hanging the run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rssd_magic.output import fdcapture

SRC = str(Path(__file__).resolve().parents[1] / "src")

pytestmark = pytest.mark.skipif(not fdcapture.supported(), reason="fd capture needs POSIX pipes and dup2")

PRELUDE = """
import json, os, sys
sys.path.insert(0, {src!r})
from rssd_magic.output.fdcapture import FdTee

def tee(*fds):
    got = []
    t = FdTee(lambda name, text: got.append((name, text)))
    for fd in fds:
        t.redirect(fd, {{1: "stdout", 2: "stderr"}}[fd])
    t.start()
    return t, got

def text(got, name="stdout"):
    return "".join(t for n, t in got if n == name)

def threads():
    return len(os.listdir("/proc/self/task"))
"""


def run(body: str, shown: list | None = None) -> dict:
    """Run *body* (after the prelude) in a fresh interpreter; it prints one
    JSON line to stderr (fd 1 is what it captures; what reached the real fd
    1 is appended to *shown*).  30 s at most."""
    code = PRELUDE.format(src=SRC) + textwrap.dedent(body)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    if shown is not None:
        shown.append(done.stdout)
    return json.loads(done.stderr.strip().splitlines()[-1])


def test_more_than_a_pipe_holds_is_read_while_the_cell_writes():
    # 1 MB to fd 1 with no Python-level write between: only the reader
    # thread can empty the pipe (64 KiB) so the write completes.
    out = run("""
        t, got = tee(1, 2)
        os.write(1, b"x" * 1_000_000 + b"\\n")
        os.write(2, b"to stderr\\n")
        t.stop()
        sys.stderr.write(json.dumps({"out": len(text(got)), "err": text(got, "stderr")}) + "\\n")
    """)
    assert out == {"out": 1_000_001, "err": "to stderr\n"}


def test_one_reader_thread_serves_every_cell():
    out = run("""
        before = threads()
        counts = []
        for i in range(40):
            t, got = tee(1, 2)
            os.write(1, b"cell %d\\n" % i)
            t.stop()
            assert text(got) == "cell %d\\n" % i, got
            counts.append(threads())
        sys.stderr.write(json.dumps({"before": before, "counts": sorted(set(counts))}) + "\\n")
    """)
    assert out["counts"] == [out["before"] + 1]


def test_a_tee_inside_a_tee_hands_its_bytes_to_the_outer_one_in_order():
    # The inner tee's saved fd is the outer tee's pipe: the shared reader
    # thread must not block writing into a pipe only it reads.
    out = run("""
        outer, outer_got = tee(1)
        os.write(1, b"outer before\\n")
        inner, inner_got = tee(1)
        os.write(1, b"z" * 300_000 + b"\\n")
        inner.stop()
        os.write(1, b"outer after\\n")
        outer.stop()
        o = text(outer_got)
        sys.stderr.write(json.dumps({"inner": len(text(inner_got)), "outer": len(o),
                                     "head": o[:13], "tail": o[-12:]}) + "\\n")
    """)
    assert out == {"inner": 300_001, "outer": 300_026, "head": "outer before\n", "tail": "outer after\n"}


def test_a_forked_child_captures_with_a_reader_of_its_own():
    # Threads don't survive fork: the child's tees need their own reader.
    out = run("""
        t, got = tee(1)
        t.stop()
        pid = os.fork()
        if pid == 0:
            t2, got2 = tee(1)
            os.write(1, b"y" * 200_000)
            t2.stop()
            os._exit(0 if len(text(got2)) == 200_000 else 3)
        _, status = os.waitpid(pid, 0)
        sys.stderr.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\\n")
    """)
    assert out == {"status": 0}


def test_a_background_child_is_forwarded_after_the_cell_not_recorded():
    shown: list = []
    out = run("""
        import subprocess, time
        t, got = tee(1)
        child = subprocess.Popen(["sh", "-c", "echo early; sleep 0.3; echo late"])
        deadline = time.monotonic() + 10
        while "early" not in text(got) and time.monotonic() < deadline:  # recorded before the cell ends
            time.sleep(0.01)
        t.stop()
        child.wait()
        # Until the reader thread has forwarded all the child wrote and seen
        # its pipe close (not a fixed sleep: CI machines are loaded).
        deadline = time.monotonic() + 10
        while not all(ch.eof for ch in t._channels) and time.monotonic() < deadline:
            time.sleep(0.01)
        sys.stderr.write(json.dumps({"recorded": text(got)}) + "\\n")
    """, shown)
    assert out == {"recorded": "early\n"}
    assert shown == ["early\nlate\n"], "what the child wrote after the cell still reached the terminal"
