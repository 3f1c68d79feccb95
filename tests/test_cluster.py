"""HetznerCluster end to end on the simulator: real SDK, real SSH, real dask processes, real TLS."""

from __future__ import annotations

import asyncio
import gc

import dask
import dask.array as da
import pytest
from distributed import Client
from support import StallProbe, free_port, sdk, servers_of, wait_until

from dask_hetzner import HetznerCluster, early_start
from dask_hetzner.cloud import LABEL_CLUSTER, ConfigError

pytestmark = pytest.mark.slow


def test_sync_cluster_computes_scales_and_cleans_up(sim):
    with HetznerCluster(workers=2, name="sync1") as cluster:
        assert len(servers_of(sim, "sync1")) == 3
        with Client(cluster) as client:
            tunnel = cluster.scheduler_comm.address
            assert tunnel.startswith("tls://127.0.0.1:")
            assert cluster.scheduler_address == f"hetzner://{tunnel.removeprefix('tls://')}/sync1"
            client.wait_for_workers(2, timeout=120)
            # The address as it is, no security=: the hetzner scheme finds the certificate.
            with Client(cluster.scheduler_address, timeout=30) as by_address:
                assert by_address.submit(sum, [40, 2]).result(timeout=60) == 42
                assert by_address.dashboard_link == cluster.dashboard_link
            x = da.ones((2000, 2000), chunks=(500, 500))
            assert x.sum().compute() == 4_000_000
            names = {w["name"] for w in client.scheduler_info()["workers"].values()}
            assert names == {"worker-0", "worker-1"}

            cluster.scale(3)
            client.wait_for_workers(3, timeout=180)
            assert len(servers_of(sim, "sync1")) == 4

            cluster.scale(1)
            wait_until(
                lambda: len(client.scheduler_info()["workers"]) == 1
                and len(servers_of(sim, "sync1")) == 2,
                timeout=120,
                what="scale down to one worker and its server",
            )
            assert cluster.hourly_cost > 0
            assert "EUR/h" in repr(cluster)
    assert servers_of(sim, "sync1") == []


async def test_async_cluster(sim):
    # Port 0: the scheduler picks one, so workers learn its address only once it runs.
    with dask.config.set({"hetzner.scheduler-port": 0}):
        cluster = await HetznerCluster(workers=1, name="async1", asynchronous=True)
    async with cluster:
        assert cluster.scheduler.contact_address.rsplit(":", 1)[1] != "0"
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(1, timeout=120)
            assert await client.submit(lambda x: x + 1, 41) == 42
            # the dashboard link answers through the SSH tunnel
            import aiohttp

            async with aiohttp.ClientSession() as http:
                async with http.get(cluster.dashboard_link) as r:
                    assert r.status == 200
    assert await asyncio.to_thread(servers_of, sim, "async1") == []


def test_workers_start_before_the_scheduler_answers(sim):
    # The scheduler's server answers SSH 8 s late: the workers' servers are bootstrapped long
    # before, and their processes start at once (the scheduler's address is known from its
    # server and fixed port) and wait for it, instead of starting only after it runs.
    sim.inject("slow_boot", name="early1-scheduler", delay=8)
    with HetznerCluster(workers=2, name="early1") as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=120)
        sched = cluster.scheduler.prepared
        scheduler_process = sched.started_at + sched.timings["process"]
        for name in ("worker-0", "worker-1"):
            p = cluster.workers[name].prepared
            assert p.started_at + p.timings["process"] < scheduler_process, name
        logs = cluster.get_logs(cluster=False, scheduler=False)
        for name in ("worker-0", "worker-1"):
            waited = early_start.WAITED.search(logs[name])
            assert waited, logs[name]
            assert float(waited.group(1)) > 0 and waited.group(2) == cluster.scheduler.contact_address
            assert "Registered to" in logs[name]
        # Waiting workers look like ordinary clients to the scheduler: no broken handshakes.
        scheduler_log = cluster.get_logs(cluster=False, workers=False)["scheduler"]
        assert "handshake" not in scheduler_log, scheduler_log
        assert client.submit(lambda x: x + 1, 1).result(timeout=60) == 2


def test_scale_down_is_graceful(sim):
    """Data persisted on a retired worker moves before its server goes: nothing is recomputed."""
    with HetznerCluster(workers=2, name="graceful") as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=120)
        futures = client.map(lambda i: i * 10, range(20), workers=None, pure=False)
        client.gather(futures)
        holders = {w for ws in client.who_has(futures).values() for w in ws}
        assert len(holders) == 2, "data should be on both workers for this test to mean anything"

        cluster.scale(1)
        wait_until(
            lambda: len(client.scheduler_info()["workers"]) == 1,
            timeout=120,
            what="scale down to one worker",
        )
        assert client.gather(futures) == [i * 10 for i in range(20)]

        def memory_transitions(dask_scheduler):
            counts = {}
            for key, _start, finish, *_ in dask_scheduler.transition_log:
                if finish == "memory":
                    counts[key] = counts.get(key, 0) + 1
            return counts

        counts = client.run_on_scheduler(memory_transitions)
        assert all(counts[f.key] == 1 for f in futures), counts


def test_adapt_grows_and_shrinks(sim):
    with HetznerCluster(workers=0, name="adapt1") as cluster, Client(cluster) as client:
        cluster.adapt(minimum=1, maximum=3, interval="500ms", wait_count=2, target_duration="1s")
        client.wait_for_workers(1, timeout=120)

        def slow(i):
            import time

            time.sleep(1)  # the workload, not synchronisation
            return i

        futures = client.map(slow, range(60), pure=False)
        wait_until(
            lambda: len(client.scheduler_info()["workers"]) > 1,
            timeout=180,
            what="adaptive scale-up under load",
        )
        assert sum(client.gather(futures)) == sum(range(60))
        del futures
        wait_until(
            lambda: len(client.scheduler_info()["workers"]) == 1
            and len(servers_of(sim, "adapt1")) == 2,
            timeout=180,
            what="adaptive scale-down to the minimum",
        )


def test_plain_tcp_and_foreign_tls_refused(sim):
    from distributed import Security

    from dask_hetzner.security import ClusterCA

    with HetznerCluster(workers=0, name="tls1") as cluster:
        port = cluster.scheduler_comm.address.rsplit(":", 1)[1]
        with pytest.raises((OSError, TimeoutError)):
            Client(f"tcp://127.0.0.1:{port}", timeout=5)
        other = ClusterCA.generate("other")
        intruder = other.issue("intruder")
        foreign = Security(
            require_encryption=True,
            tls_ca_file=other.cert_pem,
            tls_client_cert=intruder.cert_pem,
            tls_client_key=intruder.key_pem,
        )
        with pytest.raises((OSError, TimeoutError)):
            Client(cluster.scheduler_address, security=foreign, timeout=5)
        # A name without local state: one line saying so, at once (not retried until timeout).
        with pytest.raises(OSError, match="no local state for cluster 'nosuch'"):
            Client(f"hetzner://127.0.0.1:{port}/nosuch", timeout=30)


def test_firewall_only_opens_ssh(sim):
    # The firewall is enforced (docs/simulator.md, "Firewalls are enforced"): this client's
    # own address must be allowed too, as on Hetzner.
    allowed = ["198.51.100.0/24"]
    client_ip = getattr(sim.hosts, "client_ip", None)
    if client_ip is not None:
        allowed.append(f"{client_ip}/32")
    with dask.config.set({"hetzner.allowed-cidrs": allowed}):
        with HetznerCluster(workers=0, name="fw1"):
            client = sdk(sim)
            (fw,) = client.firewalls.get_all(label_selector=f"{LABEL_CLUSTER}=fw1")
            inbound = {(r.protocol, r.port) for r in fw.rules if r.direction == "in"}
            assert inbound == {("tcp", "22"), ("icmp", None)}
            assert all(r.source_ips == allowed for r in fw.rules)
            (server,) = servers_of(sim, "fw1")
            assert server.public_net.firewalls[0].firewall.id == fw.id
            assert server.private_net, "scheduler must be on the private network"


def test_failing_bootstrap_is_reported_and_rolled_back(sim, caplog, monkeypatch):
    """A misspelled package: refused before any server exists, the cause in its first line.
    Where that check cannot know (here: skipped), the bootstrap's failure is not retried, the
    cause is in the first line, the log's tail after."""
    from dask_hetzner.payload import Payload

    with pytest.raises(Exception, match="cannot be installed") as early:
        HetznerCluster(workers=1, name="boot0", packages=["dask-hetzner-no-such-package==0.0.1"])
    assert "dask-hetzner-no-such-package was not found in the package registry" in str(early.value).splitlines()[0]
    assert not [k for k in sim.stats.requests if k.startswith("POST")], "refused only after creating"

    async def unchecked(self, architectures):
        return None

    monkeypatch.setattr(Payload, "check", unchecked)
    with pytest.raises(Exception, match="bootstrap.log") as info:
        HetznerCluster(workers=1, name="boot1", packages=["dask-hetzner-no-such-package==0.0.1"])
    first, *rest = str(info.value).splitlines()
    assert "the packages cannot be installed (not retried)" in first
    assert "dask-hetzner-no-such-package was not found in the package registry" in first
    assert str(info.value).count("was not found") == 2 and len(rest) <= 16  # the cause, then the tail once
    assert not any("warning:" in line for line in rest)
    assert not [r for r in caplog.records if "trying once more" in r.getMessage()]
    assert servers_of(sim, "boot1") == []


def test_rollback_when_a_server_cannot_be_created(sim):
    sim.inject("resource_limit_exceeded", after=2)
    with pytest.raises(Exception, match="resource_limit_exceeded|limit"):
        HetznerCluster(workers=3, name="roll1")
    assert sim.leaks() == {}


def test_host_key_mismatch_refused(sim, monkeypatch):
    """The server presents a key other than the one pinned: the client refuses and rolls back."""
    from dask_hetzner import security
    from dask_hetzner.provision import node as nodes

    def wrong_key_config(host_key, extra=None):
        return security.cloud_config(security.HostKey.generate(), extra)

    monkeypatch.setattr(nodes, "cloud_config", wrong_key_config)
    with pytest.raises(Exception, match="(?i)host key"):
        HetznerCluster(workers=0, name="pin1")
    assert sim.leaks() == {}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"worker_server_type": "cx999"}, "cx23"),
        # Preference lists: empty, an unknown type (named), two architectures in one list.
        ({"worker_server_type": []}, "worker_server_type must name at least one server type"),
        ({"worker_server_type": ["cx33", "cx999", "cpx32"]}, "unknown server type 'cx999' in worker_server_type"),
        ({"scheduler_server_type": ["cx23", "cax11"]}, r"scheduler_server_type mixes architectures \(arm: cax11; x86: cx23\)"),
        ({"worker_server_type": "cx33,cx33"}, "lists cx33 more than once"),
        ({"worker_server_type": ["cx23", "cx33"], "location": "ash"}, "no type of worker_server_type can be ordered in ash"),
        ({"location": "mars1"}, "fsn1"),
        ({"image": "windows-95"}, "ubuntu-24.04"),
        ({"name": "Not_A_Hostname"}, "invalid cluster name"),
        ({"packages": ["not a requirement !!"]}, "(?i)requirement"),
        ({"token": "wrong-token"}, "(?i)token"),
        ({"fallback_locations": ["ash"]}, "network zone"),
    ],
)
def test_bad_input_creates_nothing(sim, kwargs, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        HetznerCluster(workers=1, name=kwargs.pop("name", "bad1"), **kwargs)
    assert sim.leaks() == {}
    assert not any(k.startswith("POST") for k in sim.stats.requests)


def test_lost_worker_is_replaced_and_its_server_deleted(sim):
    with HetznerCluster(workers=2, name="rep1") as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=120)
        (old,) = [s for s in servers_of(sim, "rep1") if s.name == "rep1-worker-0"]
        # Every process on that server dies (nanny included): dask loses the worker.
        sim.inject("processes_die", name="rep1-worker-0")

        def replaced() -> bool:
            new = [s for s in servers_of(sim, "rep1") if s.name == "rep1-worker-0"]
            names = {w["name"] for w in client.scheduler_info()["workers"].values()}
            return bool(new) and new[0].id != old.id and names == {"worker-0", "worker-1"}

        sim.clear_faults()
        wait_until(replaced, timeout=180, what="a new server and worker for worker-0")
        assert old.id not in {s.id for s in servers_of(sim, "rep1")}
        assert client.submit(lambda: 1 + 1).result(timeout=60) == 2


async def test_cancel_while_starting_rolls_back(sim):
    """Ctrl-C reaches asyncio code as a cancellation: whatever exists by then is deleted."""
    started = asyncio.Event()

    def progress(node: str, phase: str) -> None:
        if phase == "installing":
            started.set()

    task = asyncio.create_task(
        HetznerCluster(workers=2, name="cancel1", asynchronous=True, progress=progress)._start()
    )
    await asyncio.wait_for(started.wait(), 120)
    assert await asyncio.to_thread(servers_of, sim, "cancel1")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sim.leaks() == {}


def test_sigint_while_starting_rolls_back(sim, tmp_path):
    """A real Ctrl-C (SIGINT) to a Python process that is creating a cluster."""
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "start.py"
    script.write_text(
        "import dask, sys\n"
        "from dask_hetzner import HetznerCluster\n"
        "def progress(node, phase):\n"
        "    if phase == 'installing':\n"
        "        print('installing', flush=True)\n"
        "HetznerCluster(workers=2, name='sigint1', progress=progress)\n"
        "print('started', flush=True)\n"
    )
    env = {**os.environ, "HCLOUD_TOKEN": sim.token, "HCLOUD_ENDPOINT": sim.endpoint}
    with dask.config.set({}):
        config = {k: v for k, v in dask.config.config["hetzner"].items()}
    env["DASK_HETZNER__SSH_PORT"] = str(config["ssh-port"])
    env["DASK_HETZNER__SCHEDULER_PORT"] = "0"
    env["DASK_HETZNER__DASHBOARD_PORT"] = "0"
    proc = subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "installing"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert sim.leaks() == {}


async def test_event_loop_never_stalls_while_ten_workers_start(sim_process):
    """The SDK runs in threads: the client's loop keeps ticking while 10 servers start."""
    async with StallProbe() as probe:
        async with HetznerCluster(workers=10, name="stall1", asynchronous=True) as cluster:
            async with Client(cluster, asynchronous=True) as client:
                await client.wait_for_workers(10, timeout=300)
    assert probe.worst < 0.1, f"event loop stalled {probe.worst * 1000:.0f} ms"


def test_connect_public_opens_only_the_scheduler_port(sim):
    port = free_port("0.0.0.0")
    with dask.config.set({"hetzner.scheduler-port": port, "hetzner.allowed-cidrs": ["127.0.0.0/8"]}):
        with HetznerCluster(workers=1, name="pub1", connect="public") as cluster:
            (sched,) = [s for s in servers_of(sim, "pub1") if s.name == "pub1-scheduler"]
            assert cluster.scheduler_address == f"hetzner://{sched.public_net.ipv4.ip}:{port}/pub1"
            assert cluster.scheduler_comm.address == f"tls://{sched.public_net.ipv4.ip}:{port}"
            (fw,) = sdk(sim).firewalls.get_all(label_selector=f"{LABEL_CLUSTER}=pub1")
            inbound = {(r.protocol, r.port) for r in fw.rules if r.direction == "in"}
            assert inbound == {("tcp", "22"), ("icmp", None), ("tcp", str(port))}
            with Client(cluster) as client:
                client.wait_for_workers(1, timeout=120)
                assert client.submit(lambda: 7).result(timeout=60) == 7


def test_open_cluster_is_deleted_at_exit(sim, tmp_path):
    """A script that forgets close(): Python's exit deletes the servers."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "forget.py"
    script.write_text(
        "from dask_hetzner import HetznerCluster\n"
        "cluster = HetznerCluster(workers=1, name='exit1')\n"
        "print('up', flush=True)\n"
    )
    env = {
        **os.environ,
        "HCLOUD_TOKEN": sim.token,
        "HCLOUD_ENDPOINT": sim.endpoint,
        "DASK_HETZNER__SCHEDULER_PORT": "0",
        "DASK_HETZNER__DASHBOARD_PORT": "0",
        "DASK_HETZNER__API__POLL_INTERVAL": "100ms",
    }
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.stdout.strip() == "up", out.stderr[-2000:]
    assert out.returncode == 0, out.stderr[-2000:]
    assert sim.leaks() == {}
    # Quietly: one line saying so, no traceback; and no keys left in the local state.
    assert "Traceback" not in out.stderr and "Error" not in out.stderr, out.stderr[-2000:]
    assert "cluster exit1: still open at exit: deleting it" in out.stderr
    assert not (Path(os.environ["DASK_HETZNER__STATE_DIR"]) / "exit1").exists()


@pytest.mark.parametrize(
    "sim", [{"profile": "realistic", "time_scale": 0.3, "seed": 11}], indirect=True
)
def test_servers_are_reached_by_ssh_not_by_status_polls(sim):
    """A server is up when its SSH answers, whatever the last status poll said: while servers
    are created the watcher polls lazily (a list every 5 intervals, to catch a failed create
    and read private IPs), not every interval until the slowest create is done."""
    with HetznerCluster(workers=2, name="lazy1") as cluster:
        polls = sim.stats.requests["GET /servers"]
        drawn = [sim.timings(s.id)["drawn"] for s in cluster.context.servers.values()]
        waited = max(d["create"] + d["start"] for d in drawn)
        # Polling every interval (100 ms) until the slowest server ran would be `waited / 0.1`.
        print(f"{polls} status polls; slowest create + start {waited:.2f} s")
        assert polls <= waited / 0.1 / 2.5


def test_heap_is_frozen_only_while_servers_are_provisioned(sim, monkeypatch):
    from dask_hetzner import gcfreeze

    calls: list[str] = []
    heap = gcfreeze.HEAP
    monkeypatch.setattr(heap, "hold", lambda real=heap.hold: (calls.append("hold"), real())[1])
    monkeypatch.setattr(heap, "release", lambda real=heap.release: (calls.append("release"), real())[1])
    with HetznerCluster(workers=1, name="gcf1"):
        # The scheduler's and the worker's provisioning, both over: nothing frozen any more.
        assert calls.count("hold") == calls.count("release") == 2
        assert gc.get_freeze_count() == 0


def test_more_workers_than_one_network_holds_are_refused(sim):
    # Hetzner: at most 100 servers a network, and a cluster's servers share one.
    with pytest.raises(ConfigError, match=r"at most 100 servers, so at most 99 workers"):
        HetznerCluster(workers=100, name="big1")
    assert not any(k.startswith("POST") for k in sim.stats.requests)
    with HetznerCluster(workers=0, name="big2") as cluster:
        with pytest.raises(ConfigError, match="scaling with 100 workers"):
            cluster.scale(100)
        assert len(cluster.worker_spec) == 0, "a refused scale must not change the plan"
        adaptive = cluster.adapt(minimum=0, maximum=500)
        assert adaptive.maximum == 99
        adaptive.stop()
