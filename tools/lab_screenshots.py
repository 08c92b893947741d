#!/usr/bin/env python
"""Screenshots of what a person sees in JupyterLab: a notebook run twice in
a real JupyterLab, driven by headless Chromium, in the light and the dark
theme (the second run replays: banners, notes, untrusted records).

Not part of the tests: a look by eye before calling a change to what the
notebook shows done.  Needs ``apt-get install chromium`` and ``pip install
playwright jupyterlab``::

    python tools/lab_screenshots.py OUTDIR [NOTEBOOK]

Writes ``OUTDIR/{light,dark}-{first,replay}.png``.  NOTEBOOK defaults to a
small one of its own (a cell that prints, shows a table and binds a value;
one that fails; one that reads a value another cell changed).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CELLS = [
    "%load_ext rssd_magic",
    "%%stateful\nimport pandas as pd\nprint('training…')\nscores = pd.DataFrame({'model': ['a', 'b'], 'score': [0.91, 0.93]})\nscores",
    "%%stateful --name load_once\nrows = 1234\nprint(f'loaded {rows} rows')",
    "results = []",
    "%%stateful\nresults.append(0.93)\nprint('appended')",
    "%stateful list",
]
THEMES = {"light": "JupyterLab Light", "dark": "JupyterLab Dark"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def notebook(path: Path, cells: list[str]) -> None:
    nb = {
        "cells": [{"cell_type": "code", "metadata": {}, "source": c, "outputs": [], "execution_count": None} for c in cells],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(nb, indent=1))


def start_lab(root: Path, theme: str) -> tuple[subprocess.Popen, str]:
    settings = root / ".lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "themes.jupyterlab-settings").write_text(json.dumps({"theme": theme}))
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    port = free_port()
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(root / ".lab-settings")}
    lab = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}", "--ip=127.0.0.1",
         "--ServerApp.token=", "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True",
         f"--ServerApp.root_dir={root}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/api", timeout=2)
            return lab, url
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def dismiss(page) -> None:
    """The kernel chooser and the news toast JupyterLab shows at first."""
    for selector in ("button.jp-mod-accept:has-text('Select')", "button:has-text('No')"):
        try:
            page.click(selector, timeout=3_000)
        except Exception:  # noqa: BLE001 - not shown this time
            pass


def run_all_and_shoot(page, url: str, name: str, out: Path) -> None:
    page.goto(f"{url}/lab/tree/{name}")
    page.wait_for_selector(".jp-Notebook", timeout=60_000)
    dismiss(page)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
    page.click("text=Run", timeout=10_000)
    page.click("text=Run All Cells", timeout=10_000)
    time.sleep(1)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
    time.sleep(1.5)
    dismiss(page)
    page.screenshot(path=str(out), full_page=True)


def main() -> None:
    out = Path(sys.argv[1]).absolute()
    out.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    for label, theme in THEMES.items():
        root = Path(tempfile.mkdtemp(prefix="rssd-lab-"))
        if len(sys.argv) > 2:
            shutil.copy(sys.argv[2], root / "shots.ipynb")
        else:
            notebook(root / "shots.ipynb", CELLS)
        lab, url = start_lab(root, theme)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(
                    executable_path="/usr/bin/chromium",
                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                          "--disable-sync", "--no-first-run"],
                )  # fmt: skip
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                run_all_and_shoot(page, url, "shots.ipynb", out / f"{label}-first.png")
                page.click("text=Kernel", timeout=10_000)
                page.click("text=Restart Kernel…", timeout=10_000)
                page.click("button.jp-mod-accept", timeout=10_000)
                time.sleep(2)
                run_all_and_shoot(page, url, "shots.ipynb", out / f"{label}-replay.png")
                browser.close()
        finally:
            os.killpg(lab.pid, 15)
            lab.wait(timeout=20)
            shutil.rmtree(root, ignore_errors=True)
        print(f"wrote {out / (label + '-first.png')} and {out / (label + '-replay.png')}")


if __name__ == "__main__":
    main()
