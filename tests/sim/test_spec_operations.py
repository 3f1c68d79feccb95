"""Every implemented operation answers what the spec says, and the SDK parses it."""

from __future__ import annotations

import warnings

import pytest
import requests
from hcloud import APIException
from hcloud.actions import BoundAction
from hcloud.core import Meta
from hcloud.firewalls import FirewallResource, FirewallRule
from hcloud.images import Image
from hcloud.networks import NetworkSubnet
from hcloud.server_types import ServerType
from sim_helpers import sdk, ssh_public_key

from dask_hetzner.sim import Simulator, SpecViolation
from dask_hetzner.sim.routes import ROUTES, check_routes_against_spec
from dask_hetzner.sim.schema import load_spec


def test_routes_are_spec_operations():
    check_routes_against_spec(load_spec())


def _raw(sim, method, path, **kw):
    r = requests.request(
        method,
        sim.endpoint + path,
        headers={"Authorization": f"Bearer {sim.token}"},
        timeout=10,
        **kw,
    )
    body = r.json() if r.content else None
    return r.status_code, body


def test_every_operation_validates_and_parses(tsim):
    spec = load_spec()
    c = sdk(tsim)
    checked = []

    def raw(method, path, op, **kw):
        status, body = _raw(tsim, method, path, **kw)
        spec.check_response(op, status, body)  # independent of the runtime check
        checked.append(op)
        return status, body

    # Catalog.
    assert len(c.server_types.get_all()) >= 25
    assert c.server_types.get_by_id(c.server_types.get_by_name("cx23").id).cores == 2
    assert {loc.name for loc in c.locations.get_all()} == {
        "fsn1",
        "nbg1",
        "hel1",
        "ash",
        "hil",
        "sin",
    }
    assert c.locations.get_by_id(1).name == "fsn1"
    images = c.images.get_all(type=["system"])
    assert {(i.name, i.architecture) for i in images} >= {
        ("debian-13", "arm"),
        ("ubuntu-24.04", "x86"),
    }
    assert c.images.get_by_id(images[0].id).type == "system"
    with warnings.catch_warnings(), pytest.raises(APIException) as exc:
        warnings.simplefilter("ignore", DeprecationWarning)
        c.datacenters.get_all()
    assert exc.value.code == "deprecated_api_endpoint"
    status, body = raw("GET", "/datacenters/1", "get_datacenter")
    assert status == 410

    # Shared resources.
    key = c.ssh_keys.create(name="key", public_key=ssh_public_key(), labels={"a": "1"})
    assert c.ssh_keys.get_all(label_selector="a=1")[0].id == key.id
    key = c.ssh_keys.get_by_id(key.id).update(name="key2")
    net = c.networks.create(name="net", ip_range="10.0.0.0/16")
    c.networks.add_subnet(
        net, NetworkSubnet(ip_range="10.0.1.0/24", network_zone="eu-central", type="cloud")
    )
    c.networks.add_subnet(
        net, NetworkSubnet(ip_range="10.0.9.0/24", network_zone="us-west", type="cloud")
    )
    c.networks.delete_subnet(net, NetworkSubnet(ip_range="10.0.9.0/24"))
    net = c.networks.get_by_id(net.id).update(labels={"n": "1"})
    assert [n.id for n in c.networks.get_all()] == [net.id]
    fw = c.firewalls.create(
        name="fw",
        rules=[
            FirewallRule(direction="in", protocol="tcp", port="80-85", source_ips=["10.0.0.0/8"])
        ],
    ).firewall
    assert c.firewalls.get_all()[0].rules[0].port == "80-85"
    fw = c.firewalls.get_by_id(fw.id)
    fw.update(labels={"f": "1"})
    pg = c.placement_groups.create(name="pg", type="spread").placement_group
    pg = c.placement_groups.get_by_id(pg.id).update(labels={"p": "1"})
    assert [p.name for p in c.placement_groups.get_all(label_selector="p")] == ["pg"]

    # Servers and their actions.
    r = c.servers.create(
        name="s1",
        server_type=ServerType(name="cpx22"),
        image=Image(name="ubuntu-24.04"),
        ssh_keys=[key],
    )
    r.next_actions[0].wait_until_finished()
    server = c.servers.get_by_id(r.server.id)
    assert c.servers.get_all()[0].id == server.id
    server.update(labels={"s": "1"})
    server.attach_to_network(net).wait_until_finished()
    c.firewalls.apply_to_resources(fw, [FirewallResource(type="server", server=server)])
    c.firewalls.set_rules(fw, [])
    c.firewalls.remove_from_resources(fw, [FirewallResource(type="server", server=server)])
    server.detach_from_network(net).wait_until_finished()
    for verb in ("power_off", "power_on", "shutdown", "power_on", "reboot", "reset", "power_off"):
        getattr(server, verb)().wait_until_finished()
    server.add_to_placement_group(pg).wait_until_finished()
    server.remove_from_placement_group().wait_until_finished()
    snap = server.create_image(description="snap", labels={"i": "1"})
    snap.action.wait_until_finished()
    img = c.images.update(c.images.get_by_id(snap.image.id), labels={"i": "2"})

    # Action endpoints, through the SDK where it has a method.
    server_actions = c.servers.get_actions_list(server).actions
    assert server_actions and server_actions[0].command == "create_server"
    assert c.servers.actions.get_by_id(server_actions[0].id).id == server_actions[0].id
    assert c.servers.actions.get_list(status=["success"]).actions
    assert c.actions.get_by_id(server_actions[0].id).status == "success"
    for kind, rid in (
        ("servers", server.id),
        ("networks", net.id),
        ("firewalls", fw.id),
        ("images", img.id),
    ):
        client = getattr(c, kind)
        listed = client.actions.get_list().actions
        assert listed, kind
        aid = listed[0].id
        assert client.actions.get_by_id(aid).id == aid
        own = client.get_actions_list(client.get_by_id(rid)).actions
        assert own, kind
        status, body = raw("GET", f"/{kind}/{rid}/actions/{own[0].id}", f"get_{kind[:-1]}_action")
        assert status == 200 and BoundAction(c.actions, body["action"]).id == own[0].id
    # GET /pricing (no SDK client in hcloud 2.27): server types and Primary IPs, per location.
    status, body = raw("GET", "/pricing", "get_pricing")
    ipv4 = [e for e in body["pricing"]["primary_ips"] if e["type"] == "ipv4"][0]["prices"]
    assert status == 200 and {p["location"] for p in ipv4} == {loc.name for loc in c.locations.get_all()}
    ids = [a.id for a in server_actions[:3]]
    status, body = raw("GET", "/actions", "get_actions", params=[("id", i) for i in ids])
    assert status == 200 and [BoundAction(c.actions, a).id for a in body["actions"]] == ids
    status, body = raw("GET", "/servers", "list_servers", params={"per_page": 1})
    assert Meta.parse_meta(body).pagination.total_entries == 1

    # Teardown through the delete operations.
    c.servers.delete(server).wait_until_finished()
    c.images.delete(img)
    for resource in (fw, pg, net, key):
        resource.delete()

    exercised = {k for k, n in tsim.stats.ok.items() if n}
    expected = {f"{r.method} {r.template}" for r in ROUTES} - {
        "GET /datacenters",
        "GET /datacenters/{id}",
    }
    assert expected - exercised == set()
    assert tsim.stats.requests["GET /datacenters"] == 1
    assert tsim.violations == []


def test_validate_responses_catches_drift():
    with pytest.raises(SpecViolation, match="list_locations"):
        with Simulator(hosts=False, validate_responses=True) as sim:
            from dask_hetzner.sim import catalog

            loc = catalog.LOCATIONS[0]
            original = type(loc).to_json
            try:
                type(loc).to_json = lambda self: {**original(self), "latitude": "north"}  # drift
                status, body = _raw(sim, "GET", "/locations")
            finally:
                type(loc).to_json = original
            assert status == 500 and body["error"]["code"] == "server_error"
            assert sim.violations
