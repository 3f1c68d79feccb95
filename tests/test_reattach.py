"""Reattaching from another process; listing and nuking by label (the Python API)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import dask
import dask.array as da
import pytest
from cli_support import cli_env, make_leftovers, read_until, servers_of
from distributed.core import Status
from distributed.utils import Logs
from hcloud.images import Image
from hcloud.server_types import ServerType
from support import sdk, wait_until

from dask_hetzner import HetznerCluster, UnknownCluster, list_clusters, nuke
from dask_hetzner.cloud import LABEL_CLUSTER, LABEL_KEPT_UNTIL, LABEL_ROLE, ConfigError
from dask_hetzner.security import ClusterCA, SSHKeyPair
from dask_hetzner.state import ClusterState, Secrets, StateError

pytestmark = pytest.mark.slow




@pytest.fixture
def state_dir(sim, tmp_path):
    path = tmp_path / "state"
    with dask.config.set({"hetzner.state-dir": str(path)}):
        yield path


DASK_CTL_LIST = """
# What dask-ctl's discover_clusters does: the entry point, then cls.from_name(name) called
# synchronously inside its running loop; then the process exits.
import asyncio
from importlib.metadata import entry_points

async def main():
    (ep,) = [e for e in entry_points(group="dask_cluster_discovery") if e.name == "hetzner"]
    async for name, cls in ep.load()():
        cluster = cls.from_name(name)
        print(cluster.name, len(cluster.workers))

asyncio.run(main())
"""


def assert_dask_ctl_lists_without_taking_over(sim, env) -> None:
    """dask-ctl's discovery finds the cluster; its view (and `dask cluster list`, a whole
    process that rebuilds and drops it) deletes nothing."""
    from dask_hetzner.discovery import HetznerClusterView, discover

    servers = len(servers_of(sim, "re1"))

    async def names() -> list:
        return [found async for found in discover()]

    assert asyncio.run(names()) == [("re1", HetznerClusterView)]
    view = HetznerClusterView.from_name("re1")
    assert set(view.workers) == {"worker-0"} and not view.owns_resources
    view.close()
    assert len(servers_of(sim, "re1")) == servers
    # dask-ctl's way in another process, which then exits (dask-ctl 2024.1.0 itself fails
    # to import with this distributed: it needs distributed.cli.utils.install_signal_handlers).
    listed = subprocess.run(
        [sys.executable, "-c", DASK_CTL_LIST], env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert listed.returncode == 0 and listed.stdout.split() == ["re1", "1"], listed.stdout + listed.stderr
    assert "still open at exit" not in listed.stderr
    assert len(servers_of(sim, "re1")) == servers


@pytest.mark.timeout(600)
def test_reattach_from_another_process(sim, state_dir, tmp_path):
    """Process A creates a cluster and crashes; this process reattaches, computes, scales, closes."""
    script = tmp_path / "notebook.py"
    script.write_text(
        "import sys\n"
        "from dask_hetzner import HetznerCluster\n"
        "cluster = HetznerCluster(workers=1, name='re1')\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "cluster.scale(2)  # killed while worker-1's server boots\n"
        "print('scaling', flush=True)\n"
        "sys.stdin.read()  # a kernel that lives until it is killed\n"
    )
    a = subprocess.Popen(
        [sys.executable, str(script)],
        env=cli_env(sim, state_dir),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        read_until(a.stdout, "ready", timeout=180)
        # A scale-up killed (SIGKILL) once worker-1's server exists, before its worker runs.
        sim.inject("slow_boot", name="re1-worker-1", delay=120)
        a.stdin.write("\n")
        a.stdin.flush()
        read_until(a.stdout, "scaling", timeout=60)
        wait_until(lambda: len(servers_of(sim, "re1")) == 3, timeout=60, what="worker-1's server")
    finally:
        a.kill()  # the crash: no close, no atexit
        a.wait(timeout=60)
    (info,) = list_clusters()
    assert (info.workers, info.not_joined) == (1, 1), info
    joined = {s["worker"]: s["joined"] for s in info.servers if s["role"] == "worker"}
    assert joined == {"worker-0": True, "worker-1": False}
    assert_dask_ctl_lists_without_taking_over(sim, cli_env(sim, state_dir))

    cluster = HetznerCluster.from_name("re1")
    try:
        assert cluster.status == Status.running
        assert set(cluster.workers) == {"worker-0"}  # the half-built worker-1 is deleted
        wait_until(lambda: len(servers_of(sim, "re1")) == 2, timeout=60, what="the half-built server's deletion")
        (info,) = list_clusters()
        assert (info.workers, info.not_joined) == (1, 0), info
        assert cluster.scheduler_address.startswith("hetzner://127.0.0.1:")  # the tunnel, reopened
        assert cluster.dashboard_link.startswith("http://127.0.0.1:")
        assert cluster.hourly_cost > 0
        client = cluster.get_client()
        client.wait_for_workers(1, timeout=60)
        assert da.ones((1000, 1000), chunks=(250, 250)).sum().compute() == 1_000_000

        logs = cluster.get_logs()
        assert isinstance(logs, Logs)
        assert {"Cluster", "scheduler", "scheduler bootstrap", "worker-0", "worker-0 bootstrap"} <= set(logs)
        assert "distributed.scheduler" in logs["scheduler"]
        assert "distributed.worker" in logs["worker-0"]
        assert "bootstrap complete" in logs["worker-0 bootstrap"]
        only = cluster.get_logs(cluster=False, scheduler=False, workers=["worker-0"])
        assert set(only) == {"worker-0", "worker-0 bootstrap"}

        cluster.scale(2)
        client.wait_for_workers(2, timeout=180)
        names = {w["name"] for w in client.scheduler_info()["workers"].values()}
        # Numbering continues after the adopted ones (the deleted half-built one included).
        assert names == {"worker-0", "worker-2"}
        assert (state_dir / "re1" / "hosts" / "re1-worker-2.json").is_file()
        assert client.submit(lambda x: x + 1, 41).result(timeout=60) == 42

        cluster.adapt(minimum=1, maximum=1, interval="200ms", wait_count=1)
        wait_until(
            lambda: len(client.scheduler_info()["workers"]) == 1
            and len(servers_of(sim, "re1")) == 2,
            timeout=120,
            what="adaptive scale-down to one worker and its server",
        )
        client.close()
    finally:
        cluster.close()  # deletes everything, as on the original
    assert sim.leaks() == {}
    assert not (state_dir / "re1").exists()


def fake_state(root, name: str) -> ClusterState:
    """A complete local state (real keys) for a cluster that may not exist in the project."""
    ca = ClusterCA.generate(name)
    client = ca.issue("dask-client")
    ssh = SSHKeyPair.generate()
    state = ClusterState(root, name)
    metadata = {
        "name": name,
        "location": "fsn1",
        "image": "ubuntu-24.04",
        "scheduler_type": "cx23",
        "worker_type": "cx23",
        "connect": "tunnel",
        "network_ip_range": "10.0.0.0/16",
        "ssh_port": 22,
        "scheduler_port": 0,
        "dashboard_port": 0,
    }
    keys = Secrets(ca.cert_pem, ca.key_pem, client.cert_pem, client.key_pem, ssh.private_openssh, ssh.public_openssh)
    state.create(metadata, keys)
    return state


def test_missing_state_or_cluster_gives_clear_errors(sim, state_dir):
    with pytest.raises(StateError, match="no local state for cluster 'ghost'"):
        HetznerCluster.from_name("ghost")
    with pytest.raises(ConfigError, match="invalid cluster name"):
        HetznerCluster.from_name("Bad_Name")
    with pytest.raises(UnknownCluster, match="no cluster named 'ghost'"):
        nuke("ghost")

    # Resources but no local state: listed and nuked, not reattached.
    make_leftovers(sim, "orphan", server=False)
    (info,) = list_clusters()
    assert (info.name, info.status, info.local_state, info.workers) == ("orphan", "no servers", False, 0)
    with pytest.raises(StateError, match="can be listed and nuked, not reattached"):
        HetznerCluster.from_name("orphan")
    found = nuke("orphan")
    assert len(found.networks) == 1 and len(found.placement_groups) == 1
    assert sim.leaks() == {}

    # A local state but nothing in the project: a clear error, and nuke removes the state.
    stale = fake_state(state_dir, "stale")
    with pytest.raises(UnknownCluster, match="no cluster named 'stale'"):
        HetznerCluster.from_name("stale")
    assert stale.exists()  # a failed reattach deletes nothing
    assert len(nuke("stale")) == 0
    assert not stale.path.exists()


def test_failed_reattach_deletes_nothing(sim, state_dir):
    """A cluster without a scheduler (a crashed start): reattaching fails, nothing is touched."""
    make_leftovers(sim, "broken")
    state = fake_state(state_dir, "broken")
    before = sim.leaks()
    with pytest.raises(Exception, match="SSH key, network or firewall is missing|no scheduler"):
        HetznerCluster.from_name("broken")
    assert sim.leaks() == before
    assert state.exists()
    nuke("broken")
    assert sim.leaks() == {} and not state.path.exists()


def test_list_and_nuke_go_by_label_equality(sim, state_dir):
    make_leftovers(sim, "c")
    make_leftovers(sim, "c2", server=False)
    # A kept (paid, idle) server of c: nuke deletes it with the rest; it is not a worker.
    sdk(sim).servers.create(
        name="c-worker-7", server_type=ServerType(name="cx23"), image=Image(name="ubuntu-24.04"),
        labels={LABEL_CLUSTER: "c", LABEL_ROLE: "kept", LABEL_KEPT_UNTIL: str(int(time.time()) + 600)},
    )  # fmt: skip
    fake_state(state_dir, "c")
    fake_state(state_dir, "c2")
    clusters = {c.name: c for c in list_clusters()}
    assert set(clusters) == {"c", "c2"}
    # Its worker server never ran dask: not joined, not a worker.
    assert (clusters["c"].workers, clusters["c"].not_joined) == (0, 1)
    assert clusters["c"].status == "no scheduler"
    assert clusters["c"].local_state and clusters["c"].age_seconds is not None

    nuke("c")
    assert servers_of(sim, "c") == []
    assert [c.name for c in list_clusters()] == ["c2"]
    assert not (state_dir / "c").exists() and (state_dir / "c2").exists()
    nuke("c2")
    assert list_clusters() == [] and sim.leaks() == {}

