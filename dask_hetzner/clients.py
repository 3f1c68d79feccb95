"""A ``Client`` for a running cluster by its name: ``dask_hetzner.connect("NAME")``.

The process that holds a cluster (a script, the JupyterLab panel's Jupyter server) writes
where its scheduler answers from this machine into the cluster's local state
(``client.json``: the SSH tunnel's local address, or the public one with
``connect="public"``); any other process on the machine, such as a notebook's kernel, connects
there with the cluster's client certificate, without a second object that could delete it.
"""

from __future__ import annotations

import os
from typing import Any

from . import config
from .state import ClusterState, StateError, root_dir


def client_security(state: ClusterState) -> Any:
    """TLS with the cluster's client certificate, by paths into its local state."""
    from distributed import Security

    # Paths, not PEM contents: distributed would otherwise write a temporary copy for every
    # TLS context.
    return Security(
        require_encryption=True,
        tls_ca_file=str(state.ca_cert),
        tls_client_cert=str(state.client_cert),
        tls_client_key=str(state.client_key),
    )


def client_info(address: str, dashboard_link: str, connect: str) -> dict[str, Any]:
    """What ``client.json`` holds: written by the process that holds the cluster."""
    return {"address": address, "dashboard_link": dashboard_link, "connect": connect, "pid": os.getpid()}


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


def address_of(name: str) -> tuple[ClusterState, dict[str, Any]]:
    """The cluster's state and where its scheduler answers from here; a one-line error if none."""
    state = ClusterState(root_dir(config.get("state-dir")), name)
    if not state.exists():
        raise StateError(
            f"no local state for cluster {name!r} in {state.root} (created on another machine? "
            "import its access there with dask-hetzner access import)"
        )
    info = state.client_address()
    if info is None or (info.get("connect") == "tunnel" and not _alive(info.get("pid"))):
        raise StateError(
            f"cluster {name!r}: no process on this machine holds its connection; "
            f"take it over with HetznerCluster.from_name({name!r}).get_client()"
        )
    return state, info


def connect(name: str, **kwargs: Any) -> Any:
    """A ``distributed.Client`` connected to the running cluster ``name``.

    For a cluster held by another process on this machine (the JupyterLab panel's, a
    script's): it goes through that process's SSH tunnel, with the cluster's client
    certificate from the local state. The client never deletes the cluster; its
    ``dashboard_link`` is the live one. ``kwargs`` go to ``Client`` (``asynchronous=True``, ...).
    """
    from distributed import Client

    state, info = address_of(name)
    return Client(info["address"], security=client_security(state), **kwargs)
