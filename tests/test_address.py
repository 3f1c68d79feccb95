"""The ``hetzner://HOST:PORT/NAME`` scheme as distributed sees it (no simulator needed)."""

from __future__ import annotations

import pytest
from distributed.comm import addressing
from distributed.comm.core import FatalCommClosedError, connect

from dask_hetzner import address


def test_distributed_finds_the_scheme_by_its_entry_point():
    a = "hetzner://127.0.0.1:34167/lab3"
    assert address.cluster_address("tls://127.0.0.1:34167", "lab3") == a
    assert addressing.get_address_host(a) == "127.0.0.1"
    assert addressing.get_address_host_port(a) == ("127.0.0.1", 34167)
    assert addressing.resolve_address("hetzner://localhost:34167/lab3") == a
    assert addressing.get_local_address_for(a) == "hetzner://127.0.0.1"


@pytest.mark.parametrize("loc", ["lab3", "127.0.0.1:34167", "127.0.0.1:34167/", "/lab3"])
def test_an_address_without_host_port_and_name_is_refused(loc):
    with pytest.raises(ValueError, match="expected hetzner://HOST:PORT/CLUSTER-NAME"):
        address.split(loc)


async def test_an_unknown_cluster_fails_at_once_naming_it():
    # The tests' state directory (conftest) holds no cluster "nosuch". Not retried until the
    # connect timeout: the state cannot appear meanwhile.
    with pytest.raises(FatalCommClosedError, match="no local state for cluster 'nosuch'"):
        await connect("hetzner://127.0.0.1:9/nosuch", timeout=60)


def test_nothing_listens_on_a_hetzner_address():
    from distributed.comm import registry

    with pytest.raises(ValueError, match="a client address"):
        registry.get_backend("hetzner").get_listener("127.0.0.1:0/lab3", None, True)
