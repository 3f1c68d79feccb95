"""How the simulator drives its HostManager, and addresses handed to hosts."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from sim_helpers import FakeHosts, Raw, delete_all, server_body, ssh_public_key, wait_action
from support import free_port

from dask_hetzner.sim import Simulator
from dask_hetzner.sim.store import AddressPool


async def _act(raw: Raw, sim: Simulator, server_id: int, verb: str) -> None:
    r = await raw.post(f"/servers/{server_id}/actions/{verb}")
    assert r.status == 201, r.body
    await wait_action(raw, r.body["action"]["id"])
    await sim.settle()


async def test_boot_spec_and_power_calls(fake_hosts: FakeHosts):
    async with Simulator(hosts=fake_hosts, validate_responses=True) as sim, Raw(sim) as raw:
        assert sim.hosts is fake_hosts
        keys = [ssh_public_key("a@x"), ssh_public_key("b@y")]
        ids = []
        for i, pub in enumerate(keys):
            ids.append((await raw.post("/ssh_keys", {"name": f"k{i}", "public_key": pub})).body["ssh_key"]["id"])
        net = (
            await raw.post(
                "/networks",
                {"name": "n", "ip_range": "10.0.0.0/16", "subnets": [{"type": "cloud", "ip_range": "10.0.0.0/24", "network_zone": "eu-central"}]},
            )
        ).body["network"]
        user_data = "#cloud-config\nssh_keys:\n  ed25519_private: x\n"
        r = await raw.post(
            "/servers", server_body("host-1", ssh_keys=[ids[0], "k1"], networks=[net["id"]], user_data=user_data)
        )
        assert r.status == 201 and "user_data" not in r.body["server"]
        sid = r.body["server"]["id"]
        assert fake_hosts.of(sid) == []  # nothing boots before the server is running
        await sim.settle()
        server = (await raw.get(f"/servers/{sid}")).body["server"]
        spec = fake_hosts.specs[sid]
        assert spec.server_id == sid and spec.name == "host-1"
        assert spec.public_ip == server["public_net"]["ipv4"]["ip"]
        assert spec.private_ips == [server["private_net"][0]["ip"]]
        assert spec.authorized_keys == keys
        assert spec.user_data == user_data
        assert fake_hosts.last("boot", sid).kwargs == {"ssh_delay": 0.0, "ssh_never": False}

        await _act(raw, sim, sid, "poweroff")
        await _act(raw, sim, sid, "poweron")
        await _act(raw, sim, sid, "shutdown")
        await _act(raw, sim, sid, "poweron")
        await _act(raw, sim, sid, "reboot")
        assert fake_hosts.of(sid) == ["boot", "power_off", "boot", "power_off", "boot", "power_off", "boot"]
        await _act(raw, sim, sid, "poweron")  # already running: nothing happens
        assert fake_hosts.of(sid)[-1] == "boot" and len(fake_hosts.of(sid)) == 7

        r = await raw.delete(f"/servers/{sid}")
        await wait_action(raw, r.body["action"]["id"])
        assert fake_hosts.of(sid)[-1] == "destroy"
        await delete_all(raw, sim)
    assert fake_hosts.closed


async def test_close_destroys_through_hosts_close(fake_hosts: FakeHosts):
    sim = Simulator(hosts=fake_hosts)
    await sim.start()
    async with Raw(sim) as raw:
        await raw.post("/servers", server_body("left-behind"))
        await sim.settle()
    assert len(sim.leaks()["servers"]) == 1
    await sim.close()
    assert fake_hosts.closed


async def test_no_hosts(asim):
    assert asim.hosts is None
    assert asim.dask_config() == {
        "hetzner.token": asim.token,
        "hetzner.api-endpoint": asim.endpoint,
        "hetzner.ssh-port": 22,
        "hetzner.scheduler-port": 0,
        "hetzner.dashboard-port": 0,
        "hetzner.api.poll-interval": "100ms",
        "hetzner.python-downloads-json-url": asim.python_downloads_url,
    }
    async with Raw(asim) as raw:
        sid = (await raw.post("/servers", server_body("x"))).body["server"]["id"]
        await asim.settle()
        assert "booted" in asim.timings(sid)["phases"]
        await delete_all(raw, asim)
    assert asim.stats["total"] == asim.stats.total > 0
    assert asim.stats["requests"]["POST /servers"] == 1


def test_address_pools_are_exclusive_per_simulator():
    a = AddressPool("public", range(64, 128))
    b = AddressPool("public", range(64, 128))
    try:
        assert a.block != b.block
        ips = [a.allocate()[0] for _ in range(600)]
        assert len(set(ips)) == 600
        for ip in ips:
            addr = ipaddress.ip_address(ip)
            assert addr in ipaddress.ip_network("127.64.0.0/10")
            assert ip.rsplit(".", 1)[1] not in ("0", "255")
        a.release(ips[0])
        assert a.allocate()[0] != ips[0]  # fresh addresses first: no quick reuse
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(60)
async def test_real_hosts_listen_for_ssh(tmp_path):
    """End to end with sim/hosts.py: a running server accepts TCP on its SSH port."""
    port = free_port()
    async with Simulator(hosts=True, ssh_port=port, root_dir=tmp_path / "root") as sim, Raw(sim) as raw:
        key = (await raw.post("/ssh_keys", {"name": "k", "public_key": ssh_public_key()})).body["ssh_key"]
        r = await raw.post("/servers", server_body("real", ssh_keys=[key["id"]]))
        sid, ip = r.body["server"]["id"], r.body["server"]["public_net"]["ipv4"]["ip"]
        await sim.settle(timeout=30)
        assert sim.host_errors == []
        assert sim.hosts.directory(sid).is_dir()
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), 10)
        banner = await asyncio.wait_for(reader.readline(), 10)
        assert banner.startswith(b"SSH-2.0-")
        writer.close()
        r = await raw.delete(f"/servers/{sid}")
        await wait_action(raw, r.body["action"]["id"])
        await sim.hosts.removed()  # the disk goes in the background
        assert not sim.hosts.directory(sid).exists()
        await delete_all(raw, sim)
        assert sim.leaks() == {}


@pytest.mark.timeout(60)
async def test_delete_does_not_wait_for_the_disk(tmp_path, monkeypatch):
    """A deleted server leaves the API after its action, however long its directory takes."""
    import threading

    from dask_hetzner.sim import hosts as hosts_module

    release = threading.Event()
    real_rmtree = hosts_module.rmtree

    def slow_rmtree(*paths):
        release.wait(30)  # a loaded disk
        real_rmtree(*paths)

    monkeypatch.setattr(hosts_module, "rmtree", slow_rmtree)
    port = free_port()
    try:
        async with Simulator(hosts=True, ssh_port=port, root_dir=tmp_path / "root") as sim, Raw(sim) as raw:
            key = (await raw.post("/ssh_keys", {"name": "k", "public_key": ssh_public_key()})).body["ssh_key"]
            r = await raw.post("/servers", server_body("disk", ssh_keys=[key["id"]]))
            sid = r.body["server"]["id"]
            await sim.settle(timeout=30)
            assert sim.hosts.directory(sid).is_dir()
            r = await raw.delete(f"/servers/{sid}")
            await wait_action(raw, r.body["action"]["id"])
            await sim.settle(timeout=30)
            assert (await raw.get(f"/servers/{sid}")).status == 404
            assert sim.hosts.directory(sid).is_dir()  # still being removed
            release.set()
            await sim.hosts.removed()
            assert not sim.hosts.directory(sid).exists()
            await delete_all(raw, sim)
            assert sim.leaks() == {}
    finally:
        release.set()
