"""Running ``dask-hetzner`` as users do (a subprocess) against a test's simulator."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import dask
from support import sdk, servers_of  # noqa: F401  (servers_of: for the CLI tests)

from dask_hetzner.cloud import LABEL_CLUSTER, LABEL_ROLE

CLI = [sys.executable, "-m", "dask_hetzner.cli"]


def cli_env(sim, state_dir: Path) -> dict[str, str]:
    """Environment of a CLI process: token/endpoint of ``sim``, test timeouts, state in tmp."""
    env = {**os.environ, "HCLOUD_TOKEN": sim.token, "HCLOUD_ENDPOINT": sim.endpoint}
    env.update(
        {
            "DASK_HETZNER__SSH_PORT": str(dask.config.get("hetzner.ssh-port")),
            "DASK_HETZNER__SCHEDULER_PORT": "0",
            "DASK_HETZNER__DASHBOARD_PORT": "0",
            "DASK_HETZNER__API__POLL_INTERVAL": "100ms",
            "DASK_HETZNER__STATE_DIR": str(state_dir),
            "DASK_HETZNER__TIMEOUTS__SERVER_CREATE": "60s",
            "DASK_HETZNER__TIMEOUTS__SSH": "60s",
            "DASK_HETZNER__TIMEOUTS__PROCESS_START": "120s",
            "DASK_HETZNER__TIMEOUTS__CLOSE": "60s",
            "DASK_HETZNER__ENVIRONMENT": "minimal",  # as in conftest: the dask stack only
            "DASK_HETZNER__KEEP_PAID_SERVERS": "False",  # as in conftest: retired means deleted
            "COLUMNS": "200",  # rich tables: no wrapping in captured output
        }
    )
    return env


def run(env: dict[str, str], *args: str, timeout: float = 240, input: str | None = None):
    """Run one verb to completion; a hang fails the test with the command named."""
    return subprocess.run(
        [*CLI, *args],
        env=env,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_until(stream: IO[str], wanted: str, *, timeout: float = 120) -> list[str]:
    """Lines of ``stream`` up to one containing ``wanted`` (the progress output of ``create``)."""
    import selectors

    lines: list[str] = []
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{wanted!r} not printed within {timeout} s; got {lines}")
            if not sel.select(left):
                continue
            line = stream.readline()
            if not line:
                raise AssertionError(f"stream ended before {wanted!r}; got {lines}")
            lines.append(line)
            if wanted in line:
                return lines






def make_leftovers(sim, name: str, *, server: bool = True) -> None:
    """What a start killed early leaves: shared resources (and maybe a server), by label only."""
    from hcloud.images import Image
    from hcloud.networks import NetworkSubnet
    from hcloud.server_types import ServerType

    client = sdk(sim)
    labels = {LABEL_CLUSTER: name, LABEL_ROLE: "shared"}
    client.networks.create(
        name=name,
        ip_range="10.0.0.0/16",
        subnets=[NetworkSubnet(type="cloud", ip_range="10.0.0.0/24", network_zone="eu-central")],
        labels=labels,
    )
    client.placement_groups.create(name=f"{name}-0", type="spread", labels=labels)
    if server:
        client.servers.create(
            name=f"{name}-worker-0",
            server_type=ServerType(name="cx23"),
            image=Image(name="ubuntu-24.04"),
            labels={LABEL_CLUSTER: name, LABEL_ROLE: "worker", "dask-hetzner/worker": "worker-0"},
        )
