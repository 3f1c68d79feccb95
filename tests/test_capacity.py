"""Capacity and the bill: server-type preference lists that survive sold-out types.

Sold-out types are injected per server type (``resource_unavailable`` with ``server_type=``,
docs/simulator.md); a type the catalog shows unavailable must be skipped without a request.
"""

from __future__ import annotations

import dataclasses
import time

import dask
import dask.utils
import pytest
from distributed import Client
from distributed.core import Status
from support import sdk, servers_of, wait_until

from dask_hetzner import HetznerCluster, list_clusters, memory
from dask_hetzner.bill import Bill
from dask_hetzner.cloud import LABEL_ROLE, ConfigError, ServerTypeInfo
from dask_hetzner.cloud.preferences import candidates
from dask_hetzner.settings import workers_to_wait_for

FAST = {
    "hetzner.api.backoff-base": "20ms",
    "hetzner.api.backoff-max": "500ms",
    "hetzner.timeouts.server-create": "20s",
    "hetzner.timeouts.ssh": "20s",
}


def _type(name: str, **kw: object) -> ServerTypeInfo:
    return ServerTypeInfo(name, 2, 4, 40, "x86", "shared", False, **kw)  # type: ignore[arg-type]


def test_candidates_location_first_catalog_skips_and_sold_out_last():
    types = {
        "a": _type("a", hourly={"fsn1": 0.01, "nbg1": 0.01}, available={"fsn1", "nbg1"}),
        "b": _type("b", hourly={"fsn1": 0.02, "nbg1": 0.02}, available={"nbg1"}),  # sold out in fsn1
        "c": _type("c", hourly={"fsn1": 0.03}, available={"fsn1"}),  # not offered in nbg1
    }
    pairs, skipped = candidates(types, ["a", "b", "c"], ["fsn1", "nbg1"])
    assert pairs == [("a", "fsn1"), ("c", "fsn1"), ("a", "nbg1"), ("b", "nbg1")]
    assert [str(x) for x in skipped] == [
        "b in fsn1: unavailable (catalog)",
        "c in nbg1: not offered there",
    ]
    # A pair that answered 412 lately is tried last, the others keep their order.
    pairs, _ = candidates(types, ["a", "b", "c"], ["fsn1", "nbg1"], {("a", "fsn1")})
    assert pairs == [("c", "fsn1"), ("a", "nbg1"), ("b", "nbg1"), ("a", "fsn1")]


def gross_hourly(sim, server_type: str, location: str = "fsn1") -> tuple[float, float]:
    """(server, its Primary IPv4) in gross EUR/h, as the API says (``GET /pricing``)."""
    client = sdk(sim)
    t = client.server_types.get_by_name(server_type)
    (price,) = [p for p in t.prices if p["location"] == location]
    pricing = client.request("GET", "/pricing")["pricing"]
    (ipv4,) = [
        p for e in pricing["primary_ips"] if e["type"] == "ipv4" for p in e["prices"] if p["location"] == location
    ]
    return float(price["price_hourly"]["gross"]), float(ipv4["price_hourly"]["gross"])


def test_bill_counts_every_started_hour():
    bill = Bill(hour=3600.0)
    bill.opened(1, "a", 0.01)
    bill.opened(1, "a", 0.05)  # an adopted retry of the same create: one line
    bill.opened(2, "b", 0.02)
    bill.lines[2].created -= 7200.5  # created two hours and a bit ago: three started hours
    bill.closed(1)
    assert bill.server_hours == 1 + 3
    assert bill.total == pytest.approx(0.01 + 3 * 0.02)
    assert bill.paid_until(2) == pytest.approx(bill.lines[2].created + 3 * 3600.0)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sold_out_type_falls_through_the_list_and_the_bill_is_hetzners(sim, caplog):
    """cx22 (deprecated: unavailable in the catalog) is never asked for; cx33 is sold out
    (412 per server type); the workers get cpx22 and their threads follow it. The bill
    counts every server created (a retired one too) with its Primary IPv4, as the simulator
    bills it."""
    never = sim.inject("resource_unavailable", server_type="cx22", probability=0.0)
    sold_out = sim.inject("resource_unavailable", server_type="cx33")
    with dask.config.set(FAST):
        cluster = HetznerCluster(
            workers=2, name="cap1", scheduler_server_type="cx23",
            worker_server_type=["cx22", "cx33", "cpx22"],
        )  # fmt: skip
        with cluster, Client(cluster) as client:
            client.wait_for_workers(2, timeout=120)
            assert never.seen == 0, "a type the catalog shows unavailable was requested"
            assert sold_out.hits >= 1
            got = {s.name: s.server_type.name for s in servers_of(sim, "cap1")}
            assert got == {"cap1-scheduler": "cx23", "cap1-worker-0": "cpx22", "cap1-worker-1": "cpx22"}
            # cx33 (first orderable) has 4 vCPUs and 8 GB; cpx22, which they got, 2 and 4 GB.
            workers = client.scheduler_info()["workers"].values()
            assert {w["nthreads"] for w in workers} == {2}
            # Memory: what a 4 GB server's /proc/meminfo shows, less the overhead (memory.py).
            total_kb = int(4 * 1024**2 * 0.96)  # the simulator's 4 GB server (sim/sandbox.py)
            expected = dask.utils.parse_bytes(memory.limit_for(total_kb * 1024))
            assert {w["memory_limit"] for w in workers} == {expected}
            assert "workers=2 (2 cpx22)" in repr(cluster)
            page = cluster._repr_html_()
            assert "workers cx22 &gt; cx33 &gt; cpx22" in page and ">cpx22<" in page
            (info,) = [c for c in list_clusters() if c.name == "cap1"]
            assert info.types == "scheduler: 1 cx23; workers: 2 cpx22"

            (scheduler, ipv4), (worker, _) = gross_hourly(sim, "cx23"), gross_hourly(sim, "cpx22")
            assert ipv4 > 0
            assert cluster.hourly_cost == pytest.approx(scheduler + 2 * worker + 3 * ipv4)
            assert info.hourly_cost == pytest.approx(cluster.hourly_cost)
            assert info.billed == pytest.approx(cluster.hourly_cost)  # one started hour each
            cluster.scale(1)
            wait_until(lambda: len(servers_of(sim, "cap1")) == 2, timeout=60, what="a retired worker's server deleted")
            billed = scheduler + 2 * worker + 3 * ipv4  # the deleted server's hour is paid
            assert cluster.hourly_cost == pytest.approx(scheduler + worker + 2 * ipv4)
            assert (cluster.cost, cluster.server_hours) == (pytest.approx(billed), 3)
            hetzner = sim.bill("cap1")
            assert (hetzner["eur"], hetzner["server_hours"]) == (pytest.approx(billed, abs=1e-9), 3)
            assert f"cost {billed:.4f} EUR" in repr(cluster)
            assert f"billed so far {billed:.4f} EUR for 3 server-hours" in cluster._repr_html_()
            with caplog.at_level("INFO", logger="dask_hetzner"):
                cluster.close()
    assert servers_of(sim, "cap1") == []
    assert f"this cluster cost {billed:.4f} EUR for 3 server-hours" in caplog.text
    assert sim.bill("cap1")["server_hours"] == 3


@pytest.mark.timeout(120)
def test_nothing_fits_names_every_type_and_location(sim):
    sim.inject("resource_unavailable")  # every type, everywhere
    types = ["cx22", "cx33", "cpx22"]
    t0 = time.monotonic()
    with dask.config.set(FAST), pytest.raises(Exception, match="no server type could be had") as info:
        HetznerCluster(
            workers=1, name="cap2", scheduler_server_type=types, worker_server_type=types,
            fallback_locations=["nbg1"],
        )  # fmt: skip
    message = str(info.value)
    for pair in ("cx33 is unavailable in fsn1", "cpx22 is unavailable in fsn1",
                 "cx33 is unavailable in nbg1", "cpx22 is unavailable in nbg1"):  # fmt: skip
        assert f"server type {pair}" in message, message
    assert "skipped cx22 in fsn1: deprecated" in message and "skipped cx22 in nbg1: deprecated" in message
    assert time.monotonic() - t0 < 60
    wait_until(lambda: sim.leaks() == {}, timeout=30, what="the rollback")


def _by_role(sim, cluster: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for s in servers_of(sim, cluster):
        out.setdefault(s.labels[LABEL_ROLE], []).append(s)
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scale_up_reuses_kept_servers_until_their_paid_hour_ends(sim):
    """A retired worker's server is kept (dask stopped) and taken by the next scale-up: same
    server id, no create. Kept past its time it goes; close deletes a kept server too.
    A billed hour is 300 s here (the simulator's and the client's alike)."""
    keep = {**FAST, "hetzner.keep-paid-servers": True, "hetzner.billing-hour": "300s", "hetzner.keep-margin": "10s"}
    with dask.config.set(keep):
        cluster = HetznerCluster(workers=1, name="keep1", scheduler_server_type="cx23", worker_server_type="cx23")
        with cluster, Client(cluster) as client:
            client.wait_for_workers(1, timeout=120)
            (first,) = _by_role(sim, "keep1")["worker"]
            posts = sim.stats.requests["POST /servers"]

            cluster.scale(0)
            wait_until(lambda: "kept" in _by_role(sim, "keep1"), timeout=60, what="the retired worker's server kept")
            assert not client.scheduler_info()["workers"]
            # Renamed: dask may name a new worker like the retired one; server names are unique.
            assert [(s.id, s.name) for s in _by_role(sim, "keep1")["kept"]] == [(first.id, f"keep1-kept-{first.id}")]
            assert "1 kept (paid, idle until " in repr(cluster)
            assert "paid, idle until " in cluster._repr_html_()
            (info,) = [c for c in list_clusters() if c.name == "keep1"]
            assert "kept: 1 (paid, idle until " in info.types and info.workers == 0
            (price, ipv4) = gross_hourly(sim, "cx23")
            assert cluster.hourly_cost == pytest.approx(2 * (price + ipv4)), "a kept server is billed"

            # max_hourly_cost counts the kept servers a scale leaves kept, once: here (a lower
            # limit set on the running cluster) the scheduler and one worker fit, and a scale
            # to one worker passes, the new worker taking the kept server.
            settings = cluster.context.settings
            cluster.context.settings = dataclasses.replace(settings, max_hourly_cost=2.5 * (price + ipv4))
            assert cluster._kept_hourly(0) == pytest.approx(price + ipv4)  # a scale to 0 leaves it
            assert cluster._kept_hourly(1) == 0.0  # taken by the new worker
            cluster.scale(1)  # worker-1 takes the kept server: no create, no boot, no bootstrap
            cluster.context.settings = settings
            client.wait_for_workers(1, timeout=60)
            (worker,) = client.scheduler_info()["workers"].values()
            (taken,) = _by_role(sim, "keep1")["worker"]
            assert (taken.id, taken.name, worker["name"]) == (first.id, "keep1-worker-1", "worker-1")
            assert worker["host"] == taken.private_net[0].ip
            assert sim.stats.requests["POST /servers"] == posts

            # Its paid hour ends 8 s after it is retired (the margin set so): kept, then deleted.
            kept = cluster.context.kept
            kept.margin = cluster.context.factory.bill.paid_until(first.id) - time.time() - 8
            cluster.scale(0)
            wait_until(
                lambda: first.id not in {s.id for s in servers_of(sim, "keep1")},
                timeout=60, what="a kept server deleted before its next started hour",
            )  # fmt: skip
            kept.margin = 10
            cluster.scale(1)  # nothing kept: created anew
            client.wait_for_workers(1, timeout=120)
            assert sim.stats.requests["POST /servers"] == posts + 1
            # A worker name is never given twice (SpecCluster would give worker-1 again).
            assert [w["name"] for w in client.scheduler_info()["workers"].values()] == ["worker-2"]
            cluster.scale(0)
            wait_until(lambda: "kept" in _by_role(sim, "keep1"), timeout=60, what="the last worker's server kept")
            assert cluster.server_hours == sim.bill("keep1")["server_hours"] == 3
            (last,) = _by_role(sim, "keep1")["kept"]
            client.close()
            cluster.detach()

        # Another process reattaches (here this one, after detach): it takes the kept server
        # over, for its next worker and for its deletion; the detached object's timer stopped.
        posts = sim.stats.requests["POST /servers"]
        again = HetznerCluster.from_name("keep1")
        try:
            assert [k.server.id for k in again.context.kept.kept.values()] == [last.id]
            assert "1 kept (paid, idle until " in repr(again)
            again.scale(1)
            again.get_client().wait_for_workers(1, timeout=60)
            (taken,) = _by_role(sim, "keep1")["worker"]
            assert taken.id == last.id and taken.name.startswith("keep1-worker-"), taken.name
            assert sim.stats.requests["POST /servers"] == posts
        finally:
            again.close()
    # close() deleted the kept servers too (the fixture checks nothing is left).
    assert servers_of(sim, "keep1") == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wait_for_workers_returns_with_any_first_and_replaces_a_late_failure(sim, caplog):
    """wait_for_workers=1 of 3: worker-0's SSH is held back (slow_boot, ended by the test once
    the start returned), so the constructor returns with worker-1, the first that is up, not
    with worker-0; worker-0 joins later. cloud-init fails on worker-2's servers (a host fault;
    a second server fails too): it fails in the background and is replaced once, by worker-3,
    named in a warning; its servers are deleted."""
    sim.inject("slow_boot", name="wfw-worker-0", delay=3600)  # held until released below
    broken = sim.inject("cloud_init_fails", name="wfw-worker-2")
    with caplog.at_level("WARNING", logger="dask_hetzner"):
        cluster = HetznerCluster(workers=3, name="wfw", wait_for_workers=1, worker_server_type="cx23")
        with cluster, Client(cluster) as client:
            # The plan the start waited for held the first ready worker alone.
            assert list(cluster.workers) == ["worker-1"], list(cluster.workers)
            wait_until(lambda: _ended_ssh_delay(sim, "wfw-worker-0"), timeout=30, what="worker-0's SSH released")
            client.wait_for_workers(3, timeout=180)
            assert {w["name"] for w in client.scheduler_info()["workers"].values()} == {"worker-0", "worker-1", "worker-3"}
            assert broken.hits == 2  # its first server, and the one created in its place
            assert "worker-2 failed to start (creating server wfw-worker-2" in caplog.text
            assert "cloud-init did not apply the user data" in caplog.text
            assert "replacing it with worker-3" in caplog.text
            assert {s.name for s in servers_of(sim, "wfw")} == {"wfw-scheduler", "wfw-worker-0", "wfw-worker-1", "wfw-worker-3"}
            assert set(cluster.worker_spec) == {"worker-0", "worker-1", "worker-3"}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_close_during_a_scale_up_does_not_wait_for_its_servers(sim, caplog):
    """A scale-up's server boots for an hour (slow_boot, within the ssh bound): close()
    cancels its provisioning and deletes it, instead of waiting for SpecCluster's scale-up
    batch, and says nothing failed."""
    with dask.config.set({"hetzner.timeouts.ssh": "7200s"}):
        cluster = HetznerCluster(workers=1, name="cds", worker_server_type="cx23")
        try:
            sim.inject("slow_boot", name="cds-worker-1", delay=3600)
            with caplog.at_level("WARNING", logger="dask_hetzner"):
                cluster.scale(2)
                wait_until(
                    lambda: "cds-worker-1" in {s.name for s in servers_of(sim, "cds")},
                    timeout=60, what="worker-1's server created",
                )  # fmt: skip
                cluster.close(timeout=90)  # a bound: waiting for the boot would take an hour
        finally:
            if cluster.status != Status.closed:  # it waited: let the boot end, then close
                _ended_ssh_delay(sim, "cds-worker-1")
                cluster.close()
    assert servers_of(sim, "cds") == []
    assert "failed to start" not in caplog.text, caplog.text


def _ended_ssh_delay(sim, name: str) -> bool:
    try:
        sim.end_ssh_delay(name)
    except LookupError:
        return False  # not booted yet
    return True



def test_a_failed_worker_is_replaced_once_and_never_past_the_limits():
    from dask_hetzner.cloud import CloudError
    from dask_hetzner.late import Replacements

    names = iter(f"worker-{i}" for i in range(5, 99))
    r = Replacements()
    boom = RuntimeError("SSH never answered")
    limit = CloudError("server limit", code="resource_limit_exceeded")
    d = r.decide({"worker-2": boom, "worker-3": limit}, lambda: next(names), lambda k: None)
    assert d.replace == {"worker-2": "worker-5"}
    assert d.given_up == {"worker-3": "the account's server limit is reached"}
    # The successor failing too is not replaced again.
    d = r.decide({"worker-5": boom}, lambda: next(names), lambda k: None)
    assert d.replace == {} and d.given_up == {"worker-5": "it replaced worker-2, which failed too"}

    def too_dear(k: int) -> None:
        raise ConfigError(f"replacing failed workers with {k} more would cost too much")

    d = r.decide({"worker-1": boom}, lambda: next(names), too_dear)
    assert d.replace == {} and "would cost too much" in d.given_up["worker-1"]


@pytest.mark.parametrize(
    "value, match",
    [(-1, "between 0 and the 2 workers"), (3, "between 0 and the 2 workers"), (1.5, r"fraction must be in \(0, 1\]"),
     (True, "worker count or a fraction"), ("half", "worker count or a fraction")],
)  # fmt: skip
def test_bad_wait_for_workers_refused(sim, value, match):
    with pytest.raises(ConfigError, match=match):
        HetznerCluster(workers=2, name="wfwbad", wait_for_workers=value)
    assert sim.leaks() == {}


def test_wait_for_workers_as_a_fraction():
    assert [workers_to_wait_for(x, 50) for x in (None, 0, 1, 0.5, 0.01, 1.0)] == [50, 0, 1, 25, 1, 50]
