"""A kernel's start among sessions other machines' killed kernels left open
(issue 24): on a shared PostgreSQL server they pile up, since only their own
machine can tell they are dead.  Every start closes this machine's orphans
(claims.close_orphaned_sessions); this times that step with N such sessions
on the server, the store picking this boot's sessions (now) beside reading
and judging all of them (before), interleaved, on a local pgserver.

    python bench/bench_sessions.py [--sessions 20000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import _common  # noqa: F401 - measures this checkout's src/
from _common import REPO, loadavg

sys.path.insert(0, str(REPO / "tests"))

import psycopg  # noqa: E402
from pg_util import fresh_url, raw  # noqa: E402

from rssd_magic.backends import open_backend  # noqa: E402
from rssd_magic.engine import claims  # noqa: E402


class ReadsAll:
    """The store as the start used it before: every open session listed."""

    def __init__(self, store):
        self.store, self.session_id = store, store.session_id

    def open_sessions(self, boot=None):
        return self.store.open_sessions()

    def end_session(self, *args, **kw):
        return self.store.end_session(*args, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    print(f"{loadavg()} at start")
    url = fresh_url("bench")
    store = open_backend(url, session_args={"bench": "sessions"})
    store.flush_hits()  # its session row is written
    (row,) = raw(url, "SELECT elaboration FROM orchestration_session WHERE orchestration_session_id = ?", (store.session_id,))
    elaboration = json.loads(row[0])
    elaboration["holder"].update(boot="another-machine-boot", machine="another-machine")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO orchestration_session (orchestration_session_id, device_id, orchestration_nature_id, version,
                                                  orch_started_at, elaboration)
               SELECT 'other-' || g, device_id, orchestration_nature_id, version, orch_started_at, %s
               FROM orchestration_session, generate_series(1, %s) AS g WHERE orchestration_session_id = %s""",
            (json.dumps(elaboration), args.sessions, store.session_id),
        )
    before, now = [], []
    for _ in range(args.rounds):
        for out, which in ((before, ReadsAll(store)), (now, store)):
            start = time.perf_counter()
            claims.close_orphaned_sessions(which)
            out.append((time.perf_counter() - start) * 1e3)
    store.close()
    b, n = statistics.median(before), statistics.median(now)
    print(f"{args.sessions:,} sessions of another machine left open; a kernel start's orphan step, median of {args.rounds}:")
    print(f"  every open session read and judged (before): {b:.1f} ms [{min(before):.1f}-{max(before):.1f}]")
    print(f"  this boot's picked by the store (now):       {n:.1f} ms [{min(now):.1f}-{max(now):.1f}]  ({b / n:.1f}x less)")
    print(f"{loadavg()} at end")


if __name__ == "__main__":
    main()
