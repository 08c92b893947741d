"""Kernel tier for large values in a bucket: real kernels, each its own
process, configured only through the environment a team would set
(``RSSD_MAGIC_BLOBS``, AWS's variables).  The first kernel records a large
array into the bucket; a second one on "another machine" (its own blob
cache) replays it from there; the RSSD holds the record, not the bytes."""

from __future__ import annotations

import pytest

from kernel_util import banners, execute, query, text_of
from s3_util import s3_env, s3_url, weed_server  # noqa: F401 - fixtures

pytestmark = pytest.mark.kernel

CELLS = [
    "%load_ext rssd_magic",
    "%%stateful\nimport numpy as np\nprint('computed')\nopen('runs.log', 'a').write('ran\\n')\nbig = np.arange(2_000_000, dtype='float64')",
    "print(float(big.sum()), big.dtype)",
]


def test_a_kernel_records_into_the_bucket_and_another_machines_kernel_replays_from_it(s3_url, tmp_path, monkeypatch):
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)  # ipykernel stops forwarding fd output under it
    monkeypatch.setenv("RSSD_MAGIC_BLOBS", s3_url)
    first = execute(CELLS, tmp_path, env={"RSSD_MAGIC_BLOB_CACHE": str(tmp_path / "cache-a")})
    assert text_of(first.cells[1], "stdout") == "computed\n"
    assert text_of(first.cells[2]) == f"{float(sum(range(2_000_000)))} float64\n"
    db = tmp_path / "resource-surveillance.sqlite.db"
    assert query(db, "SELECT count(*) FROM rssd_magic_blob WHERE size >= 1048576") == [(0,)], "the bytes are in the bucket"
    (text,) = query(db, "SELECT transition_result FROM orchestration_session_state WHERE to_state = 'EXECUTED'")[0]
    assert f'"blob_store":"{s3_url}"' in text.replace(" ", "")
    monkeypatch.delenv("RSSD_MAGIC_BLOBS")  # the teammate set nothing: the record says where
    second = execute(CELLS, tmp_path, env={"RSSD_MAGIC_BLOB_CACHE": str(tmp_path / "cache-b")})
    assert banners(second.cells[1]) and text_of(second.cells[1], "stdout") == "computed\n", "replayed, output and all"
    assert (tmp_path / "runs.log").read_text() == "ran\n", "the body ran once"
    assert text_of(second.cells[2]) == f"{float(sum(range(2_000_000)))} float64\n"
    assert list((tmp_path / "cache-b").rglob("*")), "read from the bucket into this machine's cache"
