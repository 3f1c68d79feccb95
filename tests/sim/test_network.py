"""The simulated network (sim/netns.py, sim/firewall.py): a namespace per server, firewalls that
filter, driven through the API like a user would, with real SSH and real sockets."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from sim_helpers import Raw, delete_all, server_body, wait_action
from support import free_port

from dask_hetzner.provision.shared import firewall_rules
from dask_hetzner.settings import ClusterSettings
from dask_hetzner.sim import Simulator, netns
from dask_hetzner.sim.disks import ROOT_PREFIX, reclaim_root_dirs

pytestmark = pytest.mark.timeout(120)

# Answers every connection with the server's name; started with nohup, as daemons are.
ECHO = (
    "import socket, sys\n"
    "s = socket.create_server((sys.argv[1], int(sys.argv[2])), reuse_port=False)\n"
    "open(sys.argv[3], 'w').close()\n"
    "while True:\n"
    "    c, _ = s.accept()\n"
    "    c.sendall(socket.gethostname().encode())\n"
    "    c.close()\n"
)
DROPPED = 1.0  # a dropped SYN never answers: how long to wait before calling it dropped


async def answer(host: str, port: int) -> str:
    """What the service at host:port says; "refused" or "dropped" when it does not answer."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), DROPPED)
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "dropped"
    try:
        return (await asyncio.wait_for(reader.read(100), 10)).decode()
    finally:
        writer.close()


class Servers:
    """Servers created through the API, logged into with one key."""

    def __init__(self, sim: Simulator, raw: Raw) -> None:
        self.sim, self.raw = sim, raw
        self.key = asyncssh.generate_private_key("ssh-ed25519")
        self.ids: dict[str, int] = {}
        self.public: dict[str, str] = {}
        self.private: dict[str, str] = {}

    async def create(self, names: list[str]) -> None:
        public_key = self.key.export_public_key().decode()
        key = (await self.raw.post("/ssh_keys", {"name": "k", "public_key": public_key})).body
        net = await self.raw.post(
            "/networks",
            {"name": "n", "ip_range": "10.0.0.0/16",
             "subnets": [{"type": "cloud", "network_zone": "eu-central", "ip_range": "10.0.1.0/24"}]},
        )  # fmt: skip
        for name in names:
            body = server_body(name, ssh_keys=[key["ssh_key"]["id"]], networks=[net.body["network"]["id"]])
            r = await self.raw.post("/servers", body)
            assert r.status == 201, r.body
            self.ids[name] = r.body["server"]["id"]
            self.public[name] = r.body["server"]["public_net"]["ipv4"]["ip"]
        await self.sim.settle(timeout=60)
        assert self.sim.host_errors == []
        for name, sid in self.ids.items():
            server = (await self.raw.get(f"/servers/{sid}")).body["server"]
            self.private[name] = server["private_net"][0]["ip"]

    def connect(self, name: str, **kwargs: Any) -> Any:
        return asyncssh.connect(
            self.public[name], self.sim.ssh_port, username="root", client_keys=[self.key],
            known_hosts=None, **kwargs,
        )  # fmt: skip

    async def run(self, name: str, command: str, **kwargs: Any) -> asyncssh.SSHCompletedProcess:
        async with self.connect(name) as conn:
            return await conn.run(command, **kwargs)

    async def serve(self, name: str, address: str, port: int) -> None:
        """Start the echo service on the server; return once it listens."""
        ready = f"ready-{port}"
        result = await self.run(
            name, f"cat > echo.py; nohup python3 echo.py {address} {port} {ready} >/dev/null 2>&1 & "
            f"for i in $(seq 100); do [ -e {ready} ] && exit 0; sleep 0.05; done; exit 1", input=ECHO,
        )  # fmt: skip
        assert result.exit_status == 0, f"echo service on {name} did not start: {result.stderr}"

    async def dial(self, name: str, host: str, port: int) -> str:
        """What host:port says when dialled from inside a server."""
        probe = (
            "import socket, sys\n"
            "try:\n"
            f"    c = socket.create_connection(('{host}', {port}), timeout={DROPPED})\n"
            "    print(c.recv(100).decode())\n"
            "except ConnectionRefusedError:\n    print('refused')\n"
            "except OSError:\n    print('dropped')\n"
        )
        return (await self.run(name, "python3 -", input=probe)).stdout.strip()


@pytest.fixture
async def servers(tmp_path: Path) -> Any:
    async with (
        Simulator(hosts=True, ssh_port=free_port(), root_dir=tmp_path / "root") as sim,
        Raw(sim) as raw,
    ):
        if not sim.hosts.sandboxed and os.geteuid() != 0:
            pytest.skip("network namespaces need root")
        made = Servers(sim, raw)
        try:
            yield made
        finally:
            await delete_all(raw, sim)
            assert sim.leaks() == {}
    assert not [n for n in os.listdir("/sys/class/net") if n == f"dhsim{os.getpid()}"]


async def test_each_server_has_its_own_loopback_ports_and_firewall(servers: Servers) -> None:
    await servers.create(["alpha", "beta"])
    assert servers.sim.hosts.networked
    port, local_port = free_port("0.0.0.0"), free_port("0.0.0.0")

    # 1. Own loopback and port space: both servers bind 0.0.0.0:port; a 127.0.0.1 service
    # answers on its own server only; the machine keeps the port for itself.
    await servers.serve("alpha", "0.0.0.0", port)
    await servers.serve("beta", "0.0.0.0", port)
    await servers.serve("alpha", "127.0.0.1", local_port)
    assert await answer(servers.public["alpha"], port) == "alpha"
    assert await answer(servers.public["beta"], port) == "beta"
    assert await servers.dial("alpha", "127.0.0.1", local_port) == "alpha"
    assert await servers.dial("beta", "127.0.0.1", local_port) == "refused"
    assert await answer(servers.public["alpha"], local_port) == "refused"
    with socket.create_server(("0.0.0.0", port)):
        pass  # nobody on this machine's own interfaces holds it
    # Private addresses are for the servers of the network, not for the client.
    assert await servers.dial("beta", servers.private["alpha"], port) == "alpha"
    assert await answer(servers.private["alpha"], port) in ("refused", "dropped")
    # SSH listens on every interface of the server.
    assert await servers.dial("beta", servers.private["alpha"], servers.sim.ssh_port) != "refused"

    # 2. The project's own firewall: only SSH answers at the public address; private
    # traffic is not filtered (Hetzner filters public interfaces only).
    settings = ClusterSettings.build(name="fw", ssh_port=servers.sim.ssh_port)
    # As the SDK sends them: without the fields that are None.
    own = [{k: v for k, v in rule.items() if v is not None} for rule in firewall_rules(settings)]
    r = await servers.raw.post(
        "/firewalls",
        {"name": "fw", "rules": own,
         "apply_to": [{"type": "server", "server": {"id": servers.ids["alpha"]}}]},
    )  # fmt: skip
    assert r.status == 201, r.body
    fw = r.body["firewall"]["id"]
    await servers.sim.settle()
    assert await answer(servers.public["alpha"], port) == "dropped"
    assert await answer(servers.public["beta"], port) == "beta"
    assert await servers.dial("beta", servers.public["alpha"], port) == "dropped"
    assert await servers.dial("beta", servers.private["alpha"], port) == "alpha"
    assert (await servers.run("alpha", "hostname")).stdout == "alpha\n"  # SSH still answers
    # Outbound stays open without outbound rules.
    assert await servers.dial("alpha", servers.public["beta"], port) == "beta"

    # A rule opening the port, then no firewall at all: the port answers again.
    rules = [*own, {"direction": "in", "protocol": "tcp", "port": str(port),
                                         "source_ips": ["0.0.0.0/0"]}]  # fmt: skip
    r = await servers.raw.post(f"/firewalls/{fw}/actions/set_rules", {"rules": rules})
    assert r.status == 201, r.body
    await servers.sim.settle()
    assert await answer(servers.public["alpha"], port) == "alpha"
    r = await servers.raw.post(
        f"/firewalls/{fw}/actions/remove_from_resources",
        {"remove_from": [{"type": "server", "server": {"id": servers.ids["alpha"]}}]},
    )
    for action in r.body["actions"]:
        await wait_action(servers.raw, action["id"])
    await servers.sim.settle()
    await servers.raw.post(f"/firewalls/{fw}/actions/set_rules", {"rules": own})
    await servers.sim.settle()
    assert await answer(servers.public["alpha"], port) == "alpha"


async def test_an_address_without_a_server_is_unreachable_not_this_machine(servers: Servers) -> None:
    """Before a server boots (the client already probes its SSH) and after it is deleted, its
    address has no host, as on Hetzner. It must not fall to this machine's loopback, where
    whatever listens on 0.0.0.0 (a CI machine's sshd on port 22) would answer instead."""
    port = free_port("0.0.0.0")
    block = servers.sim.store.public_pool.block
    with socket.create_server(("0.0.0.0", port)):  # this machine's own service
        for ip in (f"127.{block}.200.9", f"127.{block}.0.1"):  # never handed out; the next one
            assert await reach(ip, port) == "unreachable"
        await servers.create(["alpha"])
        await servers.serve("alpha", "0.0.0.0", port)
        assert await answer(servers.public["alpha"], port) == "alpha"
        gone = await servers.raw.delete(f"/servers/{servers.ids.pop('alpha')}")
        assert gone.status == 200, gone.body
        await servers.sim.settle(timeout=60)
        assert await reach(servers.public["alpha"], port) == "unreachable"


async def test_a_booting_server_never_answers_for_anothers_address(servers: Servers) -> None:
    """Between its namespace's link and its addresses, a server's namespace holds all of
    127.0.0.0/8 (its lo): it must not answer ARP for another server's address, or this
    machine sends that server's packets to it (an SSH stall of ~30 s, until the entry aged)."""
    network = servers.sim.hosts.networking._network.result()
    block = servers.sim.store.public_pool.block
    other = f"127.{block}.201.7"  # never handed out: no namespace has it
    holder = await netns.Holder.start()
    try:
        await network.attach(999_999, holder)  # linked, no addresses yet: a booting server
        await netns.run(["ip", "route", "replace", "table", "local", f"{other}/32",
                         "dev", network.link, "src", network.client_ip])  # fmt: skip
        # Traffic to it makes this machine ask (ARP) who has it: nobody may say "me" (then
        # the namespace's TCP refuses the connection).
        assert await reach(other, 22) in ("unreachable", "dropped")
        neighbour = await netns.run(["ip", "neigh", "show", "to", other, "dev", network.link])
        assert "lladdr" not in neighbour, neighbour
    finally:
        await netns.run(["ip", "route", "del", "table", "local", f"{other}/32", "dev", network.link])
        await holder.stop()


async def reach(host: str, port: int) -> str:
    """"unreachable" when the kernel has no way to ``host``; else what ``answer`` says."""
    try:
        return await answer(host, port)
    except OSError as e:
        if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return "unreachable"
        raise


def test_a_killed_simulator_leaves_no_network_behind(tmp_path: Path) -> None:
    """SIGKILL gives the simulator no chance to clean up: the kernel must do it."""
    import signal
    import subprocess
    import sys
    import time

    import hcloud
    from hcloud.images import Image
    from hcloud.server_types import ServerType

    proc = subprocess.Popen(
        [sys.executable, "-m", "dask_hetzner.sim", "--port", "0"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        endpoint = proc.stdout.readline().strip().split("=", 1)[1]
        token = proc.stdout.readline().strip().split("=", 1)[1]
        client = hcloud.Client(token=token, api_endpoint=endpoint, poll_interval=0.05)
        created = client.servers.create(
            "doomed", server_type=ServerType(name="cpx22"), image=Image(name="ubuntu-24.04")
        )
        created.action.wait_until_finished()
        ip = created.server.public_net.ipv4.ip
        deadline = time.monotonic() + 60
        while client.servers.get_by_id(created.server.id).status != "running":
            assert time.monotonic() < deadline, "the server did not reach running"
            time.sleep(0.05)
        while True:  # SSH comes up after running, as on Hetzner
            try:
                with socket.create_connection((ip, 22), timeout=10) as sock:  # in its namespace
                    assert sock.recv(100).startswith(b"SSH-2.0-")
                    break
            except OSError as e:  # refused by the server, or no route to it yet
                if e.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH):
                    raise
                assert time.monotonic() < deadline, "SSH did not come up"
                time.sleep(0.05)
        link = f"dhsim{proc.pid}"
        assert link in os.listdir("/sys/class/net")
        root_dirs = list(Path(tempfile.gettempdir()).glob(f"{ROOT_PREFIX}{proc.pid}-*"))
        assert len(root_dirs) == 1, root_dirs
        in_memory = os.path.ismount(root_dirs[0])  # its tmpfs (DASK_HETZNER_SIM_DISKS=memory)
        assert in_memory == (os.geteuid() == 0 and os.environ.get("DASK_HETZNER_SIM_DISKS") == "memory")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while link in os.listdir("/sys/class/net") or _route_to(ip):
        assert time.monotonic() < deadline, "the killed simulator's link or route stayed"
        time.sleep(0.05)
    # Its guard route (Network.guarded) is carried by no link: the next start reclaims it.
    guard = ip.rsplit(".", 2)[0] + ".0.0/16"
    assert guard in _unreachable_routes()
    asyncio.run(netns.reclaim())
    assert guard not in _unreachable_routes()
    # Its directory (the servers' disks) too; a live simulator's is kept.
    assert root_dirs[0].exists()
    assert root_dirs[0] in reclaim_root_dirs()
    assert not root_dirs[0].exists()
    if in_memory:  # unmounted too: the memory is free
        with open("/proc/self/mounts") as mounts:
            assert str(root_dirs[0]) not in mounts.read()


def _unreachable_routes() -> str:
    import subprocess

    return subprocess.run(
        ["ip", "route", "show", "table", "local", "type", "unreachable"], capture_output=True, text=True
    ).stdout


def _route_to(ip: str) -> bool:
    import subprocess

    out = subprocess.run(["ip", "route", "show", "table", "local", f"{ip}/32"], capture_output=True, text=True)
    return bool(out.stdout.strip())


async def test_a_server_from_a_snapshot_starts_with_its_disk(servers: Servers) -> None:
    await servers.create(["origin"])
    # A user with a home of its own (/etc and /home are the server's), owning a file.
    made = await servers.run(
        "origin",
        "echo kept > /root/data && echo conf > /etc/app.conf && useradd -m dask "
        "&& echo mine > /home/dask/f && chown dask: /home/dask/f",
    )
    assert made.exit_status == 0, made.stderr
    r = await servers.raw.post(f"/servers/{servers.ids['origin']}/actions/create_image", {"type": "snapshot"})
    assert r.status == 201, r.body
    await wait_action(servers.raw, r.body["action"]["id"])
    image = r.body["image"]["id"]
    # Its size is what the disk holds: the files written above (a few bytes, not GBs).
    size = (await servers.raw.get(f"/images/{image}")).body["image"]["image_size"]
    assert 0 < size < 0.01, size
    key = (await servers.raw.get("/ssh_keys")).body["ssh_keys"][0]["id"]
    r = await servers.raw.post("/servers", server_body("copy", image=image, ssh_keys=[key]))
    assert r.status == 201, r.body
    servers.ids["copy"] = r.body["server"]["id"]
    servers.public["copy"] = r.body["server"]["public_net"]["ipv4"]["ip"]
    await servers.sim.settle(timeout=60)
    seen = await servers.run("copy", "cat /root/data /etc/app.conf; hostname; stat -c %U /home/dask/f")
    assert seen.stdout == "kept\nconf\ncopy\ndask\n", seen.stderr
    d = await servers.raw.delete(f"/images/{image}")
    assert d.status == 204, d.body
