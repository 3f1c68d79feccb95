"""Dask clusters on Hetzner Cloud servers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from . import config  # noqa: E402,F401  (registers hetzner.* defaults)

if TYPE_CHECKING:
    from .clients import connect
    from .cluster import HetznerCluster
    from .manage import ClusterInfo, UnknownCluster, list_clusters, nuke

__all__ = ["ClusterInfo", "HetznerCluster", "UnknownCluster", "__version__", "connect", "list_clusters", "nuke"]

# Loaded on first use: `dask-hetzner ls` and friends need neither distributed nor its start-up time.
_LAZY = {
    "HetznerCluster": "cluster",
    "ClusterInfo": "manage",
    "UnknownCluster": "manage",
    "list_clusters": "manage",
    "nuke": "manage",
    "connect": "clients",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dask_hetzner' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
