"""The Hetzner Cloud API, asynchronously: ``Cloud`` and what it returns and raises.

Only ``sdk.py`` (the SDK adapter) imports ``hcloud``; ``client.py`` says how the layers fit.
"""

from __future__ import annotations

from .client import Cloud
from .errors import ActionFailed, CloudError, ConfigError, token_refused
from .model import (
    LABEL_CLUSTER,
    LABEL_JOINED,
    LABEL_KEPT_UNTIL,
    LABEL_ROLE,
    LABEL_START,
    LABEL_WORKER,
    ClusterResources,
    LocationInfo,
    NewServer,
    ResourceInfo,
    ServerInfo,
    ServerTypeInfo,
    cluster_labels,
    owned,
    selector,
)
from .retry import TRANSIENT_CODES, TRANSIENT_STATUSES, RateLimit
from .watcher import LAZY_POLLS, ServerWatcher

__all__ = [
    "LABEL_CLUSTER",
    "LABEL_JOINED",
    "LABEL_KEPT_UNTIL",
    "LABEL_ROLE",
    "LABEL_START",
    "LABEL_WORKER",
    "LAZY_POLLS",
    "TRANSIENT_CODES",
    "TRANSIENT_STATUSES",
    "ActionFailed",
    "Cloud",
    "CloudError",
    "ClusterResources",
    "ConfigError",
    "LocationInfo",
    "NewServer",
    "RateLimit",
    "ResourceInfo",
    "ServerInfo",
    "ServerTypeInfo",
    "ServerWatcher",
    "cluster_labels",
    "owned",
    "selector",
    "token_refused",
]
