"""Rate limit: headers on every answer, 429 past the limit, gradual refill (fake clock)."""

from __future__ import annotations

import time

import pytest
from hcloud import APIException
from sim_helpers import Raw, sdk

from dask_hetzner.sim import Simulator
from dask_hetzner.sim.ratelimit import RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_headers_429_and_refill():
    clock = FakeClock()
    async with (
        Simulator(hosts=False, validate_responses=True, rate_limit=5, clock=clock) as sim,
        Raw(sim) as raw,
    ):
        seen = []
        for _ in range(5):
            r = await raw.get("/locations")
            assert r.status == 200
            assert r.headers["RateLimit-Limit"] == "5"
            seen.append(int(r.headers["RateLimit-Remaining"]))
            # Full again after (missing tokens) x 720 s at 5 an hour.
            reset = int(r.headers["RateLimit-Reset"])
            assert abs(reset - (time.time() + (5 - seen[-1]) * 720)) < 5
        assert seen == [4, 3, 2, 1, 0]
        r = await raw.get("/locations")
        assert (r.status, r.code) == (429, "rate_limit_exceeded")
        assert r.headers["RateLimit-Remaining"] == "0"
        r = await raw.get("/servers", auth=False)  # unauthenticated requests count too
        assert r.status == 401 and r.headers["RateLimit-Remaining"] == "0"
        clock.now += 719
        assert (await raw.get("/locations")).status == 429
        clock.now += 1
        r = await raw.get("/locations")
        assert r.status == 200 and r.headers["RateLimit-Remaining"] == "0"
        clock.now += 10 * 3600  # never more than the limit
        r = await raw.get("/locations")
        assert r.headers["RateLimit-Remaining"] == "4"
        assert sim.stats.rate_limited == 2


def test_sdk_retries_429_then_gives_up():
    clock = FakeClock()
    with Simulator(hosts=False, rate_limit=2, clock=clock) as sim:
        c = sdk(sim)
        c.locations.get_all()
        c.locations.get_all()
        with pytest.raises(APIException) as exc:
            c.locations.get_all()
        assert exc.value.code == "rate_limit_exceeded"
        assert sim.stats.rate_limited == 6  # the first try and five retries
        assert sim.stats.requests["GET /locations"] == 8


async def test_default_limit_headers(asim):
    async with Raw(asim) as raw:
        r = await raw.get("/server_types")
        assert r.headers["RateLimit-Limit"] == "3600"
        assert r.headers["RateLimit-Remaining"] == "3599"


def test_refill_one_a_second_by_default():
    clock = FakeClock()
    rl = RateLimiter(3600, clock=clock, wall_clock=lambda: 0.0)
    for _ in range(3600):
        assert rl.consume().allowed
    state = rl.consume()
    assert not state.allowed and state.reset == 3600
    clock.now += 1.0
    assert rl.consume().allowed
    assert not rl.consume().allowed
