"""``no_client_timeout`` and ``max_lifetime``: enforced on the scheduler's server (idle.py's
watchdog), so they hold when the client process is gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import dask
import pytest
from support import sdk, servers_of, wait_until

from dask_hetzner import HetznerCluster, idle
from dask_hetzner.cloud import LABEL_CLUSTER, LABEL_KEPT_UNTIL, LABEL_ROLE, ConfigError


def test_why_delete_names_the_policy():
    now, started = 1000.0, 950.0
    config = {"timeout": None, "no_client_timeout": 30.0, "max_lifetime": 90.0}
    with_client = {"time": now - 0.5, "idle_since": now - 50, "no_client_since": None}
    assert idle.why_delete(config, with_client, now, started) is None  # idle, but no idle_timeout
    alone = {**with_client, "no_client_since": now - 31}
    assert idle.why_delete(config, alone, now, started) == "no client connected for 31 s (no_client_timeout)"
    # A scheduler that is gone has no clients: its silence counts.
    silent = {**with_client, "time": now - 40}
    assert "no_client_timeout" in (idle.why_delete(config, silent, now, started) or "")
    assert idle.why_delete(config, with_client, now, now - 95) == "running for 95 s (max_lifetime)"
    assert idle.why_delete({**config, "timeout": 45.0}, with_client, now, started) == "idle for 50 s"
    # No heartbeat yet: the scheduler is starting (within start_grace), not gone.
    assert idle.why_delete({**config, "start_grace": 600.0}, None, now, started) is None
    assert idle.why_delete({**config, "timeout": 3.0, "start_grace": 600.0}, None, now, started) is None
    assert "no_client_timeout" in (idle.why_delete(config, None, now, started) or "")


def test_kept_servers_expire_on_the_server_within_their_paid_hour():
    # idle.py runs alone on the server: its copies of the labels must be the package's.
    assert (idle.LABEL_ROLE, idle.LABEL_KEPT_UNTIL) == (LABEL_ROLE, LABEL_KEPT_UNTIL)
    # The default margin (5 min): grace 150 s, one listing a minute, deleted before the hour.
    grace = 300.0 / 2
    assert idle.kept_poll_interval(grace) == 60.0 and grace + idle.kept_poll_interval(grace) < 300.0
    assert idle.kept_poll_interval(0.0) == 5.0  # never more than 720 listings an hour


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"no_client_timeout": -5}, "no_client_timeout must be positive"),
        ({"max_lifetime": "soon"}, "max_lifetime must be a duration"),
        ({"keep_margin": "-1m"}, "keep_margin must be at least 0"),
        ({"keep_margin": "2h"}, "below hetzner.billing-hour"),
    ],
)
def test_bad_policies_refused(sim, kwargs, match):
    from dask_hetzner.settings import ClusterSettings

    with pytest.raises(ConfigError, match=match):
        ClusterSettings.build(name="pol0", **kwargs)
    if "keep_margin" not in kwargs:  # the constructor's keywords
        with pytest.raises(ConfigError, match=match):
            HetznerCluster(workers=0, name="pol0", **kwargs)
    assert sim.leaks() == {}


def _leftovers(sim, name: str) -> dict:
    out = {}
    for kind, items in sim.resources().items():
        mine = [i.get("name") or i.get("id") for i in items if (i.get("labels") or {}).get(LABEL_CLUSTER) == name]
        if mine:
            out[kind] = mine
    return out


def _watchdog_deletes_an_expired_kept_server(sim, name: str, home) -> None:
    """Two kept servers; one's paid time is over (its label set back, as time passing would):
    the watchdog deletes it, and only it; the other goes with the cluster (its policy)."""
    kept = [s for s in servers_of(sim, name) if s.labels[LABEL_ROLE] == "kept"]
    assert len(kept) == 2, [s.name for s in servers_of(sim, name)]
    over, other = kept
    sdk(sim).servers.update(over, labels={**over.labels, LABEL_KEPT_UNTIL: str(int(time.time()) - 5)})
    wait_until(
        lambda: over.id not in {s.id for s in servers_of(sim, name)},
        timeout=30, what="the watchdog deleting the kept server whose paid time is over",
    )  # fmt: skip
    assert f"kept server {over.name}: its paid time ended" in (home / "idle.log").read_text(errors="replace")
    left = {s.id for s in servers_of(sim, name)}
    assert other.id in left and len(left) == 2, "only the expired kept server goes"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "name, workers, policies, expected, why",
    [
        # With no idle timeout, the scheduler's server deletes the cluster once no client has
        # been connected for no_client_timeout; max_lifetime (an hour) has nothing to say yet.
        # Before, both workers retired, their servers kept (paid, idle): the one whose
        # kept-until has passed is deleted by the watchdog, the client being gone.
        ("pol1", 2, "no_client_timeout='15s', max_lifetime='1h'", (None, 15.0, 3600.0), "no_client_timeout"),
        # max_lifetime alone: deleted when its time is up (long enough for a loaded start).
        ("pol2", 0, "max_lifetime='40s'", (None, None, 40.0), "max_lifetime"),
    ],
)
def test_policies_delete_the_cluster_of_a_killed_client(sim, tmp_path, name, workers, policies, expected, why):
    """The client process dies (SIGKILL: no atexit, no close) while working: the watchdog on
    the scheduler's server deletes the cluster by the policy."""
    keep = workers == 2
    retire = (
        "cluster.scale(0)\n"
        "import time\n"
        "t0 = time.monotonic()\n"
        "while len(cluster.context.kept.kept) < 2:\n"
        "    assert time.monotonic() - t0 < 120, 'the retired workers were not kept'\n"
        "    time.sleep(0.2)\n"
    )
    script = tmp_path / "start.py"
    script.write_text(
        "import threading\n"
        "from distributed import Client\n"
        "from dask_hetzner import HetznerCluster\n"
        f"cluster = HetznerCluster(workers={workers}, name='{name}', {policies})\n"
        "client = Client(cluster)\n"
        + ("client.wait_for_workers(1, timeout=120)\n" if workers else "")
        + "assert client.submit(lambda: 41 + 1).result(timeout=60) == 42\n" * workers
        + (retire if keep else "")
        + "print('ready', cluster.scheduler.server.id, flush=True)\n"
        + "threading.Event().wait()\n"
    )
    config = dask.config.get("hetzner")
    env = {
        **os.environ,
        "HCLOUD_TOKEN": sim.token,  # the environment, never the command line
        "HCLOUD_ENDPOINT": sim.endpoint,
        "DASK_HETZNER__SSH_PORT": str(config["ssh-port"]),
        "DASK_HETZNER__SCHEDULER_PORT": "0",
        "DASK_HETZNER__DASHBOARD_PORT": "0",
        "DASK_HETZNER__API__POLL_INTERVAL": "100ms",
        "DASK_HETZNER__ENVIRONMENT": "minimal",  # as in conftest: the dask stack only
        "DASK_HETZNER__KEEP_PAID_SERVERS": str(keep),
        "DASK_HETZNER__KEEP_MARGIN": "4s",  # the watchdog's grace: 2 s past kept-until
    }
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split()
        assert line and line[0] == "ready", f"the client process did not start its cluster: {line}"
        scheduler_id = int(line[1])
        assert len(servers_of(sim, name)) == 1 + workers
        home = sim.hosts.directory(scheduler_id) / ".dask-hetzner"
        state = home / "dask" / "idle-state.json"
        wait_until(
            lambda: state.exists() and json.loads(state.read_text())["clients"] == 1,
            timeout=30,
            what="a heartbeat that sees the client",
        )
        assert json.loads(state.read_text())["no_client_since"] is None
        settings = json.loads((home / "lib" / "idle.json").read_text())
        assert (settings["timeout"], settings["no_client_timeout"], settings["max_lifetime"]) == expected
        assert settings["kept_grace"] == (2.0 if keep else None)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if keep:
            _watchdog_deletes_an_expired_kept_server(sim, name, home)
        wait_until(
            lambda: why in (home / "idle.log").read_text(errors="replace"),
            timeout=90, what=f"the watchdog deleting the cluster ({why})",
        )  # fmt: skip
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    wait_until(lambda: _leftovers(sim, name) == {}, timeout=120, what="the killed client's cluster deleted")
