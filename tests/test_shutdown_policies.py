"""``no_client_timeout`` and ``max_lifetime``: enforced on the scheduler's server (idle.py's
watchdog), so they hold when the client process is gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import dask
import pytest
from support import servers_of, wait_until

from dask_hetzner import HetznerCluster, idle
from dask_hetzner.cloud import LABEL_CLUSTER, ConfigError


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


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "name, workers, policies, expected, why",
    [
        # With no idle timeout, the scheduler's server deletes the cluster once no client has
        # been connected for no_client_timeout; max_lifetime (an hour) has nothing to say yet.
        ("pol1", 1, "no_client_timeout='4s', max_lifetime='1h'", (None, 4.0, 3600.0), "no_client_timeout"),
        # max_lifetime alone: deleted when its time is up (long enough for a loaded start).
        ("pol2", 0, "max_lifetime='40s'", (None, None, 40.0), "max_lifetime"),
    ],
)
def test_policies_delete_the_cluster_of_a_killed_client(sim, tmp_path, name, workers, policies, expected, why):
    """The client process dies (SIGKILL: no atexit, no close) while working: the watchdog on
    the scheduler's server deletes the cluster by the policy."""
    script = tmp_path / "start.py"
    script.write_text(
        "import threading\n"
        "from distributed import Client\n"
        "from dask_hetzner import HetznerCluster\n"
        f"cluster = HetznerCluster(workers={workers}, name='{name}', {policies})\n"
        "client = Client(cluster)\n"
        + ("client.wait_for_workers(1, timeout=120)\n" if workers else "")
        + "assert client.submit(lambda: 41 + 1).result(timeout=60) == 42\n" * workers
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
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        wait_until(
            lambda: why in (home / "idle.log").read_text(errors="replace"),
            timeout=90, what=f"the watchdog deleting the cluster ({why})",
        )  # fmt: skip
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    wait_until(lambda: _leftovers(sim, name) == {}, timeout=120, what="the killed client's cluster deleted")
