"""Races between processes on one cluster name: two starts, two closes, a close during a scale.

A start claims the name (its SSH key, unique per project) before it writes local state or
creates anything else, and adopts or deletes only what carries its own start id; so the
first cluster and its state always survive, and nothing leaks (the ``sim`` fixture checks).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket

import dask
import psutil
import pytest
from distributed import Client
from distributed.core import Status
from hcloud.images import Image
from hcloud.locations import Location
from hcloud.server_types import ServerType
from support import sdk

from dask_hetzner import HetznerCluster
from dask_hetzner.cloud import LABEL_CLUSTER, LABEL_ROLE, LABEL_START, LABEL_WORKER
from dask_hetzner.state import ClusterState

pytestmark = pytest.mark.slow


@pytest.fixture
def state_dir(sim, tmp_path):
    path = tmp_path / "state"
    with dask.config.set({"hetzner.state-dir": str(path)}):
        yield path


def labelled(sim, name: str) -> list[dict[str, str]]:
    """The labels of everything carrying cluster ``name``'s label."""
    client, sel = sdk(sim), f"{LABEL_CLUSTER}={name}"
    found = [*client.servers.get_all(label_selector=sel), *client.ssh_keys.get_all(label_selector=sel)]
    found += [*client.networks.get_all(label_selector=sel), *client.firewalls.get_all(label_selector=sel)]
    found += client.placement_groups.get_all(label_selector=sel)
    return [r.labels for r in found]


def half_built_worker(sim, name: str, start: str) -> None:
    labels = {LABEL_CLUSTER: name, LABEL_ROLE: "worker", LABEL_WORKER: "worker-7", LABEL_START: start}
    sdk(sim).servers.create(
        name=f"{name}-worker-7", server_type=ServerType(name="cx23"), image=Image(name="ubuntu-24.04"),
        location=Location(name="fsn1"), labels=labels,
    )  # fmt: skip


async def start(name: str, after: float, workers: int) -> HetznerCluster:
    await asyncio.sleep(after)  # the second process starts this much later
    return await HetznerCluster(workers=workers, name=name, asynchronous=True)


def _listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of the TCP sockets process ``pid`` listens on, read from its own
    network namespace's tables (psutil reads this process's namespace's)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    found = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        with contextlib.suppress(OSError):
            for line in open(f"/proc/{pid}/net/{table}").read().splitlines()[1:]:
                fields = line.split()
                if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                    continue
                raw, port = fields[1].split(":")
                packed = bytes.fromhex(raw)
                # The kernel prints each 32-bit word in host (little-endian) order.
                packed = b"".join(packed[i : i + 4][::-1] for i in range(0, len(packed), 4))
                family = socket.AF_INET if width == 8 else socket.AF_INET6
                found.append((socket.inet_ntop(family, packed), int(port, 16)))
    return found


def listeners(sim, name: str) -> tuple[int, list[str]]:
    """How many sockets the processes on cluster ``name``'s servers listen on, and those on
    every interface (0.0.0.0 or ::), which would be public on Hetzner."""
    count, public = 0, []
    for server in sdk(sim).servers.get_all(label_selector=f"{LABEL_CLUSTER}={name}"):
        for pid in sim.hosts.processes(server.id):
            for address, port in _listening(pid):
                count += 1
                if address in ("0.0.0.0", "::"):
                    with contextlib.suppress(psutil.Error):
                        public.append(f"{server.name}: {' '.join(psutil.Process(pid).cmdline()[:3])} on port {port}")
    return count, public


# The reproduction: the first existence check answers 3 s late, the second 5 s,
# so both starts find the name free; B starts 0, 1 or 2.5 s after A (within A's check).
@pytest.mark.timeout(120)
@pytest.mark.parametrize("after", [0.0, 1.0])
async def test_second_start_of_a_name_never_takes_over_the_first(sim, state_dir, after):
    sim.inject("slow_response", method="GET", path=r"^/networks$", delay=3, nth=1)
    sim.inject("slow_response", method="GET", path=r"^/networks$", delay=5, nth=2)
    name = f"dup{int(after * 10)}"
    workers = 1 if after == 0 else 0  # one case with a worker: its listeners are read too
    results = await asyncio.gather(start(name, 0, workers), start(name, after, workers), return_exceptions=True)
    won = [r for r in results if isinstance(r, HetznerCluster)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert len(won) == 1 and len(lost) == 1, results
    # (On a loaded machine B's check may come after A's claim: then the check refuses it.)
    assert re.search("claimed by another start|already exists", str(lost[0])), lost
    async with won[0] as cluster:
        assert cluster.status == Status.running
        ours = cluster._ctx.start
        # Everything of that name is the winner's; its state is intact and names its start.
        found = await asyncio.to_thread(labelled, sim, name)
        assert found and all(labels[LABEL_START] == ours for labels in found), found
        state = ClusterState(state_dir, name)
        assert json.loads(state.metadata_file.read_text())["start"] == ours
        assert state.secrets().client_key
        async with Client(cluster, asynchronous=True) as client:  # its scheduler answers
            assert client.scheduler_info()["type"] == "Scheduler"
            if workers:
                await client.wait_for_workers(workers, timeout=120)
        # Every process on every server listens on its private address or loopback only.
        count, public = await asyncio.to_thread(listeners, sim, name)
        assert count >= 2 + 3 * workers and public == [], (count, public)
    assert not (state_dir / name).exists()


@pytest.mark.timeout(400)
async def test_two_closes_and_a_close_during_a_scale(sim, state_dir):
    """A scales up while B and C (reattached from other processes) close at once."""
    # A's new workers wait for SSH on servers B deleted: bounded shorter than in other tests.
    with dask.config.set({"hetzner.timeouts.ssh": "10s"}):
        a = await HetznerCluster(workers=0, name="race2", asynchronous=True)
    try:
        # A worker's server whose start was killed half-way: it never ran dask.
        await asyncio.to_thread(half_built_worker, sim, "race2", a._ctx.start)
        b = await HetznerCluster.from_name("race2", asynchronous=True)
        assert "worker-7" not in b.worker_spec and "worker-7" not in b.workers
        left = await asyncio.to_thread(lambda: [s for s in sdk(sim).servers.get_all() if s.name == "race2-worker-7"])
        assert all(s.status == "deleting" for s in left), "reattaching deletes it"
        c = await HetznerCluster.from_name("race2", asynchronous=True)
        a.scale(2)
        await asyncio.gather(b.close(), c.close())
        assert await asyncio.to_thread(labelled, sim, "race2") == []
        assert not (state_dir / "race2").exists()
    finally:
        await a.close()
    assert await asyncio.to_thread(labelled, sim, "race2") == []
