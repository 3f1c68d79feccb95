"""JupyterLab and the Dask panel in a real browser (Debian's Chromium, driven by Playwright).

A person's path through the panel, against the simulator: NEW (the card comes with the
scheduler and counts its worker up), SCALE through the dialog, a dashboard pane through the
Jupyter server's proxy, the "<>" code run unchanged in a notebook's kernel, a computation,
SHUTDOWN; then a second cluster and SIGTERM on the Jupyter server. Each step leaves a screenshot in the test's temporary directory
(``screenshots/``) for a person to look at.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
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
# New panel clusters start one worker, added after the constructor returns (see docs/jupyterlab.md).
PANEL_ENV = {"DASK_LABEXTENSION__DEFAULT__WORKERS": "1"}


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
    lab = Lab(sim, tmp_path, name=NAME, extra_env=PANEL_ENV)
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
        # SIGTERM while the second cluster's worker may still be provisioning.
        assert f"{NAME}-scheduler" in server_names(sim)
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
    is_new = lambda r: r.request.method == "PUT" and r.url.split("?")[0].endswith("/dask/clusters")  # noqa: E731
    with page.expect_response(is_new, timeout=180_000) as put:
        page.get_by_title("Start New Dask Cluster").click()
    model = put.value.json()
    # The card comes as soon as the scheduler runs (labextension.default.workers: 1 is a
    # scale after the constructor): the worker's server joins in the background.
    assert model["workers"] == 0, model
    address = model["scheduler_address"]
    assert address.startswith("hetzner://127.0.0.1:") and address.endswith(f"/{NAME}"), model
    card = page.locator(".dask-ClusterListingItem")
    card.wait_for()
    steps.shot("new-cluster")
    wait_for_card(page, lab, "Number of Workers: 1")
    assert server_names(sim) == {f"{NAME}-scheduler", f"{NAME}-worker-0"}
    steps.shot("counted-up")

    # SCALE to 2: the second worker boots while the steps below run.
    card.locator(".dask-ClusterListingItem-scale").click()
    dialog = page.locator(".jp-Dialog")
    dialog.locator(".dask-ScalingInput").first.fill("2")
    steps.shot("scale-dialog")
    dialog.locator("button.jp-mod-accept").click()

    # A dashboard pane, through the Jupyter server's proxy.
    card.click()
    button = page.locator(".dask-DashboardListing-item button", has_text="Task Stream")
    button.click()
    frame = page.frame_locator("iframe").first
    frame.locator(".bk-Canvas, canvas, .bk-root, div").first.wait_for(timeout=60_000)
    src = page.locator("iframe").first.get_attribute("src") or ""
    assert "/dask/dashboard/" in src, src
    steps.shot("dashboard-pane")

    # The "<>" code, inserted into the notebook and run as it is, in the kernel.
    page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab", has_text="demo.ipynb").click()
    card.locator(".dask-ClusterListingItem-code").click()
    cells = page.locator(".jp-Notebook .jp-Cell")
    inserted = cells.first.inner_text()
    assert f'client = Client("{address}")' in inserted, inserted
    steps.shot("inserted-snippet")
    cells.first.locator(".cm-content").click()
    page.keyboard.press("Shift+Enter")
    cells.first.locator(".jp-OutputArea-output").first.wait_for(timeout=120_000)
    shown = cells.first.locator(".jp-OutputArea").inner_text()
    # The Client's widget: no error, and the cluster's live dashboard link.
    assert model["dashboard_link"] in shown and "Error" not in shown, shown
    cells.nth(1).locator(".cm-content").click()
    page.keyboard.insert_text("client.submit(sum, [40, 2]).result()")
    page.keyboard.press("Shift+Enter")
    cells.nth(1).locator(".jp-OutputArea-output", has_text="42").wait_for(timeout=120_000)
    steps.shot("computed")

    # The widget's "Launch dashboard in JupyterLab": the sidebar takes the client's link,
    # which the Jupyter server finds alive (a dead one left "Dashboard not connected").
    link = model["dashboard_link"]
    base = link.removesuffix("status")  # what the sidebar checks: the link without its page
    is_check = lambda r: "/dask/dashboard-check/" in r.url and base in urllib.parse.unquote(r.url)  # noqa: E731
    with page.expect_response(is_check, timeout=60_000) as check:
        cells.first.locator("button", has_text="Launch dashboard in JupyterLab").click()
    assert check.value.json()["isActive"] is True, check.value.json()
    assert page.locator(".dask-URLInput input").input_value().startswith(base)
    page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab", has_text="Workers Memory").wait_for(timeout=60_000)
    steps.shot("dashboard-layout")

    wait_for_card(page, lab, "Number of Workers: 2")
    assert server_names(sim) == {f"{NAME}-scheduler", f"{NAME}-worker-0", f"{NAME}-worker-1"}
    steps.shot("two-workers")

    card.locator(".dask-ClusterListingItem-stop").click()
    page.locator(".dask-ClusterListingItem").wait_for(state="detached", timeout=180_000)
    assert server_names(sim) == set() and sim.leaks() == {}
    steps.shot("shut-down")


def wait_for_card(page, lab: Lab, text: str) -> None:
    """The card's counts, refreshed by the panel's own polling (every 5 s), bounded."""
    deadline = time.monotonic() + 180
    while text not in card_workers(page):
        assert time.monotonic() < deadline, f"the card never shows {text!r}: {card_workers(page)!r}\n{lab.tail()}"
        page.wait_for_timeout(500)
