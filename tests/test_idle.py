"""Idle shutdown: the heartbeat in the scheduler, the watchdog's deletion, and whole clusters
that delete themselves on the simulator (with the client killed, and while work runs)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import dask
import pytest
from distributed import Client, Scheduler, Worker
from hcloud.firewalls import FirewallRule
from hcloud.images import Image
from hcloud.locations import Location
from hcloud.networks import NetworkSubnet
from hcloud.server_types import ServerType
from support import processes_showing, sdk, servers_of, wait_until

from dask_hetzner import HetznerCluster, idle
from dask_hetzner.cloud import LABEL_CLUSTER, ConfigError
from dask_hetzner.security import SSHKeyPair


def cluster_leftovers(sim, name: str) -> dict:
    """What the simulator still holds of one cluster, by kind."""
    out = {}
    for kind, items in sim.resources().items():
        mine = [i for i in items if (i.get("labels") or {}).get(LABEL_CLUSTER) == name]
        if mine:
            out[kind] = [i.get("name") or i.get("id") for i in mine]
    return out


# The heartbeat and the watchdog's decision --------------------------------------------------


def test_idle_for_counts_from_the_heartbeat_or_its_silence():
    now = 1000.0
    assert idle.idle_for(None, now, watching_since=now - 3) == 0.0  # scheduler not up yet
    assert idle.idle_for(None, now, watching_since=now - 100) == 100  # it never came
    busy = {"time": now - 0.5, "idle_since": None}
    assert idle.idle_for(busy, now, watching_since=now - 500) == 0.0
    quiet = {"time": now - 0.5, "idle_since": now - 42}
    assert idle.idle_for(quiet, now, watching_since=now - 500) == 42
    # The scheduler died while busy: its silence counts.
    dead = {"time": now - 300, "idle_since": None}
    assert idle.idle_for(dead, now, watching_since=now - 500) == 300


def test_watchdog_constants_match_the_cloud_layer():
    """idle.py runs alone on the server and imports nothing of the package: its copies of the
    cluster label and of the transient error codes must stay those of the cloud layer."""
    from dask_hetzner import cloud

    assert idle.LABEL_CLUSTER == cloud.LABEL_CLUSTER
    assert idle.TRANSIENT_CODES == cloud.TRANSIENT_CODES


def test_watchdog_paths_match_the_layout():
    """Likewise its copy of where things live on the server."""
    from dask_hetzner import layout

    assert idle.REMOTE_DIR == layout.REMOTE_DIR
    assert idle.SCHEDULER_PID_FILE == layout.pidfile("scheduler")
    assert idle.LIB_DIR == layout.LIB_DIR
    assert idle.STATE_FILE == f"{layout.DASK_DIR}/idle-state.json"


def test_settings_never_show_the_token():
    settings = idle.IdleSettings(timeout=60, endpoint="http://x/v1", token="s3cret-token")
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in json.dumps(settings.config("c", 1))


async def test_heartbeat_tracks_clients_and_work(tmp_path, monkeypatch):
    """The preload, in a real local scheduler: busy while starting, with clients or with work."""
    (tmp_path / "idle.json").write_text(json.dumps({"start_grace": 3600}))
    monkeypatch.setenv("DASK_HETZNER_IDLE_DIR", str(tmp_path))
    state_file = tmp_path / "idle-state.json"

    def state() -> dict:
        return json.loads(state_file.read_text())

    async def until(cond, what: str, timeout: float = 30) -> None:
        import asyncio

        deadline = time.monotonic() + timeout
        while not (state_file.exists() and cond(state())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"heartbeat never showed {what}: {state() if state_file.exists() else None}")
            await asyncio.sleep(0.1)

    preload = str(Path(idle.__file__))
    async with Scheduler(port=0, dashboard_address=":0", preload=[preload]) as s:
        async with Worker(s.address, nthreads=1):
            await until(lambda st: st["starting"] and st["idle_since"] is None, "the start grace")
            async with Client(s.address, asynchronous=True) as client:
                assert await client.scheduler.dask_hetzner_idle(action="started") == {
                    "idle_since": None,
                    "clients": 1,
                }
                await until(lambda st: not st["starting"] and st["clients"] == 1, "one client")
                assert state()["idle_since"] is None
            await until(lambda st: st["clients"] == 0 and st["idle_since"], "idle without clients")
            # Work submitted by a client that then left (fire and forget) keeps it busy.
            async with Client(s.address, asynchronous=True) as client:
                from distributed import fire_and_forget

                event = "dask-hetzner-idle-test"

                def hold(name: str) -> int:
                    from distributed import Event

                    Event(name).wait(60)
                    return 1

                fire_and_forget(client.submit(hold, event, pure=False))
                await until(lambda st: st["idle_since"] is None, "busy with a task")
            await until(lambda st: st["clients"] == 0, "the client gone")
            assert state()["idle_since"] is None, "a running task must keep the cluster busy"
            async with Client(s.address, asynchronous=True) as client:
                from distributed import Event

                await Event(event, client=client).set()
            await until(lambda st: st["clients"] == 0 and st["idle_since"], "idle after the task")


def test_watchdog_deletes_only_its_cluster(tmp_path):
    """``delete_cluster`` against the simulator: its own server last, others' resources untouched."""
    from dask_hetzner.sim import Simulator

    with Simulator(hosts=False, validate_responses=True) as sim:
        c = sdk(sim)

        def make(cluster: str, n: int) -> list[int]:
            labels = {LABEL_CLUSTER: cluster, "dask-hetzner/role": "shared"}
            key = c.ssh_keys.create(
                name=f"{cluster}-key",
                public_key=SSHKeyPair.generate().public_openssh,
                labels=labels,
            )
            net = c.networks.create(
                name=cluster,
                ip_range="10.0.0.0/16",
                subnets=[NetworkSubnet(type="cloud", ip_range="10.0.0.0/24", network_zone="eu-central")],
                labels=labels,
            )
            fw = c.firewalls.create(
                name=cluster,
                rules=[
                    FirewallRule(direction="in", protocol="tcp", port="22", source_ips=["0.0.0.0/0"])
                ],
                labels=labels,
            ).firewall
            pg = c.placement_groups.create(name=cluster, type="spread", labels=labels).placement_group
            ids = []
            for i in range(n):
                role = "scheduler" if i == 0 else "worker"
                r = c.servers.create(
                    name=f"{cluster}-{role}-{i}",
                    server_type=ServerType(name="cx23"),
                    image=Image(name="ubuntu-24.04"),
                    location=Location(name="fsn1"),
                    ssh_keys=[key],
                    networks=[net],
                    firewalls=[fw],
                    placement_group=pg,
                    labels={LABEL_CLUSTER: cluster, "dask-hetzner/role": role},
                )
                ids.append(r.server.id)
            return ids

        mine = make("idle1", 3)
        theirs = make("other1", 1)
        sim.settle_sync()
        # Faults the watchdog must ride out: a firewall still detaching, a rate limit.
        in_use = sim.inject("resource_in_use", method="DELETE", path="/firewalls/", count=2)
        limited = sim.inject("rate_limit", method="GET", nth=3)
        calls: list[str] = []

        class Recording(idle.Api):
            def _once(self, method, path, body, query):
                calls.append(f"{method} {path}")
                return super()._once(method, path, body, query)

        api = Recording(sim.endpoint, sim.token)
        assert sim.token not in repr(api)
        idle.delete_cluster(api, "idle1", mine[0], timeout=60)
        sim.settle_sync()
        assert cluster_leftovers(sim, "idle1") == {}
        assert [s.id for s in c.servers.get_all()] == theirs
        # Its own server went last, after every other resource of the cluster.
        deletes = [call for call in calls if call.startswith("DELETE")]
        assert deletes[-1] == f"DELETE /servers/{mine[0]}", deletes
        assert {f"DELETE /servers/{i}" for i in mine[1:]} <= set(deletes[:2])
        assert not any(str(i) in call for call in calls for i in theirs)
        assert (in_use.hits, limited.hits) == (2, 1), "the faults must have struck"
        with pytest.raises(ValueError):
            idle.delete_cluster(api, "", None)
        idle.delete_cluster(api, "other1", None, timeout=60)
        sim.settle_sync()
        assert sim.leaks() == {}


def test_bad_idle_timeout_refused(sim):
    with pytest.raises(ConfigError, match="idle_timeout"):
        HetznerCluster(workers=0, name="idlebad", idle_timeout="soon")
    with pytest.raises(ConfigError, match="idle_timeout"):
        HetznerCluster(workers=0, name="idlebad", idle_timeout=-1)
    assert sim.leaks() == {}


# Whole clusters on the simulator -------------------------------------------------------------


@pytest.mark.slow
def test_killed_client_cluster_deletes_itself(sim, tmp_path):
    """A client process that dies (SIGKILL: no atexit, no close) leaves nothing behind."""
    script = tmp_path / "start.py"
    script.write_text(
        "import sys, threading\n"
        "from distributed import Client\n"
        "from dask_hetzner import HetznerCluster\n"
        "cluster = HetznerCluster(workers=1, name='idlekill', idle_timeout='3s')\n"
        "client = Client(cluster)\n"
        "client.wait_for_workers(1, timeout=120)\n"
        "assert client.submit(lambda: 41 + 1).result(timeout=60) == 42\n"
        "print('ready', cluster.scheduler.server.id, flush=True)\n"
        "threading.Event().wait()\n"
    )
    config = dask.config.get("hetzner")
    env = {
        **os.environ,
        "HCLOUD_TOKEN": sim.token,  # the environment, never the command line
        "HCLOUD_ENDPOINT": sim.endpoint,
        "DASK_HETZNER__SSH_PORT": str(config["ssh-port"]),
        "DASK_HETZNER__SCHEDULER_PORT": "0",
        "DASK_HETZNER__DASHBOARD_PORT": "0",
        "DASK_HETZNER__API__POLL_INTERVAL": "100ms",
    }
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split()
        assert line and line[0] == "ready", f"the client process did not start its cluster: {line}"
        scheduler_id = int(line[1])
        assert len(servers_of(sim, "idlekill")) == 2
        state = sim.hosts.directory(scheduler_id) / idle.STATE_FILE
        # The client is connected: the heartbeat says so, and nothing counts as idle.
        wait_until(
            lambda: state.exists() and json.loads(state.read_text())["clients"] == 1,
            timeout=30,
            what="a heartbeat that sees the client",
        )
        assert json.loads(state.read_text())["idle_since"] is None
        _check_token_confined(sim, "idlekill", scheduler_id)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    wait_until(
        lambda: cluster_leftovers(sim, "idlekill") == {},
        timeout=120,
        what="the killed client's cluster deleting itself",
    )


def _check_token_confined(sim, name: str, scheduler_id: int) -> None:
    """The token: in one 0600 file on the scheduler's server, and nowhere else we can see."""
    token = sim.token
    assert processes_showing(token) == [], "the token shows in a process's arguments"
    servers = servers_of(sim, name)
    for server in servers:
        assert token not in json.dumps(server.labels)
        assert token not in (sim.store.servers[server.id].user_data or "")
        home = sim.hosts.directory(server.id) / ".dask-hetzner"
        token_file = home / "hcloud-token"
        if server.id == scheduler_id:
            assert token_file.read_text() == token
            assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
            assert token not in (home / "lib" / "idle.json").read_text()
        else:
            assert not token_file.exists(), "only the scheduler's server may hold the token"
        for log in home.glob("*.log"):
            assert token not in log.read_text(errors="replace"), f"token in {log.name}"


def _check_tasks_are_unprivileged(sim, client: Client, name: str, scheduler_id: int) -> None:
    """Code run through dask (a task, or code run in the scheduler) is not root and cannot
    reach the token or the watchdog; no dask process on any server runs as root."""

    def reach_for_root(token: str) -> dict:
        """Run in a task (on a worker, and in the scheduler): who it is and what it can read.
        Nested: cloudpickle sends it by value (no server can import this test module)."""
        import os
        import pwd
        from pathlib import Path

        def attempt(read) -> str:
            try:
                read()
            except OSError as e:
                return type(e).__name__
            return "read"

        watchdogs = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if b"idle.py\0watch" in (entry / "cmdline").read_bytes():
                        watchdogs.append(entry)
                except OSError:
                    continue
        found = {
            "uid": os.getuid(),
            "euid": os.geteuid(),
            "user": pwd.getpwuid(os.getuid()).pw_name,
            "token file": attempt(lambda: Path("/root/.dask-hetzner/hcloud-token").read_bytes()),
            "root's home": attempt(lambda: os.listdir("/root")),
            "root's files": attempt(lambda: os.listdir("/root/.dask-hetzner")),
            "become root": attempt(lambda: os.setuid(0)),
            "watchdogs": len(watchdogs),
        }
        # Bytecode: in its own cache, never written into root's environment.
        import sys

        import distributed

        package = Path(distributed.__file__).parent
        found["pycache prefix"] = sys.pycache_prefix or ""
        found["cached"] = bool(sys.pycache_prefix) and any(Path(f"{sys.pycache_prefix}{package}").glob("*.pyc"))
        found["bytecode in the environment"] = (package / "__pycache__").exists()
        for w in watchdogs:
            found["watchdog environ"] = attempt((w / "environ").read_bytes)
            found["watchdog memory"] = attempt((w / "mem").read_bytes)
            found["token in its cmdline"] = token in (w / "cmdline").read_text()
        return found

    token = sim.token
    on_worker = client.submit(reach_for_root, token, pure=False).result(timeout=60)
    in_scheduler = client.run_on_scheduler(reach_for_root, token)
    for where, found in (("worker", on_worker), ("scheduler", in_scheduler)):
        assert found["uid"] != 0 and found["euid"] != 0, f"the {where} runs as root: {found}"
        assert found["user"] == "dask", found
        assert found["root's home"] == found["root's files"] == found["become root"] == "PermissionError", found
        assert found["pycache prefix"].endswith("/.dask-hetzner/dask/pycache") and found["cached"], found
        assert found["bytecode in the environment"] is False, found
    # The token's own server: it exists there, and it cannot be read.
    assert in_scheduler["token file"] == "PermissionError", in_scheduler
    assert in_scheduler["watchdogs"] == 1, in_scheduler
    assert in_scheduler["watchdog environ"] == in_scheduler["watchdog memory"] == "PermissionError", in_scheduler
    assert in_scheduler["token in its cmdline"] is False
    assert on_worker["token file"] == "FileNotFoundError", on_worker  # only the scheduler's has it
    # Every process on every server: dask (anything run from its environment) is never root,
    # the watchdog always is.
    for server in servers_of(sim, name):
        users: dict[str, set[int]] = {"dask": set(), "watchdog": set()}
        for pid in sim.hosts.processes(server.id):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue  # gone meanwhile
            uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
            if ".dask-hetzner/env/" in cmdline:
                users["dask"].add(uid)
            elif "idle.py watch" in cmdline:
                users["watchdog"].add(uid)
        assert users["dask"] and 0 not in users["dask"], f"{server.name}: dask processes' uids {users}"
        expected = {0} if server.id == scheduler_id else set()
        assert users["watchdog"] == expected, f"{server.name}: watchdog's uids {users}"


@pytest.mark.slow
def test_busy_cluster_survives_its_idle_timeout_then_deletes_itself(sim):
    """Work running longer than the timeout keeps the cluster; once idle it goes, and close() copes."""
    timeout = 3.0
    cluster = HetznerCluster(workers=1, name="idlebusy", idle_timeout=timeout)
    try:
        before = {s.id for s in servers_of(sim, "idlebusy")}
        assert len(before) == 2
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=120)
            t0 = time.monotonic()

            def work(seconds: float) -> float:
                import time

                time.sleep(seconds)  # the workload itself, longer than the idle timeout
                return seconds

            assert client.submit(work, 4 * timeout, pure=False).result(timeout=120) == 4 * timeout
            assert time.monotonic() - t0 > 3 * timeout
            # Idle time only starts now, and a client is still connected: nothing was deleted.
            assert {s.id for s in servers_of(sim, "idlebusy")} == before
            _check_token_confined(sim, "idlebusy", cluster.scheduler.server.id)
            _check_tasks_are_unprivileged(sim, client, "idlebusy", cluster.scheduler.server.id)
        # No client, no work: the cluster deletes itself while this process still holds it.
        wait_until(
            lambda: cluster_leftovers(sim, "idlebusy") == {},
            timeout=120,
            what="the idle cluster deleting itself",
        )
    finally:
        t0 = time.monotonic()
        cluster.close(timeout=120)
    assert time.monotonic() - t0 < 90, "closing a cluster that deleted itself should be quick"
