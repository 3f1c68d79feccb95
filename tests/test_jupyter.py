"""JupyterLab: dask-labextension makes, scales, adapts, lists and closes HetznerClusters.

The extension builds clusters from ``labextension.factory`` inside the Jupyter server's
event loop: HetznerCluster must take everything from dask.config/env and never block it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import dask
import pytest
from support import StallProbe, free_port, sdk

pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (pip install 'dask-hetzner[jupyter]')")
pytest.importorskip(
    "dask_labextension", reason="dask-labextension is not installed (pip install 'dask-hetzner[jupyter]')"
)

# A whole Jupyter server plus clusters: more than the default bound on a loaded machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

LAB_CONFIG = {
    "labextension": {
        "initial": [],
        "default": {},
        "factory": {"module": "dask_hetzner", "class": "HetznerCluster", "args": [], "kwargs": {}},
    }
}


def server_names(sim) -> set[str]:
    client = sdk(sim)
    return {s.name for s in client.servers.get_all()}


async def until(cond, *, timeout: float, what: str) -> None:
    """Poll a (sync) condition off the loop with a bound; the failure says what was awaited."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(cond):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.2)


async def test_labextension_cluster_manager(sim):
    """dask-labextension's own manager: start from config, scale, adapt, list, close."""
    import aiohttp
    from dask_labextension.manager import DaskClusterManager

    async with StallProbe() as probe:
        with dask.config.set({**LAB_CONFIG, "hetzner.name": "lab1"}):
            async with DaskClusterManager() as manager:
                model = await manager.start_cluster(configuration={"name": "Hetzner"})
                cid = model["id"]
                assert model["name"] == "Hetzner"
                assert model["workers"] == 0
                assert model["dashboard_link"].startswith("http://127.0.0.1:")
                assert await asyncio.to_thread(server_names, sim) == {"lab1-scheduler"}
                # The extension proxies the dashboard from the Jupyter server's host: it answers.
                async with aiohttp.ClientSession() as http:
                    link = model["dashboard_link"].removesuffix("/status")
                    async with http.get(f"{link}/individual-plots.json") as r:
                        assert r.status == 200
                        assert await r.json()

                model = await manager.scale_cluster(cid, 1)
                await until(
                    lambda: manager.get_cluster(cid)["workers"] == 1
                    and server_names(sim) == {"lab1-scheduler", "lab1-worker-0"},
                    timeout=180,
                    what="one worker through the extension's scale",
                )

                model = manager.adapt_cluster(cid, 0, 2)
                assert model["adapt"] == {"minimum": 0, "maximum": 2}
                # Nothing to do: adaptivity retires the worker and its server goes.
                await until(
                    lambda: manager.get_cluster(cid)["workers"] == 0
                    and server_names(sim) == {"lab1-scheduler"},
                    timeout=180,
                    what="adaptive scale-down to zero workers",
                )

                (listed,) = manager.list_clusters()
                assert listed["id"] == cid and listed["adapt"] == {"minimum": 0, "maximum": 2}
                closed = await manager.close_cluster(cid)
                assert closed["id"] == cid
                assert manager.list_clusters() == []
                assert sim.leaks() == {}
    # The simulator shares this process (and its GIL): the bound is loose, but a blocking
    # SDK call or SSH handshake on the loop would take far longer.
    assert probe.worst < 1.0, f"the Jupyter event loop stalled {probe.worst * 1000:.0f} ms"


class Lab:
    """A real ``jupyter lab`` in a subprocess and a tiny REST client for it."""

    def __init__(self, sim, tmp: Path, name: str = "lab2", extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.base = f"http://127.0.0.1:{self.port}"
        config = dask.config.get("hetzner")
        env = {
            **os.environ,
            # The Hetzner side entirely from the environment, as a user would set it.
            "HCLOUD_TOKEN": sim.token,
            "HCLOUD_ENDPOINT": sim.endpoint,
            "DASK_HETZNER__NAME": name,
            "DASK_HETZNER__SSH_PORT": str(config["ssh-port"]),
            "DASK_HETZNER__SCHEDULER_PORT": "0",
            "DASK_HETZNER__DASHBOARD_PORT": "0",
            "DASK_HETZNER__API__POLL_INTERVAL": "100ms",
            "DASK_HETZNER__ENVIRONMENT": "minimal",  # as in conftest: the dask stack only
            "DASK_LABEXTENSION__FACTORY__MODULE": "dask_hetzner",
            "DASK_LABEXTENSION__FACTORY__CLASS": "HetznerCluster",
            # Nothing written into the developer's own dask or jupyter directories.
            "DASK_CONFIG": str(tmp / "dask"),
            "JUPYTER_CONFIG_DIR": str(tmp / "jupyter-config"),
            "JUPYTER_RUNTIME_DIR": str(tmp / "jupyter-runtime"),
            # A hung server killed with SIGABRT leaves its threads' stacks in the log.
            "PYTHONFAULTHANDLER": "1",
            **(extra_env or {}),
        }
        self.log = open(tmp / "jupyter.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyterlab",
                "--no-browser",
                "--ip",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={tmp}",
                # CI and the simulator run as root; Jupyter refuses that unless told.
                *(["--allow-root"] if os.geteuid() == 0 else []),
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=tmp,
        )
        self.log_path = tmp / "jupyter.log"

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 300) -> tuple[int, object]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", f"token {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raise AssertionError(
                f"{method} {path}: {e.code} {e.read()[:500]!r}\n--- jupyter log ---\n{self.tail()}"
            ) from None

    def tail(self, lines: int = 40) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                req = urllib.request.Request(f"{self.base}/api/status")
                req.add_header("Authorization", f"token {self.token}")
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"jupyter lab did not answer within {timeout} s:\n{self.tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.log.close()


KERNEL_CODE = """
import sys
import dask_hetzner
from distributed import Client
client = dask_hetzner.connect("lab2")
print(client.submit(lambda x: x + 1, 1).result())
print(client.dashboard_link)
client.close()
# The panel's scheduler address as it is, as in the "<>" snippet: no security=.
with Client(sys.argv[1]) as client:
    print(client.submit(lambda x: x + 1, 2).result())
"""


def test_jupyterlab_rest_api(sim, tmp_path):
    """A real JupyterLab with the extension: create, list, proxy, scale and delete over REST."""
    lab = Lab(sim, tmp_path)
    try:
        lab.wait_ready()
        status, extensions = lab.request("GET", "/dask/clusters")
        assert (status, extensions) == (200, [])

        status, model = lab.request("PUT", "/dask/clusters")
        assert status == 200, model
        cid = model["id"]
        assert model["name"] == "HetznerCluster 1"
        assert server_names(sim) == {"lab2-scheduler"}

        status, listed = lab.request("GET", "/dask/clusters")
        assert [m["id"] for m in listed] == [cid]

        # The dashboard through the extension's own proxy and its dashboard check.
        status, plots = lab.request("GET", f"/dask/dashboard/{cid}/individual-plots.json")
        assert status == 200 and plots
        quoted = urllib.parse.quote(model["dashboard_link"], safe="")
        status, check = lab.request("GET", f"/dask/dashboard-check/{quoted}")
        assert check["isActive"] is True, check

        status, model = lab.request("PATCH", f"/dask/clusters/{cid}", {"workers": 1})
        assert status == 200
        deadline = time.monotonic() + 180
        while not (
            lab.request("GET", f"/dask/clusters/{cid}")[1]["workers"] == 1
            and server_names(sim) == {"lab2-scheduler", "lab2-worker-0"}
        ):
            assert time.monotonic() < deadline, f"no worker through PATCH within 180 s:\n{lab.tail()}"
            time.sleep(0.5)

        # A kernel's one line: a Client through the Jupyter server's tunnel, which computes,
        # and whose dashboard link (built from the scheduler's port) is the tunnel's.
        kernel = subprocess.run(
            [sys.executable, "-c", KERNEL_CODE, model["scheduler_address"]], env={**os.environ, "HCLOUD_TOKEN": ""},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert kernel.returncode == 0, kernel.stderr[-3000:]
        assert kernel.stdout.split() == ["2", model["dashboard_link"], "3"], kernel.stdout

        status, _ = lab.request("DELETE", f"/dask/clusters/{cid}")
        assert status == 204
        assert lab.request("GET", "/dask/clusters")[1] == []
        assert sim.leaks() == {}, lab.tail()
    finally:
        lab.stop()



async def test_failed_panel_start_rolls_back_quietly(fsim, caplog):
    """A NEW that fails after its scheduler runs (its worker's server cannot be created): the
    panel gets the cause, everything is deleted before the error reaches it, and no internal
    error is logged (issue 18 saw ``AttributeError(... 'dask_hetzner_idle')``)."""
    from dask_labextension.manager import DaskClusterManager

    fsim.inject("resource_unavailable", name="lab4-worker-.*")
    config = {
        **LAB_CONFIG,
        "labextension.factory.kwargs": {"n_workers": 1, "idle_timeout": "1h", "fallback_locations": []},
        "hetzner.name": "lab4",
    }
    with dask.config.set(config):
        async with DaskClusterManager() as manager:
            with pytest.raises(Exception, match="lab4-worker-0: no server type could be had"):
                await manager.start_cluster()
            # Deleted by the failed start itself, not left to the process's exit.
            assert await asyncio.to_thread(server_names, fsim) == set() and fsim.leaks() == {}
            assert manager.list_clusters() == []
    internal = [r for r in caplog.records if r.levelno >= logging.WARNING and "lab4" in r.getMessage()]
    assert not [r.getMessage() for r in internal if "Error(" in r.getMessage()], caplog.text
