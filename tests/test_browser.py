"""JupyterLab and the Dask panel in a real browser (Debian's Chromium, driven by Playwright).

A person's path through the panel, against the simulator: NEW, the card counts the
workers, SCALE through the dialog, a dashboard pane through the Jupyter server's proxy, the
"<>" code in a notebook, a computation, SHUTDOWN; then a second cluster and SIGTERM on the
Jupyter server. Each step leaves a screenshot in the test's temporary directory
(``screenshots/``) for a person to look at.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (pip install 'dask-hetzner[jupyter]')")
pytest.importorskip("dask_labextension", reason="dask-labextension is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("Debian's chromium is not installed (.ci/debian-packages.txt)", allow_module_level=True)

from test_jupyter import Lab, server_names  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

NAME = "lab3"
CONNECT = f'import dask_hetzner\nclient = dask_hetzner.connect("{NAME}")\nclient.submit(sum, [40, 2]).result()'


def notebook(path: Path) -> None:
    cell = {"cell_type": "code", "source": "", "metadata": {}, "outputs": [], "execution_count": None}
    nb = {
        "cells": [cell],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(nb))


class Steps:
    """Screenshots numbered in the order taken."""

    def __init__(self, page, directory: Path) -> None:
        self.page, self.directory, self.n = page, directory, 0
        directory.mkdir(parents=True, exist_ok=True)

    def shot(self, what: str) -> None:
        self.n += 1
        self.page.screenshot(path=str(self.directory / f"{self.n:02d}-{what}.png"))


def card_workers(page) -> str:
    return page.locator(".dask-ClusterListingItem").first.inner_text()


def test_panel_in_a_browser(sim, tmp_path):
    notebook(tmp_path / "demo.ipynb")
    lab = Lab(sim, tmp_path, name=NAME)
    try:
        lab.wait_ready()
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)
            steps = Steps(page, tmp_path / "screenshots")
            try:
                panel_flow(page, steps, lab, sim)
                # Second run: a panel cluster running when the Jupyter server is stopped.
                page.get_by_title("Start New Dask Cluster").click()
                page.locator(".dask-ClusterListingItem").wait_for(timeout=180_000)
                steps.shot("second-cluster-before-sigterm")
            except Exception:
                steps.shot("failure")
                raise
            finally:
                browser.close()
        assert server_names(sim) == {f"{NAME}-scheduler"}
        lab.proc.send_signal(signal.SIGTERM)
        try:
            lab.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"jupyter did not exit within 90 s of SIGTERM:\n{lab.tail()}") from None
        assert server_names(sim) == set() and sim.leaks() == {}, lab.tail()
        assert "still running" not in lab.tail()
    finally:
        lab.stop()


def panel_flow(page, steps: Steps, lab: Lab, sim) -> None:
    page.goto(f"{lab.base}/lab/tree/demo.ipynb?token={lab.token}")
    page.locator('.jp-SideBar [data-id="dask-dashboard-launcher"]').click()
    steps.shot("panel")
    page.get_by_title("Start New Dask Cluster").click()
    card = page.locator(".dask-ClusterListingItem")
    card.wait_for(timeout=180_000)
    assert server_names(sim) == {f"{NAME}-scheduler"}
    steps.shot("new-cluster")

    card.locator(".dask-ClusterListingItem-scale").click()
    dialog = page.locator(".jp-Dialog")
    dialog.locator(".dask-ScalingInput").first.fill("1")
    steps.shot("scale-dialog")
    dialog.locator("button.jp-mod-accept").click()
    deadline = time.monotonic() + 180
    while "Number of Workers: 1" not in card_workers(page):
        assert time.monotonic() < deadline, f"the card shows no worker: {card_workers(page)!r}\n{lab.tail()}"
        page.wait_for_timeout(500)
    assert server_names(sim) == {f"{NAME}-scheduler", f"{NAME}-worker-0"}
    steps.shot("one-worker")

    # A dashboard pane, through the Jupyter server's proxy.
    card.click()
    button = page.locator(".dask-DashboardListing-item button", has_text="Task Stream")
    button.click()
    frame = page.frame_locator("iframe").first
    frame.locator(".bk-Canvas, canvas, .bk-root, div").first.wait_for(timeout=60_000)
    src = page.locator("iframe").first.get_attribute("src") or ""
    assert "/dask/dashboard/" in src, src
    steps.shot("dashboard-pane")

    # The "<>" code, inserted into the notebook, then the one line that connects.
    page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab", has_text="demo.ipynb").click()
    card.locator(".dask-ClusterListingItem-code").click()
    inserted = page.locator(".jp-Notebook .jp-Cell").first.inner_text()
    assert 'client = Client("tls://127.0.0.1:' in inserted, inserted
    steps.shot("inserted-snippet")
    editor = page.locator(".jp-Notebook .jp-Cell .cm-content").first
    editor.click()
    page.keyboard.press("Control+a")
    page.keyboard.insert_text(CONNECT)
    page.keyboard.press("Shift+Enter")
    page.locator(".jp-OutputArea-output", has_text="42").first.wait_for(timeout=120_000)
    steps.shot("computed")

    card.locator(".dask-ClusterListingItem-stop").click()
    page.locator(".dask-ClusterListingItem").wait_for(state="detached", timeout=180_000)
    assert server_names(sim) == set() and sim.leaks() == {}
    steps.shot("shut-down")
