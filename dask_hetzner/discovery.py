"""dask-ctl's discovery (``dask cluster list``): this project's clusters, as views.

Registered as the ``dask_cluster_discovery`` entry point ``hetzner``. dask-ctl rebuilds each
cluster with ``cls.from_name(name)`` and lists it; a plain ``HetznerCluster.from_name``
would take the cluster over, and the listing process would delete it at exit. So the class
handed to dask-ctl attaches as a view (``take_over=False``): closing it only disconnects.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any


class HetznerClusterView:
    """What dask-ctl calls ``from_name`` on: a running cluster, never deleted by the lister."""

    @classmethod
    def from_name(cls, name: str, **kwargs: Any) -> Any:
        from .cluster import HetznerCluster

        return HetznerCluster.from_name(name, take_over=False, **kwargs)


async def discover() -> AsyncIterator[tuple[str, type]]:
    """The project's clusters (by label) whose local state is on this machine."""
    from .manage import alist_clusters

    for info in await alist_clusters():
        if info.local_state:
            yield info.name, HetznerClusterView
