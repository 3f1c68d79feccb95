"""Shared fixtures: a simulator per test, and hetzner.* config pointing at it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

# Tests never write the user's local cluster state (~/.local/state/dask-hetzner), and two test
# runs at once never share one: a state directory per session, set before dask reads the
# environment, so it holds for this process and for every process a test starts.
os.environ["DASK_HETZNER__STATE_DIR"] = tempfile.mkdtemp(prefix="dask-hetzner-test-state-")

import dask  # noqa: E402
import pytest  # noqa: E402
from support import FAST, free_port  # noqa: E402

# Simulated servers keep their disks in memory (sim/disks.py): on this machine's disk,
# creating and deleting their files took a third of the suite's CPU. Inherited by every
# simulator a test starts in a process of its own.
os.environ.setdefault("DASK_HETZNER_SIM_DISKS", "memory")

# Tests never talk to the real API, whatever the developer's environment says.
for var in ("HCLOUD_TOKEN", "HCLOUD_ENDPOINT"):
    os.environ.pop(var, None)


# Other programs may hold 8786 on this machine: a port free now, fixed for the session, as
# on Hetzner (where workers know the scheduler's address before it runs). Every simulated
# scheduler listens on its own loopback address, so they can share it.
SCHEDULER_PORT = free_port("0.0.0.0")


def sim_config(sim) -> dict:
    return {
        "hetzner.token": sim.token,
        "hetzner.api-endpoint": sim.endpoint,
        "hetzner.ssh-port": sim.ssh_port,
        "hetzner.scheduler-port": SCHEDULER_PORT,
        "hetzner.dashboard-port": 0,
        "hetzner.api.poll-interval": "100ms",
        # Bounds for a loaded 2-core machine, far below the production defaults.
        "hetzner.timeouts.server-create": "60s",
        "hetzner.timeouts.ssh": "60s",
        "hetzner.timeouts.bootstrap": "600s",
        "hetzner.timeouts.process-start": "120s",
        "hetzner.timeouts.close": "60s",
        "distributed.deploy.lost-worker-timeout": "2s",
        # The dask stack only: syncing the test environment (jupyter, sphinx, ...) to every
        # simulated server would only slow the tests; tests/test_job.py covers "sync".
        "hetzner.environment": "minimal",
        # A retired worker's server is deleted at once in the suite; the tests of keeping paid
        # servers (tests/test_capacity.py) turn it on.
        "hetzner.keep-paid-servers": False,
    }


@pytest.fixture
def sim(request) -> Iterator:
    """A simulator in a background thread (its own event loop), checked empty at the end.

    Parametrize it indirectly with a dict of ``Simulator`` options (e.g. a rate limit).
    """
    from dask_hetzner.sim import Simulator

    # Every answer is checked against Hetzner's OpenAPI spec while the test runs.
    with Simulator(validate_responses=True, **getattr(request, "param", {})) as s:
        with dask.config.set(sim_config(s)):
            yield s
        leaks = s.leaks()
        violations = s.violations
    left = {kind: [r.get("name") or r.get("id") for r in items] for kind, items in leaks.items()}
    assert leaks == {}, f"resources left behind: {left}"
    assert violations == [], f"simulator answers that violate the spec: {violations}"


@pytest.fixture
def sim_process(tmp_path) -> Iterator:
    """The simulator in its own process (`dask-hetzner sim`), so it shares no GIL with the test."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "dask_hetzner.sim", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        endpoint = proc.stdout.readline().strip().split("=", 1)[1]
        token = proc.stdout.readline().strip().split("=", 1)[1]

        class Remote:
            pass

        s = Remote()
        s.endpoint, s.token, s.ssh_port = endpoint, token, 22
        with dask.config.set(sim_config(s)):
            yield s
        import hcloud

        left = hcloud.Client(token=token, api_endpoint=endpoint).servers.get_all()
        assert left == [], f"servers left behind: {[x.name for x in left]}"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# The fault suite's table (tests/test_faults.py): one row a scenario, printed at the end.
_FAULT_ROWS = pytest.StashKey[list]()


@pytest.fixture(scope="session")
def fault_table(pytestconfig) -> list:
    return pytestconfig.stash.setdefault(_FAULT_ROWS, [])


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    rows = config.stash.get(_FAULT_ROWS, [])
    if not rows:
        return
    terminalreporter.section("fault scenarios")
    # A markdown table: it reads in a terminal and pastes into a report.
    terminalreporter.write_line("| scenario | outcome | seconds | leaked |")
    terminalreporter.write_line("|---|---|---:|---|")
    for r in rows:
        outcome = r["outcome"].replace("|", "/").replace("\n", " ")
        terminalreporter.write_line(
            f"| {r['scenario']} | {outcome} | {r['seconds']:.1f} | {r['leaked']} |"
        )


@pytest.fixture
def fsim(sim) -> Iterator:
    """``sim`` with fast retries and short bounds (``support.FAST``)."""
    with dask.config.set(FAST):
        yield sim
