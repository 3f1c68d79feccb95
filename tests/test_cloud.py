"""The cloud layer's price and catalog API, against the simulator."""

from __future__ import annotations

from typing import Any

from dask_hetzner.cloud import Cloud, ServerTypeInfo


def test_price_is_the_dearest_location_offered() -> None:
    info = ServerTypeInfo("x", 2, 4, 40, "x86", "shared", False, hourly={"fsn1": 0.01, "nbg1": 0.02})
    assert info.price(["fsn1"]) == 0.01
    assert info.price(["fsn1", "nbg1"]) == 0.02
    assert info.price(["hel1"]) == 0.0
    assert info.price([]) == 0.0


async def test_cached_server_types_costs_no_request(sim: Any) -> None:
    cloud = Cloud(sim.token, sim.endpoint)
    try:
        assert cloud.cached_server_types() is None
        types = await cloud.server_types()
        sent = cloud.requests
        assert cloud.cached_server_types() is types
        assert await cloud.server_types() is types and cloud.requests == sent
        cx23 = types["cx23"]
        assert cx23.price(["fsn1"]) == cx23.billed("fsn1") == cx23.hourly["fsn1"] + cx23.ipv4["fsn1"] > 0
    finally:
        cloud.close()


async def test_many_requests_at_once_keep_their_connections(sim: Any, caplog: Any) -> None:
    """Deleting 50 servers sends 50 requests from 50 threads at once: each thread keeps its
    connection (requests' default pool of 10 dropped the rest, with a warning each)."""
    import asyncio

    cloud = Cloud(sim.token, sim.endpoint, threads=40)
    try:
        with caplog.at_level("WARNING", logger="urllib3"):
            for _ in range(2):  # the second round reuses what the first kept
                await asyncio.gather(*(cloud.servers("dask-hetzner/cluster=nothing") for _ in range(40)))
        assert "Connection pool is full" not in caplog.text
    finally:
        cloud.close()
