"""Reattaching to a running cluster: its settings and keys from the local state, its
servers from the API. ``HetznerCluster.from_name`` and ``_start_attached`` use these."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from typing import Any

from . import config, environment, manage
from .attach import AttachError, Attachment
from .cloud import LABEL_WORKER, ConfigError, ServerInfo
from .provision.context import ClusterContext
from .settings import ClusterSettings
from .state import ClusterState, StateError, root_dir

logger = logging.getLogger(__name__)

_SETTING_NAMES = {f.name for f in dataclasses.fields(ClusterSettings)}


def read(name: str, overrides: dict[str, Any]) -> tuple[ClusterSettings, Attachment, str | None]:
    """The stored settings (``overrides`` win for settings named there), the keys, and the
    endpoint it was created at (None: the configured one is used).

    ``overrides`` loses the settings it names; what is left is for ``SpecCluster``.
    """
    manage.check_name(name)
    state = ClusterState(root_dir(config.get("state-dir")), name)
    # A few small files: read here even when called on a running event loop.
    metadata = state.metadata()
    keys = state.secrets()
    _warn_versions(name, metadata.get("versions", {}))
    chosen = {k: overrides.pop(k) for k in list(overrides) if k in _SETTING_NAMES}
    settings = ClusterSettings.from_metadata(metadata, **chosen)
    stored = metadata.get("endpoint")
    if not manage.default_endpoint_configured() and stored not in (None, config.endpoint()):
        # A forged or foreign cluster.json must not receive the token: the user chooses.
        raise ConfigError(
            f"cluster {name!r} was created at API endpoint {stored!r}, not the configured "
            f"{config.endpoint()!r}: set HCLOUD_ENDPOINT or pass api_endpoint= to reattach there"
        )
    endpoint = None
    return settings, Attachment(state, keys, start=_start_id(name, metadata.get("start"))), endpoint


def _start_id(name: str, start: Any) -> str | None:
    """The start id in ``cluster.json``: it goes into a label selector, so it is checked."""
    if start is None or (isinstance(start, str) and re.fullmatch(r"[0-9a-f]{1,32}", start)):
        return start
    raise StateError(f"local state of cluster {name!r}: invalid start id {start!r} in cluster.json")


def _warn_versions(name: str, theirs: dict[str, str]) -> None:
    local = environment.local_versions()
    for package in ("dask", "distributed"):
        if theirs.get(package) and theirs[package] != local.get(package):
            logger.warning(
                "cluster %s runs %s %s, this process has %s: new workers will not match",
                name,
                package,
                theirs[package],
                local.get(package),
            )


@dataclasses.dataclass
class Adopted:
    """A running cluster's servers as this process takes them over."""

    scheduler: ServerInfo
    host_keys: dict[str, str]  # server name -> pinned host key
    workers: dict[str, ServerInfo]  # worker name -> its server
    next_number: int  # the next worker-N to create


async def adopt(ctx: ClusterContext, state: ClusterState) -> Adopted:
    """Take over the shared resources and servers that carry the cluster's label."""
    name = ctx.settings.name
    found = await ctx.cloud.cluster_resources(name)
    if not len(found):
        raise manage.unknown_cluster(name, hint=f"remove its stale local state with dask-hetzner nuke {name}")
    schedulers = [s for s in found.servers if s.role == "scheduler"]
    if not schedulers:
        raise AttachError(f"cluster {name!r} has no scheduler server: delete it with dask-hetzner nuke {name}")
    await ctx.cloud.server_types()  # prices for hourly_cost and max_hourly_cost
    pins = await asyncio.to_thread(state.host_keys)
    keys = {n: key for n, (sid, key) in pins.items() if any(s.id == sid for s in found.servers)}
    ctx.shared.adopt(found)
    for server in found.servers:
        ctx.factory.record(server)
    ctx.pins.update(keys)
    scheduler = schedulers[0]
    if scheduler.name not in keys:
        raise AttachError(
            f"no pinned host key for {scheduler.name} in {state.path}: refusing to trust its server"
        )
    workers = {
        s.labels[LABEL_WORKER]: s for s in found.servers if s.role == "worker" and s.labels.get(LABEL_WORKER)
    }
    # Kept servers (paid, idle) serve this process's scale-ups; one without a pinned host key
    # cannot be trusted for that and goes with the cluster.
    for s in found.servers:
        if s.role == "kept" and s.name in keys:
            ctx.kept.adopt(s, keys[s.name])
    numbers = [int(m[1]) for w in workers if (m := re.fullmatch(r"worker-(\d+)", w))]
    return Adopted(scheduler, keys, workers, max(numbers, default=-1) + 1)
