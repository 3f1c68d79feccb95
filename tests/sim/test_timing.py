"""Profiles, time_scale, seeded draws, and what sim.timings() reports."""

from __future__ import annotations

import time

import pytest
from sim_helpers import Raw, delete_all, server_body

from dask_hetzner.sim import Simulator
from dask_hetzner.sim.store import Action
from dask_hetzner.sim.timing import Timing


def test_realistic_draws_are_seeded_and_in_range():
    a, b = Timing("realistic", seed=42), Timing("realistic", seed=42)
    draws = [(a.create_server(), a.start_server(), a.ssh_delay(), a.api_latency()) for _ in range(500)]
    assert draws == [(b.create_server(), b.start_server(), b.ssh_delay(), b.api_latency()) for _ in range(500)]
    create = [d[0] for d in draws]
    assert 5.0 <= min(create) and max(create) <= 90.0
    assert max(create) > 30.0  # a tail exists
    assert sorted(create)[250] < 20.0  # but the median is modest
    assert all(2.0 <= d[1] <= 5.0 for d in draws)
    ssh = [d[2] for d in draws]
    assert all(2.0 <= s <= 120.0 for s in ssh) and max(ssh) > 30.0
    assert all(0.0 < d[3] <= 0.25 for d in draws)
    assert all(0.8 <= a.api_latency(create_server=True) <= 6.0 for _ in range(100))
    assert Timing("realistic", seed=1).create_server() != Timing("realistic", seed=2).create_server()


def test_a_bigger_image_takes_longer():
    """A server from a snapshot, or a snapshot taken, costs the image's copy: the bigger, the
    longer (realistic profile); nothing in the instant one."""
    small, big = Timing("realistic", seed=5), Timing("realistic", seed=5)
    assert big.create_server(image_gb=3.0) - small.create_server(image_gb=0.5) == pytest.approx(
        small.image_copy(3.0) - small.image_copy(0.5)
    )
    assert small.image_copy(3.0) > small.image_copy(0.5) > 0
    assert Timing("instant").create_server(image_gb=3.0) == Timing("instant").image_copy(3.0) == 0


def test_time_scale_keeps_proportions():
    full, fast = Timing("realistic", 1.0, seed=3), Timing("realistic", 0.05, seed=3)
    for _ in range(20):
        assert fast.create_server() == pytest.approx(full.create_server() * 0.05)
        assert fast.ssh_delay() == pytest.approx(full.ssh_delay() * 0.05)
    instant = Timing("instant", seed=3)
    assert (instant.create_server(), instant.start_server(), instant.ssh_delay(), instant.api_latency()) == (0, 0, 0, 0)
    with pytest.raises(ValueError):
        Timing("sluggish")


def test_action_progress():
    action = Action(id=1, command="create_server", resources=[], started=time.time(), duration=10.0)
    assert action.progress == 0  # not begun
    action._t0 = time.monotonic() - 5.0
    assert 49 <= action.progress <= 51
    action._t0 = time.monotonic() - 50.0
    assert action.progress == 99  # 100 only once it succeeded
    action.finish()
    assert (action.status, action.progress) == ("success", 100)


async def test_realistic_timings_recorded():
    async with Simulator(hosts=False, profile="realistic", time_scale=0.002, seed=5, validate_responses=True) as sim:
        async with Raw(sim) as raw:
            ids = [(await raw.post("/servers", server_body(f"t{i}"))).body["server"]["id"] for i in range(3)]
            await sim.settle()
            for sid in ids:
                t = sim.timings(sid)
                drawn, phases = t["drawn"], t["phases"]
                assert 5 * 0.002 <= drawn["create"] <= 90 * 0.002
                assert 2 * 0.002 <= drawn["start"] <= 5 * 0.002
                assert drawn["ssh_delay"] <= 120 * 0.002
                assert t["floor"] == pytest.approx(drawn["create"] + drawn["start"] + drawn["ssh_delay"])
                assert phases["requested"] < phases["created"] < phases["running"] <= phases["booted"]
                assert phases["created"] - phases["requested"] >= drawn["create"] * 0.9
                assert (await raw.get(f"/servers/{sid}")).body["server"]["status"] == "running"
            await delete_all(raw, sim)
            assert "deleted" in sim.timings(ids[0])["phases"]  # kept after the server is gone
