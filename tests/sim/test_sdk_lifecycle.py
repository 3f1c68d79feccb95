"""A whole cluster's life through the official SDK, ending with nothing left."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from hcloud import APIException
from hcloud.firewalls import FirewallResource, FirewallResourceLabelSelector, FirewallRule
from hcloud.images import Image
from hcloud.locations import Location
from hcloud.networks import NetworkSubnet
from hcloud.server_types import ServerType
from sim_helpers import LABELS, sdk, ssh_public_key

PUBLIC = ipaddress.ip_network("127.64.0.0/10")
PRIVATE = ipaddress.ip_network("127.128.0.0/9")


def test_cluster_life_threaded(tsim):
    c = sdk(tsim)
    st = c.server_types.get_by_name("cx23")
    loc = c.locations.get_by_name("nbg1")
    img = c.images.get_by_name_and_architecture("ubuntu-24.04", st.architecture)
    assert img is not None and img.architecture == "x86"
    price = next(p for p in st.prices if p["location"] == "nbg1")
    assert float(price["price_hourly"]["gross"]) > float(price["price_hourly"]["net"]) > 0

    key = c.ssh_keys.create(name="c1-key", public_key=ssh_public_key(), labels=LABELS)
    net = c.networks.create(
        name="c1-net",
        ip_range="10.0.0.0/16",
        subnets=[NetworkSubnet(ip_range="10.0.1.0/24", network_zone="eu-central", type="cloud")],
        labels=LABELS,
    )
    fw = c.firewalls.create(
        name="c1-fw",
        labels=LABELS,
        rules=[
            FirewallRule(
                direction="in", protocol="tcp", port="22", source_ips=["0.0.0.0/0", "::/0"]
            )
        ],
    ).firewall
    pg = c.placement_groups.create(name="c1-pg", type="spread", labels=LABELS).placement_group

    created = []
    for i, role in enumerate(["scheduler", "worker", "worker", "worker"]):
        r = c.servers.create(
            name=f"c1-{role}-{i}",
            server_type=st,
            image=img,
            location=loc,
            ssh_keys=[key],
            networks=[net],
            firewalls=[fw],
            placement_group=pg,
            user_data="#cloud-config\n",
            labels={**LABELS, "dask-hetzner/role": role},
        )
        assert r.server.status == "initializing"
        # As on Hetzner: the private IP shows once attach_to_network has finished.
        assert r.server.private_net == []
        assert r.action.command == "create_server"
        assert [a.command for a in r.next_actions] == [
            "start_server",
            "attach_to_network",
            "apply_firewall",
        ]
        assert r.root_password is None
        created.append(r)
    for r in created:
        r.action.wait_until_finished()
        for a in r.next_actions:
            a.wait_until_finished()

    workers = c.servers.get_all(label_selector="dask-hetzner/cluster=c1,dask-hetzner/role=worker")
    assert sorted(s.name for s in workers) == ["c1-worker-1", "c1-worker-2", "c1-worker-3"]
    everyone = c.servers.get_all(label_selector="dask-hetzner/cluster=c1")
    assert {s.status for s in everyone} == {"running"}
    publics = {s.public_net.ipv4.ip for s in everyone}
    privates = {s.private_net[0].ip for s in everyone}
    assert len(publics) == len(privates) == 4
    assert all(ipaddress.ip_address(ip) in PUBLIC for ip in publics)
    assert all(ipaddress.ip_address(ip) in PRIVATE for ip in privates)
    assert all(s.public_net.ipv6.network_mask == "64" for s in everyone)
    assert all(s.placement_group.id == pg.id for s in everyone)
    assert all([f.firewall.id for f in s.public_net.firewalls] == [fw.id] for s in everyone)

    fw = c.firewalls.get_by_id(fw.id)
    assert sorted(r.server.id for r in fw.applied_to) == sorted(s.id for s in everyone)
    assert sorted(c.placement_groups.get_by_id(pg.id).servers) == sorted(s.id for s in everyone)
    assert sorted(s.id for s in c.networks.get_by_id(net.id).servers) == sorted(
        s.id for s in everyone
    )

    # The firewall is still applied while the servers are only being deleted.
    deletions = [c.servers.delete(s) for s in everyone]
    assert {a.command for a in deletions} == {"delete_server"}
    for a in deletions:
        a.wait_until_finished()
    assert c.servers.get_all(label_selector="dask-hetzner/cluster=c1") == []
    assert c.firewalls.get_by_id(fw.id).applied_to == []
    assert c.placement_groups.get_by_id(pg.id).servers == []
    assert c.networks.get_by_id(net.id).servers == []
    for resource in (fw, pg, net, key):
        resource.delete()
    assert tsim.leaks() == {}


async def test_cluster_life_async(asim):
    """The same through ``asyncio.to_thread``, as ``cloud.py`` does it."""
    c = sdk(asim)
    key = await asyncio.to_thread(c.ssh_keys.create, name="k", public_key=ssh_public_key())
    responses = await asyncio.gather(
        *[
            asyncio.to_thread(
                c.servers.create,
                name=f"n{i}",
                server_type=ServerType(name="cax11"),
                image=Image(name="debian-13"),
                location=Location(name="hel1"),
                ssh_keys=[key],
                labels={"pool": "a"},
            )
            for i in range(5)
        ]
    )
    await asyncio.gather(
        *[asyncio.to_thread(r.next_actions[0].wait_until_finished) for r in responses]
    )
    servers = await asyncio.to_thread(
        c.servers.get_all, label_selector="pool=a", status=["running"]
    )
    assert len(servers) == 5
    assert {s.image.architecture for s in servers} == {"arm"}
    deletes = await asyncio.gather(*[asyncio.to_thread(s.delete) for s in servers])
    await asyncio.gather(*[asyncio.to_thread(a.wait_until_finished) for a in deletes])
    await asyncio.to_thread(key.delete)


def test_power_cycle_snapshot_and_updates(tsim):
    c = sdk(tsim)
    r = c.servers.create(
        name="box", server_type=ServerType(name="cpx12"), image=Image(name="ubuntu-22.04")
    )
    assert r.root_password  # no ssh keys: a password is generated
    r.next_actions[0].wait_until_finished()
    server = c.servers.get_by_id(r.server.id)
    assert server.status == "running" and server.location.name == "fsn1"

    server.power_off().wait_until_finished()
    assert c.servers.get_by_id(server.id).status == "off"
    server.power_on().wait_until_finished()
    assert c.servers.get_by_id(server.id).status == "running"
    server.shutdown().wait_until_finished()
    assert c.servers.get_by_id(server.id).status == "off"
    server.power_on().wait_until_finished()
    server.reboot().wait_until_finished()
    server.reset().wait_until_finished()
    assert c.servers.get_by_id(server.id).status == "running"

    server = server.update(name="box2", labels={"k": "v"})
    assert (server.name, server.labels) == ("box2", {"k": "v"})

    snap = server.create_image(description="golden", labels={"image": "golden"})
    snap.action.wait_until_finished()
    found = c.images.get_all(label_selector="image=golden", type=["snapshot"])
    assert [i.id for i in found] == [snap.image.id]
    assert found[0].status == "available" and found[0].created_from.id == server.id
    img = c.images.update(found[0], description="golden v2", labels={"image": "golden", "v": "2"})
    assert img.description == "golden v2"

    # A server from the snapshot.
    r2 = c.servers.create(
        name="from-snap", server_type=ServerType(name="cx23"), image=Image(id=img.id)
    )
    r2.next_actions[0].wait_until_finished()
    assert c.servers.get_by_id(r2.server.id).image.id == img.id

    # Network attach/detach and placement group join/leave on a stopped server.
    net = c.networks.create(name="net", ip_range="10.1.0.0/16")
    c.networks.add_subnet(
        net, NetworkSubnet(ip_range="10.1.0.0/24", network_zone="eu-central", type="cloud")
    ).wait_until_finished()
    server.attach_to_network(net, ip="10.1.0.7").wait_until_finished()
    assert c.servers.get_by_id(server.id).private_net[0].network.id == net.id
    with pytest.raises(APIException) as exc:
        server.attach_to_network(net)
    assert exc.value.code == "server_already_attached"
    # An explicit private IP is one server's in its network (docs/simulator.md, "Private IPs").
    with pytest.raises(APIException) as exc:
        c.servers.get_by_id(r2.server.id).attach_to_network(net, ip="10.1.0.7")
    assert exc.value.code == "ip_not_available"
    server.detach_from_network(net).wait_until_finished()
    assert c.servers.get_by_id(server.id).private_net == []
    pg = c.placement_groups.create(name="pg", type="spread").placement_group
    with pytest.raises(APIException) as exc:
        server.add_to_placement_group(pg)
    assert exc.value.code == "server_not_stopped"
    server.power_off().wait_until_finished()
    server.add_to_placement_group(pg).wait_until_finished()
    assert c.servers.get_by_id(server.id).placement_group.id == pg.id
    server.remove_from_placement_group().wait_until_finished()

    for s in (server, r2.server):
        c.servers.delete(s).wait_until_finished()
    c.images.delete(img)
    for resource in (net, pg):
        resource.delete()


def test_firewall_label_selector_and_actions(tsim):
    c = sdk(tsim)
    fw = c.firewalls.create(
        name="fw",
        resources=[
            FirewallResource(
                type="label_selector", label_selector=FirewallResourceLabelSelector("role=w")
            )
        ],
    )
    assert [a.command for a in fw.actions] == ["apply_firewall"]
    fw = fw.firewall
    r = c.servers.create(
        name="w1",
        server_type=ServerType(name="cpx22"),
        image=Image(name="debian-12"),
        labels={"role": "w"},
    )
    r.action.wait_until_finished()
    got = c.firewalls.get_by_id(fw.id)
    assert got.applied_to[0].label_selector.selector == "role=w"
    assert [x.server.id for x in got.applied_to[0].applied_to_resources] == [r.server.id]
    assert [f.firewall.id for f in c.servers.get_by_id(r.server.id).public_net.firewalls] == [fw.id]

    # Applied by selector: cannot be removed from the server directly, and is in use.
    with pytest.raises(APIException) as exc:
        c.firewalls.remove_from_resources(fw, [FirewallResource(type="server", server=r.server)])
    assert exc.value.code == "firewall_managed_by_label_selector"
    with pytest.raises(APIException) as exc:
        fw.delete()
    assert exc.value.code == "resource_in_use"

    actions = c.firewalls.set_rules(
        fw, [FirewallRule(direction="out", protocol="icmp", destination_ips=["0.0.0.0/0"])]
    )
    assert actions[0].command == "set_firewall_rules"
    rule = c.firewalls.get_by_id(fw.id).rules[0]
    assert (rule.direction, rule.port, rule.source_ips, rule.description) == ("out", None, [], None)
    c.firewalls.remove_from_resources(
        fw,
        [
            FirewallResource(
                type="label_selector", label_selector=FirewallResourceLabelSelector("role=w")
            )
        ],
    )
    c.firewalls.apply_to_resources(fw, [FirewallResource(type="server", server=r.server)])
    with pytest.raises(APIException) as exc:
        c.firewalls.apply_to_resources(fw, [FirewallResource(type="server", server=r.server)])
    assert exc.value.code == "firewall_already_applied"
    c.firewalls.remove_from_resources(fw, [FirewallResource(type="server", server=r.server)])
    fw.update(name="fw2", labels={"x": "y"})
    c.servers.delete(r.server).wait_until_finished()
    fw.delete()


def test_network_delete_detaches_and_ssh_key_update(tsim):
    c = sdk(tsim)
    key = c.ssh_keys.create(name="k", public_key=ssh_public_key())
    key = key.update(name="k2", labels={"a": "b"})
    assert c.ssh_keys.get_by_fingerprint(key.fingerprint).name == "k2"
    net = c.networks.create(
        name="n",
        ip_range="10.2.0.0/16",
        subnets=[NetworkSubnet(ip_range="10.2.3.0/24", network_zone="us-east", type="cloud")],
    )
    assert net.subnets[0].ip_range == "10.2.3.0/24" and net.subnets[0].gateway == "10.2.0.1"
    r = c.servers.create(
        name="us",
        server_type=ServerType(name="ccx13"),
        image=Image(name="ubuntu-24.04"),
        location=Location(name="ash"),
        networks=[net],
        ssh_keys=[key],
    )
    r.action.wait_until_finished()
    c.networks.delete(net)  # "attached resources will be detached automatically"
    assert c.servers.get_by_id(r.server.id).private_net == []
    c.servers.delete(r.server).wait_until_finished()
    key.delete()
