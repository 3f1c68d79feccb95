"""The fault suite: every fault of the README's "Faults that really happen" (1 to 10) and the
host faults, injected into the simulator while a real cluster starts.

Each scenario checks the outcome users should get (transient faults retried and the cluster
up; permanent ones an error that says what failed and where, within the configured timeout),
that nothing is left behind afterwards (``sim.leaks() == {}``, after the scenario's own
cleanup: close, rollback, or ``Cloud.delete_cluster`` after a SIGKILL), and that it ends in
bounded time (pytest-timeout on every test, bounded waits inside). The scenarios and their
outcomes are printed as a table at the end of the run (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import dask
import pytest
import support
import yaml
from distributed import Client

from dask_hetzner import HetznerCluster
from dask_hetzner.cloud import LABEL_CLUSTER, Cloud
from dask_hetzner.nodes import SchedulerUnreachable
from dask_hetzner.provision import node as nodes
from dask_hetzner.security import HostKey, cloud_config

pytestmark = pytest.mark.slow

def _leaked(sim: Any) -> str:
    leaks = sim.leaks()
    return ", ".join(f"{len(v)} {k}" for k, v in leaks.items()) or "none"


@pytest.fixture
def scenario(fault_table: list, fsim: Any) -> Callable[[str], Any]:
    """``with scenario("name") as row:`` times the block, then records outcome and leaks."""

    @contextmanager
    def run(name: str) -> Iterator[dict[str, Any]]:
        row: dict[str, Any] = {"scenario": name, "outcome": "?", "seconds": 0.0, "leaked": "?"}
        t0 = time.monotonic()
        try:
            yield row
        except BaseException as e:
            row["outcome"] = f"TEST FAILED: {type(e).__name__}: {_first_line(e)}"
            raise
        finally:
            row["seconds"] = time.monotonic() - t0
            row["leaked"] = _leaked(fsim)
            fault_table.append(row)
        assert fsim.leaks() == {}, f"left behind: {row['leaked']}"

    return run


def _first_line(e: BaseException, limit: int = 150) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


wait_until = functools.partial(support.wait_until, interval=0.1)


def server_names(sim: Any) -> set[str]:
    return {s["name"] for s in sim.resources()["servers"]}


def check_up(cluster: HetznerCluster, workers: int) -> None:
    """Every worker connected to the scheduler (as the cluster's own scheduler comm sees it)."""
    wait_until(
        lambda: len(cluster.scheduler_info.get("workers", {})) == workers,
        timeout=60,
        what=f"{workers} workers connected",
    )


def up(cluster: HetznerCluster, sim: Any, note: str = "") -> str:
    retries = cluster.context.cloud.retries
    text = f"up, {len(cluster.workers)} workers; {retries} API retries"
    return text + (f"; {note}" if note else "")


def failed(e: BaseException, t0: float) -> str:
    return f"failed after {time.monotonic() - t0:.1f} s: {_first_line(e)}"


# The faults of docs/simulator.md -------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_resource_unavailable_falls_back_within_the_zone(fsim, scenario):
    with scenario("1 412 resource_unavailable, fallback_locations=[nbg1]") as row:
        rule = fsim.inject("resource_unavailable", location="fsn1")
        with HetznerCluster(workers=1, name="f1a", fallback_locations=["nbg1"]) as cluster:
            check_up(cluster, 1)
            assert {s.location for s in cluster.context.servers.values()} == {"nbg1"}
            row["outcome"] = up(cluster, fsim, f"all in nbg1 after {rule.hits} x 412 in fsn1")


@pytest.mark.timeout(60)
def test_resource_unavailable_without_fallback_fails_fast(fsim, scenario):
    with scenario("1 412 resource_unavailable, no fallback") as row:
        fsim.inject("resource_unavailable", location="fsn1")
        t0 = time.monotonic()
        with pytest.raises(Exception, match="server type cx23 is unavailable in fsn1") as info:
            HetznerCluster(workers=1, name="f1b")
        assert "fallback_locations" in str(info.value)
        assert time.monotonic() - t0 < 15, "a sold-out type must fail fast"
        row["outcome"] = failed(info.value, t0)


@pytest.mark.timeout(90)
def test_server_limit_part_way_through_a_batch(fsim, scenario):
    with scenario("2 403 resource_limit_exceeded after 2 servers") as row:
        fsim.inject("resource_limit_exceeded", after=2)
        t0 = time.monotonic()
        # The start stops at once, naming what was asked (docs/simulator.md, "Deliberate behaviours").
        with pytest.raises(Exception, match=r"starting cluster f2 needs 4 servers .*resource_limit_exceeded") as info:
            HetznerCluster(workers=3, name="f2")
        row["outcome"] = failed(info.value, t0) + "; rolled back"


@pytest.mark.timeout(90)
def test_rate_limited_requests_are_retried(fsim, scenario):
    with scenario("3 429 rate_limit_exceeded x 8 (injected)") as row:
        rule = fsim.inject("rate_limit", count=8)
        with HetznerCluster(workers=1, name="f3a") as cluster:
            check_up(cluster, 1)
            assert rule.hits == 8
            row["outcome"] = up(cluster, fsim, "8 x 429 retried")


@pytest.mark.parametrize("sim", [{"rate_limit": 10, "rate_refill": 4.0}], indirect=True)
@pytest.mark.timeout(120)
def test_small_rate_limit_is_paced_by_its_headers(fsim, scenario):
    """A bucket of 10 refilled at 4/s, polled every 100 ms: RateLimit-* paces the client."""
    with scenario("3 429 real bucket: limit 10, refill 4/s") as row:
        with HetznerCluster(workers=1, name="f3b") as cluster:
            check_up(cluster, 1)
        stats = fsim.stats
        # Pacing by RateLimit-Remaining/Reset keeps 429s rare (a few from parallel requests).
        assert stats.rate_limited <= 0.1 * stats.total, (stats.rate_limited, stats.total)
        row["outcome"] = (
            f"up, closed; {stats.total} requests, {stats.rate_limited} answered 429, all retried"
        )


@pytest.mark.timeout(90)
def test_locked_is_retried(fsim, scenario):
    with scenario("4 423 locked x 4 (deletes at close)") as row:
        rule = fsim.inject("locked", count=4)
        with HetznerCluster(workers=1, name="f4") as cluster:
            check_up(cluster, 1)
        assert rule.hits == 4
        row["outcome"] = "up, closed; 4 x 423 retried"


@pytest.mark.timeout(90)
def test_failed_create_action_is_replaced(fsim, scenario):
    with scenario("5 create action ends in error (once)") as row:
        rule = fsim.inject("action_error", nth=1)
        with HetznerCluster(workers=1, name="f5a") as cluster:
            check_up(cluster, 1)
            assert rule.hits == 1
            row["outcome"] = up(cluster, fsim, "the failed server deleted and created again")


@pytest.mark.timeout(90)
def test_create_action_that_always_fails_is_reported(fsim, scenario):
    with scenario("5 create action ends in error (always, worker-0)") as row:
        fsim.inject("action_error", name="f5b-worker-0", code="server_error", message="placement failed")
        t0 = time.monotonic()
        with pytest.raises(
            Exception, match=r"creating server f5b-worker-0 \(cx23 in fsn1\).*failed twice"
        ) as info:
            HetznerCluster(workers=1, name="f5b")
        row["outcome"] = failed(info.value, t0)


@pytest.mark.timeout(90)
def test_server_errors_are_retried(fsim, scenario):
    with scenario("6 500/502/503/504/unknown_error; a 500 after the server was created") as row:
        rules = [
            # The server is created, then the answer is a 500: the retry meets 409 and adopts it.
            fsim.inject("server_error", method="POST", path=r"^/servers$", nth=1, after_effect=True),
            fsim.inject("unavailable", method="GET", path=r"^/servers$", count=2),
            fsim.inject("unknown_error", method="POST", path=r"^/networks$", count=1),
            fsim.inject("bad_gateway", method="POST", path=r"^/firewalls$", count=1),
            fsim.inject("timeout", method="POST", path=r"^/ssh_keys$", count=1),
        ]
        with HetznerCluster(workers=1, name="f6") as cluster:
            check_up(cluster, 1)
            assert all(r.hits for r in rules)
            assert fsim.stats.requests["POST /servers"] == 3  # one retried into a 409
            row["outcome"] = up(cluster, fsim, "server behind the 500 adopted")


@pytest.mark.timeout(90)
def test_resource_in_use_at_delete_is_retried(fsim, scenario):
    with scenario("7 422 resource_in_use x 3 (firewall/network delete)") as row:
        rule = fsim.inject("resource_in_use", count=3)
        with HetznerCluster(workers=1, name="f7") as cluster:
            check_up(cluster, 1)
        assert rule.hits == 3
        row["outcome"] = "up, closed; 3 x 422 retried until the deadline"


@pytest.mark.timeout(90)
def test_timed_out_create_is_adopted_on_uniqueness_error(fsim, scenario):
    with scenario("8 409 uniqueness_error after a timed-out POST /servers") as row:
        fsim.inject("uniqueness_error", path=r"^/servers$", delay=4, nth=1)
        with dask.config.set({"hetzner.timeouts.api-request": "1s"}):
            with HetznerCluster(workers=1, name="f8a") as cluster:
                check_up(cluster, 1)
                assert fsim.stats.statuses[409] == 1
                row["outcome"] = up(cluster, fsim, "the server of the timed-out POST adopted")


@pytest.mark.timeout(60)
def test_leftover_with_the_same_name_is_reported(fsim, scenario):
    with scenario("8 409 uniqueness_error: a leftover network of that name") as row:
        sdk = support.sdk(fsim)
        # Someone's network named like the cluster, without its labels.
        leftover = sdk.networks.create(name="f8b", ip_range="10.9.0.0/16")
        t0 = time.monotonic()
        try:
            with pytest.raises(Exception, match=r"creating network f8b.*not this cluster's") as info:
                HetznerCluster(workers=1, name="f8b")
            assert [n.name for n in sdk.networks.get_all()] == ["f8b"], "the leftover is not ours"
            row["outcome"] = failed(info.value, t0)
        finally:
            sdk.networks.delete(leftover)


@pytest.mark.timeout(90)
def test_full_placement_group_takes_another(fsim, scenario):
    with scenario("9 422 placement_error (a full spread group)") as row:
        fsim.inject("placement_error", nth=1)
        with HetznerCluster(workers=1, name="f9a") as cluster:
            check_up(cluster, 1)
            groups = sdk_groups(fsim, "f9a")
            assert len(groups) == 2
            row["outcome"] = up(cluster, fsim, "second placement group used")


def sdk_groups(sim: Any, name: str) -> list:
    sdk = support.sdk(sim)
    return sdk.placement_groups.get_all(label_selector=f"{LABEL_CLUSTER}={name}")


@pytest.mark.timeout(90)
def test_conflict_is_retried(fsim, scenario):
    with scenario("9 409 conflict x 3 (network/firewall/group)") as row:
        rule = fsim.inject("conflict", count=3)
        with HetznerCluster(workers=1, name="f9b") as cluster:
            check_up(cluster, 1)
            assert rule.hits == 3
            row["outcome"] = up(cluster, fsim)


@pytest.mark.timeout(90)
def test_slow_create_action(fsim, scenario):
    with scenario("10 create actions take 3 s more") as row:
        fsim.inject("slow_action", method="POST", path=r"^/servers$", command="create_server", duration=3)
        t0 = time.monotonic()
        # Late in a whole suite run (never alone), this scenario's first server was twice not
        # reached within the fast 20 s SSH bound (CI, and a local run); the cause is not found
        # yet (see the stop's note). The slow *create* is what this scenario tests.
        with dask.config.set({"hetzner.timeouts.ssh": "60s"}), HetznerCluster(workers=1, name="f10a") as cluster:
            assert time.monotonic() - t0 >= 3
            check_up(cluster, 1)
            row["outcome"] = up(cluster, fsim)


@pytest.mark.timeout(60)
def test_create_action_that_never_finishes_times_out(fsim, scenario):
    with scenario("10 a create action that never finishes (server-create 4 s)") as row:
        fsim.inject("slow_action", name="f10b-worker-0", command="create_server", duration=None)
        t0 = time.monotonic()
        with dask.config.set({"hetzner.timeouts.server-create": "4s"}):
            with pytest.raises(
                Exception,
                match=r"creating server f10b-worker-0 \(cx23 in fsn1\): server \d+ not running after 4 s "
                r"\(last status: initializing\)",
            ) as info:
                HetznerCluster(workers=1, name="f10b")
        assert time.monotonic() - t0 < 30
        row["outcome"] = failed(info.value, t0)


@pytest.mark.timeout(90)
def test_slow_delete_actions(fsim, scenario):
    with scenario("10 delete actions take 3 s") as row:
        with HetznerCluster(workers=1, name="f10c") as cluster:
            check_up(cluster, 1)
            fsim.inject("slow_action", method="DELETE", command="delete_server", duration=3)
            t0 = time.monotonic()
        assert time.monotonic() - t0 >= 3
        row["outcome"] = f"up; closed in {time.monotonic() - t0:.1f} s, waiting for the deletes"


@pytest.mark.timeout(120)
def test_failed_delete_of_a_retired_worker_is_sent_again(fsim, scenario):
    with scenario("10 a retired worker's delete action fails (close 3 s)") as row:
        with dask.config.set({"hetzner.timeouts.close": "3s"}):
            with HetznerCluster(workers=2, name="f10d") as cluster:
                check_up(cluster, 2)
                rule = fsim.inject(
                    "action_error",
                    method="DELETE",
                    path=r"^/servers/\d+$",
                    command="delete_server",
                    count=1,
                )
                deletes = fsim.stats.requests["DELETE /servers/{id}"]
                cluster.scale(1)
                # scale() returns once the DELETE is accepted; the background check finds
                # the server still there after timeouts.close and deletes it again.
                wait_until(
                    lambda: len(server_names(fsim)) == 2,
                    timeout=60,
                    what="the retired worker's server gone",
                )
                assert rule.hits == 1
                assert fsim.stats.requests["DELETE /servers/{id}"] - deletes == 2
                check_up(cluster, 1)
                row["outcome"] = "the server outlived its failed delete; deleted again"


# Host faults -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_ssh_never_comes_up(fsim, scenario):
    with scenario("host: SSH never comes up on worker-0 (ssh 4 s)") as row:
        fsim.inject("ssh_never", name="h1-worker-0")
        t0 = time.monotonic()
        with dask.config.set({"hetzner.timeouts.ssh": "4s"}):
            with pytest.raises(Exception, match=r"server h1-worker-0 \(fsn1\): SSH on \S+ not reachable after 4 s") as info:
                HetznerCluster(workers=1, name="h1")
        assert time.monotonic() - t0 < 30
        row["outcome"] = failed(info.value, t0)


BROKEN_BOOTSTRAP = """mkdir -p ~/.dask-hetzner
echo "E: Failed to fetch https://files.example/dask.whl: 503 (simulated)" | tee -a ~/.dask-hetzner/bootstrap.log >&2
exit 100
"""


@pytest.mark.timeout(90)
def test_bootstrap_fails_on_one_worker(fsim, scenario, monkeypatch, caplog):
    with scenario("host: bootstrap fails on worker-1") as row:
        real = nodes.bootstrap

        async def one_broken(ctx: Any, conn: Any, role: str, server: Any, snap: Any) -> None:
            if server.name == "h2-worker-1":
                ctx = copy.copy(ctx)
                ctx.bootstrap_script = lambda role, snap: BROKEN_BOOTSTRAP
            await real(ctx, conn, role, server, snap)

        monkeypatch.setattr(nodes, "bootstrap", one_broken)
        t0 = time.monotonic()
        with pytest.raises(Exception, match=r"server h2-worker-1: bootstrap failed \(status 100\)") as info:
            HetznerCluster(workers=2, name="h2")
        assert "Failed to fetch" in str(info.value)
        # The first failure, retried, is logged with the end of its log: the cause.
        (retried,) = [r for r in caplog.records if "trying once more" in r.getMessage()]
        assert "Failed to fetch" in retried.getMessage()
        row["outcome"] = failed(info.value, t0) + "; rolled back"


@pytest.mark.timeout(90)
def test_bootstrap_fails_once_on_one_worker(fsim, scenario, monkeypatch):
    with scenario("host: bootstrap fails once on worker-0 (a mirror blip)") as row:
        real = nodes.bootstrap
        failures: list[str] = []

        async def broken_once(ctx: Any, conn: Any, role: str, server: Any, snap: Any) -> None:
            if server.name == "h2b-worker-0" and not failures:
                failures.append(server.name)
                ctx = copy.copy(ctx)
                ctx.bootstrap_script = lambda role, snap: BROKEN_BOOTSTRAP
            await real(ctx, conn, role, server, snap)

        monkeypatch.setattr(nodes, "bootstrap", broken_once)
        with HetznerCluster(workers=1, name="h2b") as cluster:
            check_up(cluster, 1)
            assert failures == ["h2b-worker-0"]
            row["outcome"] = up(cluster, fsim, "the idempotent bootstrap ran again")


@pytest.mark.timeout(120)
def test_worker_process_dies(fsim, scenario):
    with scenario("host: a worker's processes die") as row:
        with HetznerCluster(workers=1, name="h3") as cluster, Client(cluster) as client:
            client.wait_for_workers(1, timeout=60)
            old = {s["name"]: s["id"] for s in fsim.resources()["servers"]}["h3-worker-0"]
            fsim.inject("processes_die", name="h3-worker-0", count=1)

            def replaced() -> bool:
                now = {s["name"]: s["id"] for s in fsim.resources()["servers"]}
                names = {w["name"] for w in client.scheduler_info()["workers"].values()}
                return now.get("h3-worker-0") not in (None, old) and names == {"worker-0"}

            wait_until(replaced, timeout=90, what="a new server and worker for worker-0")
            assert client.submit(lambda: 2).result(timeout=30) == 2
            row["outcome"] = "worker lost, its server deleted, a new one started and joined"


@pytest.mark.timeout(120)
def test_successor_never_adopts_its_predecessor(fsim, scenario):
    """A server created under the name of one still being deleted (a lost worker's successor)
    must be a new server: the 409 adoption of a timed-out POST may not take the old one."""
    with scenario("host: a successor created while its predecessor is being deleted") as row:
        with HetznerCluster(workers=1, name="h3b") as cluster:
            check_up(cluster, 1)
            ctx = cluster.context
            old = ctx.servers["h3b-worker-0"]
            fsim.inject("slow_action", method="DELETE", command="delete_server", duration=3)

            async def replace() -> Any:
                await ctx.factory.delete(old, wait=False)
                key = HostKey.generate()
                reached = await ctx.factory.create_reachable(
                    name=old.name,
                    server_types=[old.server_type],
                    user_data=cloud_config(key),
                    labels=dict(old.labels),
                    host_key=key.public_openssh,
                )
                await reached.conn.close()
                return await reached.located()

            new = cluster.sync(replace)
            assert new.id != old.id
            assert [s["id"] for s in fsim.resources()["servers"] if s["name"] == old.name] == [new.id]
            row["outcome"] = "waited for the old server to go, then created a new one"


@pytest.mark.timeout(120)
def test_scheduler_server_vanishes(fsim, scenario):
    with scenario("host: the scheduler's server vanishes") as row:
        cluster = HetznerCluster(workers=1, name="h4")
        try:
            check_up(cluster, 1)
            fsim.inject("server_vanishes", name="h4-scheduler")
            wait_until(lambda: "h4-scheduler" not in server_names(fsim), timeout=30, what="vanishing")
        finally:
            t0 = time.monotonic()
            cluster.close(timeout=90)
        closed = time.monotonic() - t0
        # A bound, not a benchmark: below distributed's 30 s connect timeout, which a close
        # that waits on the vanished scheduler would spend at least once.
        assert closed < 25, f"close took {closed:.0f} s"
        row["outcome"] = f"close() deleted the rest in {closed:.1f} s"


@pytest.mark.timeout(90)
def test_very_slow_boot(fsim, scenario):
    with scenario("host: worker-0 boots 5 s late (SSH)") as row:
        fsim.inject("slow_boot", name="h5-worker-0", delay=5)
        t0 = time.monotonic()
        with HetznerCluster(workers=1, name="h5") as cluster:
            assert time.monotonic() - t0 >= 5
            check_up(cluster, 1)
            row["outcome"] = up(cluster, fsim, "waited for SSH within timeouts.ssh")


@pytest.mark.timeout(120)
def test_tunnel_reconnects_after_ssh_drops(fsim, scenario):
    with scenario("host: SSH to the scheduler drops, refused for 2 s") as row:
        with HetznerCluster(workers=1, name="h7") as cluster, Client(cluster) as client:
            client.wait_for_workers(1, timeout=60)
            tunnel = cluster.scheduler.tunnel
            fsim.inject("ssh_drop", name="h7-scheduler", down=2, count=1)
            wait_until(lambda: tunnel.reconnects >= 1, timeout=60, what="the tunnel reconnecting")
            assert client.submit(lambda x: x * 2, 21).result(timeout=60) == 42
            # Then another machine answers at its address (a new host key): never reconnected,
            # and what needs the scheduler says why instead of timing out.
            fsim.inject("ssh_drop", name="h7-scheduler", new_host_key=1, count=1)
            wait_until(lambda: tunnel.failure is not None, timeout=60, what="the tunnel refusing the new key")
            with pytest.raises(SchedulerUnreachable, match="host key of the scheduler's server h7-scheduler changed"):
                cluster.scale(2)
            with pytest.raises(SchedulerUnreachable, match="host key"):
                cluster.adapt(minimum=1, maximum=2)
            assert "unreachable" in repr(cluster)
            assert tunnel.reconnects == 1
            client.close(timeout=5)  # its scheduler is unreachable: do not wait for it
            row["outcome"] = (
                "tunnel re-established on the same port; client computes again; "
                "a new host key stops it and scale/adapt name it"
            )


# Signals to the client while it creates ---------------------------------------------------

START_SCRIPT = """
import sys
from dask_hetzner import HetznerCluster

def progress(node, phase):
    if phase == "installing":
        print("installing", flush=True)

HetznerCluster(workers=2, name=sys.argv[1], progress=progress)
print("started", flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
@pytest.mark.timeout(120)
def test_signal_while_creating(fsim, scenario, tmp_path, sig):
    name = f"s-{sig.name.lower()}"
    with scenario(f"client gets {sig.name} while creating") as row:
        (tmp_path / "start.py").write_text(START_SCRIPT)
        # The child reads this test's hetzner.* settings (simulator, fast retries) from a file.
        (tmp_path / "dask.yaml").write_text(yaml.safe_dump({"hetzner": dask.config.get("hetzner")}))
        env = {**os.environ, "DASK_CONFIG": str(tmp_path)}
        proc = subprocess.Popen(
            [sys.executable, str(tmp_path / "start.py"), name],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "installing"
            assert any(n.startswith(name) for n in server_names(fsim))
            t0 = time.monotonic()
            proc.send_signal(sig)
            _, stderr = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=30)
        assert proc.returncode != 0
        if sig == signal.SIGKILL:
            left = len(fsim.leaks().get("servers", []))
            assert left, "SIGKILL cannot clean up: servers must still be there for nuke"
            cloud = Cloud(fsim.token, fsim.endpoint, poll_interval=0.1, backoff_base=0.02)
            try:
                found = asyncio.run(cloud.delete_cluster(name, timeout=60))
            finally:
                cloud.close()
            row["outcome"] = (
                f"killed with {left} servers up; Cloud.delete_cluster removed {len(found)} "
                f"resources in {time.monotonic() - t0:.1f} s"
            )
        else:
            assert "KeyboardInterrupt" in stderr, stderr[-2000:]
            row["outcome"] = f"rolled back in {time.monotonic() - t0:.1f} s, exit {proc.returncode}"
