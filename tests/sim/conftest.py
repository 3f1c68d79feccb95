"""Fixtures of the simulator tests: API-only simulators that validate every answer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from sim_helpers import FakeHosts

from dask_hetzner.sim import Simulator


@pytest.fixture
async def asim() -> AsyncIterator[Simulator]:
    """A simulator on the test's event loop, no hosts, spec-checked, empty at the end."""
    async with Simulator(hosts=False, validate_responses=True) as sim:
        yield sim
        assert sim.leaks() == {}, "the test left resources behind"


@pytest.fixture
def tsim() -> Iterator[Simulator]:
    """A simulator in its own thread (for the synchronous SDK), empty at the end."""
    with Simulator(hosts=False, validate_responses=True) as sim:
        yield sim
        assert sim.leaks() == {}, "the test left resources behind"


@pytest.fixture
def fake_hosts() -> FakeHosts:
    return FakeHosts()
