"""The ``hetzner://HOST:PORT/NAME`` address: a scheduler address that connects as it is.

A cluster's scheduler only accepts TLS with the cluster's client certificate, so its plain
``tls://`` address fails in a process that has none (the JupyterLab panel's "<>" snippet,
``Client("tls://127.0.0.1:PORT")`` in a notebook). ``HetznerCluster.scheduler_address`` is
this address instead: the same ``HOST:PORT`` behind a scheme of distributed's
``distributed.comm.backends`` entry point (registered in setup.cfg), whose connector takes
the client certificate of cluster ``NAME`` from this user's local state (0600 files) when
the caller brings no TLS context. The address itself holds no key; ``HOST`` stays first so
a ``Client``'s dashboard link (built from the address's host) is the live one.
"""

from __future__ import annotations

import asyncio
from typing import Any

from distributed.comm.core import FatalCommClosedError
from distributed.comm.tcp import TLSBackend, TLSConnector

from . import clients, config
from .state import ClusterState, StateError, root_dir

SCHEME = "hetzner"
TLS_PREFIX = "tls://"


def cluster_address(tls_address: str, name: str) -> str:
    """``tls://HOST:PORT`` of cluster ``name`` as ``hetzner://HOST:PORT/NAME``."""
    return f"{SCHEME}://{tls_address.removeprefix(TLS_PREFIX)}/{name}"


def split(loc: str) -> tuple[str, str]:
    """``HOST:PORT/NAME`` (the address without its scheme) into ``HOST:PORT`` and ``NAME``."""
    host_port, _, name = loc.rpartition("/")
    if not host_port or not name or ":" not in host_port:
        raise ValueError(f"{SCHEME}://{loc}: expected {SCHEME}://HOST:PORT/CLUSTER-NAME")
    return host_port, name


def state_connection_args(name: str) -> dict[str, Any]:
    """TLS with cluster ``name``'s client certificate from the local state (blocking)."""
    state = ClusterState(root_dir(config.get("state-dir")), name)
    if not state.exists():
        raise StateError(
            f"no local state for cluster {name!r} in {state.root} (created on another machine? "
            "import its access there with dask-hetzner access import)"
        )
    try:
        return dict(clients.client_security(state).get_connection_args("client"))
    except OSError as e:  # a view-only or half-deleted state
        raise StateError(f"cluster {name!r}: its client certificate cannot be read: {e}") from None


class HetznerConnector(TLSConnector):
    """TLS to ``HOST:PORT`` with the caller's TLS context, or the named cluster's."""

    async def connect(self, address: str, deserialize: bool = True, **connection_args: Any) -> Any:
        host_port, name = split(address)
        if connection_args.get("ssl_context") is None:
            try:
                found = await asyncio.to_thread(state_connection_args, name)
            except StateError as e:
                # Fatal: retrying cannot make the state appear within the connect timeout.
                raise FatalCommClosedError(f"{SCHEME}://{address}: {e}") from None
            connection_args = {**connection_args, **found}
        return await super().connect(host_port, deserialize=deserialize, **connection_args)


class HetznerBackend(TLSBackend):
    """The ``hetzner`` scheme: client side only (nothing listens on such an address)."""

    _connector_class = HetznerConnector

    def get_listener(self, loc: str, handle_comm: Any, deserialize: bool, **connection_args: Any) -> Any:
        raise ValueError(f"{SCHEME}://{loc}: a client address; nothing can listen on it")

    def get_address_host(self, loc: str) -> Any:
        return super().get_address_host(split(loc)[0])

    def get_address_host_port(self, loc: str) -> Any:
        return super().get_address_host_port(split(loc)[0])

    def resolve_address(self, loc: str) -> str:
        host_port, name = split(loc)
        return f"{super().resolve_address(host_port)}/{name}"

    def get_local_address_for(self, loc: str) -> Any:
        return super().get_local_address_for(split(loc)[0])
