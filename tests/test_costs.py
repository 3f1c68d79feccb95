"""Costs: prices read from the API, shown in the reprs, and a ceiling scale/adapt/start respect."""

from __future__ import annotations

import asyncio
import re

import dask
import pytest
from distributed import Client
from support import sdk, servers_of, wait_until

from dask_hetzner import HetznerCluster
from dask_hetzner.cloud import ConfigError, ServerTypeInfo
from dask_hetzner.cost import CostLimitError
from dask_hetzner.cost import price as _price


@pytest.fixture(autouse=True)
def one_type(sim):
    """One type per role: the default lists are priced at their dearest type (tested apart)."""
    with dask.config.set({"hetzner.scheduler-server-type": "cx23", "hetzner.worker-server-type": "cx23"}):
        yield


def hourly(sim, server_type: str, location: str = "fsn1") -> float:
    """Gross EUR/h of a server and its Primary IPv4, as the API says (never hard-coded:
    Hetzner changes prices)."""
    client = sdk(sim)
    t = client.server_types.get_by_name(server_type)
    (price,) = [p for p in t.prices if p["location"] == location]
    primary_ips = client.request("GET", "/pricing")["pricing"]["primary_ips"]
    (ipv4,) = [p for e in primary_ips if e["type"] == "ipv4" for p in e["prices"] if p["location"] == location]
    return float(price["price_hourly"]["gross"]) + float(ipv4["price_hourly"]["gross"])






def test_price_is_the_dearest_candidate_location():
    info = ServerTypeInfo("x", 2, 4, 40, "x86", "shared", False, hourly={"fsn1": 0.01, "nbg1": 0.02})
    assert _price({"x": info}, "x", ["fsn1"]) == 0.01
    assert _price({"x": info}, "x", ["fsn1", "nbg1"]) == 0.02
    assert _price({"x": info}, "x", ["hel1"]) == 0.0
    assert _price({}, "y", ["fsn1"]) == 0.0


@pytest.mark.parametrize("bad", [0, -1, "lots"])
def test_bad_max_hourly_cost_refused(sim, bad):
    with pytest.raises(ConfigError, match="max_hourly_cost"):
        HetznerCluster(workers=0, name="costbad", max_hourly_cost=bad)
    assert sim.leaks() == {}


def test_initial_size_over_the_limit_creates_nothing(sim):
    scheduler, worker = hourly(sim, "cx33"), hourly(sim, "cx23")
    limit = scheduler + 2.5 * worker
    with pytest.raises(CostLimitError) as info:
        HetznerCluster(workers=3, name="cost1", scheduler_server_type="cx33", max_hourly_cost=limit)
    message = str(info.value)
    assert f"{scheduler + 3 * worker:.4f} EUR/h" in message  # what it would cost
    assert f"max_hourly_cost {limit:.4f} EUR/h" in message  # and the limit
    assert "at most 2 workers" in message
    assert isinstance(info.value, ValueError)
    assert sim.leaks() == {}
    assert not any(k.startswith("POST") for k in sim.stats.requests)


def test_limit_from_config(sim):
    with dask.config.set({"hetzner.max-hourly-cost": hourly(sim, "cx23") * 1.5}):
        with pytest.raises(CostLimitError, match="not even the scheduler fits|at most 0 workers"):
            HetznerCluster(workers=1, name="cost2")
    assert sim.leaks() == {}


@pytest.mark.slow
def test_scale_and_adapt_stay_under_the_limit_and_reprs_show_cost(sim):
    price = hourly(sim, "cx23")
    limit = price * 3 + price / 2  # the scheduler and two workers fit, a third does not
    with HetznerCluster(workers=0, name="cost3", max_hourly_cost=limit) as cluster:
        assert cluster.max_workers == 2
        assert cluster.hourly_cost == pytest.approx(price)
        assert cluster.planned_hourly_cost(2) == pytest.approx(3 * price)
        assert f"{price:.4f} EUR/h (max {limit:.4f})" in repr(cluster)

        with pytest.raises(CostLimitError) as info:
            cluster.scale(3)
        assert f"{4 * price:.4f} EUR/h" in str(info.value)
        assert f"{limit:.4f} EUR/h" in str(info.value)
        assert len(cluster.worker_spec) == 0, "a refused scale must not change the plan"
        with pytest.raises(CostLimitError):
            cluster.scale(cores=100)

        adaptive = cluster.adapt(minimum=0, maximum=10)
        assert adaptive.maximum == 2, "adaptivity is capped below the limit"
        adaptive.stop()
        with pytest.raises(CostLimitError):
            cluster.adapt(minimum=3, maximum=3)

        with Client(cluster) as client:
            cluster.scale(1)
            client.wait_for_workers(1, timeout=120)
            wait_until(
                lambda: cluster.hourly_cost == pytest.approx(2 * price),
                timeout=30,
                what="the worker's server in the cost",
            )
            page = cluster._repr_html_()
            servers = {s.name: s for s in servers_of(sim, "cost3")}
            assert set(servers) == {"cost3-scheduler", "cost3-worker-0"}
            for name, server in servers.items():
                assert name in page
                assert server.public_net.ipv4.ip in page
            rows = re.findall(r"<tr><td[^>]*>(cost3-[a-z0-9-]+)</td><td[^>]*>(\w+)</td>", page)
            assert sorted(rows) == [("cost3-scheduler", "scheduler"), ("cost3-worker-0", "worker")]
            assert page.count(">running<") == 2
            assert ">cx23<" in page and ">fsn1<" in page
            assert "cx23: 2 vCPU, 4 GB" in page  # the type, from the API's catalog
            assert f"{2 * price:.4f} EUR/h (max {limit:.4f} EUR/h)" in page
            assert cluster.dashboard_link in page
            assert f"{2 * price:.4f} EUR/h" in repr(cluster)
    assert servers_of(sim, "cost3") == []


async def test_html_repr_works_before_start_and_escapes(sim):
    cluster = HetznerCluster(workers=0, name="cost4", asynchronous=True)
    try:
        page = cluster._repr_html_()
        assert "0.0000 EUR/h" in page and "dask-hetzner-servers" in page
        assert "Idle timeout:</strong> off" in page
        # Whatever a server is called, it lands in the page as text, not markup.
        cluster.context.settings = cluster.settings.replace(worker_server_type=("<script>x</script>",))
        assert "<script>" not in cluster._repr_html_()
    finally:
        await cluster.close()
    assert sim.leaks() == {}


@pytest.mark.slow
async def test_adapt_before_start_is_capped_once_prices_are_known(sim):
    price = await asyncio.to_thread(hourly, sim, "cx23")
    cluster = HetznerCluster(workers=0, name="cost5", asynchronous=True, max_hourly_cost=price * 3.5)
    try:
        adaptive = cluster.adapt(minimum=0, maximum=10, interval="10s")
        assert cluster.max_workers is None  # no prices read yet
        await cluster
        assert cluster.max_workers == 2
        assert adaptive.maximum == 2
    finally:
        await cluster.close()
    assert sim.leaks() == {}
