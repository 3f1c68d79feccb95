"""Every fault kind, API faults through raw HTTP or the SDK, host faults on a fake HostManager."""

from __future__ import annotations

import asyncio

import pytest
from hcloud import APIException
from hcloud.actions.domain import ActionFailedException
from hcloud.images import Image
from hcloud.server_types import ServerType
from sim_helpers import (
    FakeHosts,
    Raw,
    delete_all,
    sdk,
    server_body,
    ssh_public_key,
    until,
    wait_action,
)

from dask_hetzner.sim import Simulator
from dask_hetzner.sim.faults import API_FAULTS, HOST_FAULTS, KINDS, parse_fault


async def test_resource_unavailable_by_location(asim):
    rule = asim.inject("resource_unavailable", location="fsn1", count=2)
    async with Raw(asim) as raw:
        for name in ("a", "b"):
            r = await raw.post("/servers", server_body(name, location="fsn1"))
            assert (r.status, r.code) == (412, "resource_unavailable")
            assert r.body["error"]["message"] == "error during placement"
        assert (await raw.post("/servers", server_body("c", location="nbg1"))).status == 201
        assert (await raw.post("/servers", server_body("d", location="fsn1"))).status == 201
        assert (rule.hits, rule.seen) == (2, 2)  # "c" did not match; "d" came after the count ran out
        await delete_all(raw, asim)


async def test_resource_limit_exceeded_after_n(asim):
    asim.inject("resource_limit_exceeded", after=2)
    async with Raw(asim) as raw:
        assert (await raw.post("/servers", server_body("a"))).status == 201
        assert (await raw.post("/servers", server_body("b"))).status == 201
        r = await raw.post("/servers", server_body("c"))
        assert (r.status, r.code) == (403, "resource_limit_exceeded")
        assert r.body["error"]["details"]["limits"] == [{"name": "server_limit"}]
        await delete_all(raw, asim)


def test_rate_limit_fault_is_retried_by_the_sdk(tsim):
    rule = tsim.inject("rate_limit", path="^/locations$", count=2)
    assert len(sdk(tsim).locations.get_all()) == 6
    assert rule.hits == 2 and tsim.stats.rate_limited == 2
    assert tsim.stats.requests["GET /locations"] == 3


def test_locked_is_not_retried(tsim):
    c = sdk(tsim)
    r = c.servers.create(name="s", server_type=ServerType(name="cpx22"), image=Image(name="debian-12"))
    r.next_actions[0].wait_until_finished()
    tsim.inject("locked", path=r"/actions/poweroff$")
    with pytest.raises(APIException) as exc:
        r.server.power_off()
    assert exc.value.code == "locked"
    tsim.clear_faults()
    c.servers.delete(r.server).wait_until_finished()


def test_action_error_on_create(tsim):
    c = sdk(tsim)
    tsim.inject("action_error", count=1, message="placement failed")
    r = c.servers.create(name="s", server_type=ServerType(name="cpx22"), image=Image(name="debian-12"))
    with pytest.raises(ActionFailedException) as exc:
        r.action.wait_until_finished()
    assert exc.value.action.error["message"] == "placement failed"
    with pytest.raises(ActionFailedException):
        r.next_actions[0].wait_until_finished()
    server = c.servers.get_by_id(r.server.id)  # it exists nevertheless
    assert server.status == "off"
    c.servers.delete(server).wait_until_finished()


@pytest.mark.parametrize(
    "kind,status",
    [("server_error", 500), ("unavailable", 503), ("unknown_error", 500), ("bad_gateway", 502), ("timeout", 504)],
)
async def test_server_side_errors(asim, kind, status):
    rule = asim.inject(kind, method="GET", path="^/servers$", count=1)
    async with Raw(asim) as raw:
        r = await raw.get("/servers")
        assert (r.status, r.code) == (status, kind)
        assert (await raw.get("/servers")).status == 200
    assert rule.hits == 1


def test_error_after_effect_then_sdk_retry_meets_uniqueness(tsim):
    # 502 after the server was created: the SDK retries the POST and meets its own server.
    c = sdk(tsim)
    tsim.inject("bad_gateway", method="POST", path="^/servers$", after_effect=True, count=1)
    with pytest.raises(APIException) as exc:
        c.servers.create(name="dup", server_type=ServerType(name="cpx22"), image=Image(name="debian-12"))
    assert exc.value.code == "uniqueness_error"
    [server] = c.servers.get_all(name="dup")
    tsim.settle_sync()
    c.servers.delete(server).wait_until_finished()


def test_timed_out_post_retried_meets_uniqueness(tsim):
    tsim.inject("uniqueness_error", path="^/servers$", delay=0.5, count=1)
    c = sdk(tsim, timeout=0.2)
    with pytest.raises(APIException) as exc:
        c.servers.create(name="slow", server_type=ServerType(name="cpx22"), image=Image(name="debian-12"))
    assert exc.value.code == "uniqueness_error"
    assert exc.value.details == {"fields": [{"name": "name"}]}
    server = sdk(tsim).servers.get_by_name("slow")
    assert server is not None
    server.delete().wait_until_finished()


async def test_uniqueness_error_plain(asim):
    asim.inject("uniqueness_error", field="public_key", count=1)
    async with Raw(asim) as raw:
        r = await raw.post("/ssh_keys", {"name": "k", "public_key": ssh_public_key()})
        assert (r.status, r.code) == (409, "uniqueness_error")
        assert r.body["error"]["details"] == {"fields": [{"name": "public_key"}]}


async def test_resource_in_use_on_delete(asim):
    rule = asim.inject("resource_in_use", count=1)
    async with Raw(asim) as raw:
        net = (await raw.post("/networks", {"name": "n", "ip_range": "10.0.0.0/16"})).body["network"]
        r = await raw.delete(f"/networks/{net['id']}")
        assert (r.status, r.code) == (422, "resource_in_use")
        assert (await raw.delete(f"/networks/{net['id']}")).status == 204
    assert rule.hits == 1


async def test_placement_error(asim):
    asim.inject("placement_error", count=1)
    async with Raw(asim) as raw:
        r = await raw.post("/servers", server_body("a"))
        assert (r.status, r.code) == (422, "placement_error")


def test_conflict_is_retried_by_the_sdk(tsim):
    c = sdk(tsim)
    fw = c.firewalls.create(name="fw").firewall
    rule = tsim.inject("conflict", path=r"^/firewalls/\d+/actions", count=1)
    c.firewalls.set_rules(fw, [])
    assert rule.hits == 1
    assert tsim.stats.requests["POST /firewalls/{id}/actions/set_rules"] == 2
    fw.delete()


async def test_slow_action_never_finishes(asim):
    rule = asim.inject("slow_action", method="POST", path="^/servers$", command="create_server", duration=None)
    async with Raw(asim) as raw:
        r = await raw.post("/servers", server_body("stuck"))
        action_id, server_id = r.body["action"]["id"], r.body["server"]["id"]
        await asim.settle()  # returns although that action never will
        a = await raw.get(f"/actions/{action_id}")
        assert (a.body["action"]["status"], a.body["action"]["progress"]) == ("running", 0)
        assert (await raw.get(f"/servers/{server_id}")).body["server"]["status"] == "initializing"
        assert asim.timings(server_id)["drawn"]["create"] == float("inf")
        # It still can be deleted; the stuck action then ends in error.
        r = await raw.delete(f"/servers/{server_id}")
        await wait_action(raw, r.body["action"]["id"])
        assert (await wait_action(raw, action_id))["status"] == "error"
    assert rule.hits == 1


async def test_slow_action_duration():
    async with Simulator(hosts=False, validate_responses=True, time_scale=0.5) as sim, Raw(sim) as raw:
        sim.inject("slow_action", command="start_server", duration=0.1)
        r = await raw.post("/servers", server_body("slowstart"))
        await sim.settle()
        t = sim.timings(r.body["server"]["id"])
        assert t["drawn"]["start"] == pytest.approx(0.05)  # scaled by time_scale
        assert t["phases"]["running"] - t["phases"]["created"] >= 0.05
        await delete_all(raw, sim)


async def test_slow_response_applies_then_answers_late(asim):
    asim.inject("slow_response", method="POST", path="^/placement_groups$", delay=0.05, count=1)
    async with Raw(asim) as raw:
        task = asyncio.ensure_future(raw.post("/placement_groups", {"name": "p", "type": "spread"}))
        await until(lambda: bool(asim.store.placement_groups))  # applied before the answer leaves
        assert not task.done()
        assert (await task).status == 201
        await delete_all(raw, asim)


# -- host faults ---------------------------------------------------------------


async def _running(raw: Raw, sim: Simulator, names: list[str]) -> list[int]:
    ids = []
    for name in names:
        r = await raw.post("/servers", server_body(name))
        assert r.status == 201, r.body
        ids.append(r.body["server"]["id"])
    await sim.settle()
    return ids


async def test_host_faults(fake_hosts: FakeHosts):
    async with Simulator(hosts=fake_hosts, validate_responses=True) as sim, Raw(sim) as raw:
        never = sim.inject("ssh_never", name="w-1")
        slow = sim.inject("slow_boot", label_selector="slow", delay=30)
        die_later = sim.inject("processes_die", name="w-3", count=1)
        ids = await _running(raw, sim, ["w-0", "w-1", "w-2"])
        r = await raw.post("/servers", server_body("w-3", labels={"slow": ""}))
        ids.append(r.body["server"]["id"])
        await sim.settle()
        boots = {c.server_id: c.kwargs for c in fake_hosts if c.method == "boot"}
        assert [boots[i]["ssh_never"] for i in ids] == [False, True, False, False]
        assert [boots[i]["ssh_delay"] for i in ids] == [0.0, 0.0, 0.0, 30.0]
        assert sim.timings(ids[3])["drawn"]["slow_boot"] == 30.0
        assert (never.hits, slow.hits, die_later.hits) == (1, 1, 1)
        assert fake_hosts.of(ids[3]) == ["boot", "kill_processes"]

        # processes_die on a running server strikes at once.
        sim.inject("processes_die", name="w-0")
        await sim.settle()
        assert fake_hosts.of(ids[0]) == ["boot", "kill_processes"]

        # server_vanishes: gone from the API, host destroyed, no action.
        vanish = sim.inject("server_vanishes", server_id=ids[2])
        await sim.settle()
        assert vanish.hits == 1
        assert (await raw.get(f"/servers/{ids[2]}")).status == 404
        assert fake_hosts.of(ids[2]) == ["boot", "destroy"]
        assert not [a for a in sim.store.actions.values() if a.command == "delete_server"]
        assert sorted(s["id"] for s in sim.resources()["servers"]) == sorted([ids[0], ids[1], ids[3]])

        # Host faults strike again on later boots (until count runs out).
        r = await raw.post(f"/servers/{ids[1]}/actions/reboot")
        await wait_action(raw, r.body["action"]["id"])
        await sim.settle()
        assert fake_hosts.last("boot", ids[1]).kwargs["ssh_never"] is True
        await delete_all(raw, sim)
        assert sim.leaks() == {}
    assert fake_hosts.closed


async def test_server_vanishes_after_running(fake_hosts: FakeHosts):
    async with Simulator(hosts=fake_hosts, time_scale=0.01) as sim, Raw(sim) as raw:
        sim.inject("server_vanishes", name="gone", after=1.0)  # 10 ms at this scale
        [sid] = await _running(raw, sim, ["gone"])
        assert (await raw.get(f"/servers/{sid}")).status == 404
        assert "vanished" in sim.timings(sid)["phases"]
        assert sim.leaks() == {}


def test_fault_kinds_and_parsing():
    readme_ten = {
        "resource_unavailable", "resource_limit_exceeded", "rate_limit", "locked", "action_error",
        "server_error", "unavailable", "unknown_error", "resource_in_use", "uniqueness_error",
        "placement_error", "conflict", "slow_action",
    }
    assert readme_ten <= set(API_FAULTS)
    assert set(HOST_FAULTS) == {
        "ssh_never", "slow_boot", "processes_die", "server_vanishes", "ssh_drop", "cloud_init_fails",
        "private_nic_missing",
    }
    rule = parse_fault("resource_unavailable:location=fsn1,server_type=cx23,count=2,probability=0.5,seed=3")
    assert (rule.kind, rule.location, rule.server_type, rule.count, rule.probability) == (
        "resource_unavailable", "fsn1", "cx23", 2, 0.5,
    )
    assert parse_fault("slow_action:duration=never,command=create_server").params == {
        "duration": None, "command": "create_server",
    }
    assert parse_fault("locked:path=^/servers/\\d+$,nth=3").count == 1
    for bad in ("nope", "slow_boot:colour=red", "locked:path", "server_error:probability=2"):
        with pytest.raises(ValueError):
            parse_fault(bad)
    assert len(KINDS) == len(set(KINDS))


async def test_probability_is_seeded(asim):
    async def pattern() -> list[int]:
        asim.clear_faults()
        asim.inject("unavailable", method="GET", path="^/locations$", probability=0.5, seed=7)
        async with Raw(asim) as raw:
            return [(await raw.get("/locations")).status for _ in range(20)]

    first, second = await pattern(), await pattern()
    assert first == second and {200, 503} == set(first)
