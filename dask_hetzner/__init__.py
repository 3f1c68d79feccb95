"""Dask clusters on Hetzner Cloud servers."""

__version__ = "0.1.0"

from . import config  # noqa: E402,F401  (registers hetzner.* defaults)
from .cluster import HetznerCluster  # noqa: E402
from .manage import ClusterInfo, UnknownCluster, list_clusters, nuke  # noqa: E402

__all__ = ["ClusterInfo", "HetznerCluster", "UnknownCluster", "__version__", "list_clusters", "nuke"]
