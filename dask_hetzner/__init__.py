"""Dask clusters on Hetzner Cloud servers."""

__version__ = "0.1.0"

from . import config  # noqa: E402,F401  (registers hetzner.* defaults)
from .cluster import HetznerCluster  # noqa: E402

__all__ = ["HetznerCluster", "__version__"]
