"""Finding, inspecting and deleting clusters from any process, with or without their local state.

Everything here goes by the cluster label (``dask-hetzner/cluster=<name>``, equality, never a
name prefix), so it works on clusters created elsewhere, half-created or broken ones.
``list_clusters`` and ``nuke`` need only the API token; logs and SSH also need the local state
(the SSH key and the pinned host keys).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import math
import os
import re
import shlex
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from . import config, layout
from .cloud import (
    LABEL_JOINED,
    LABEL_KEPT_UNTIL,
    LABEL_WORKER,
    Cloud,
    CloudError,
    ClusterResources,
    ConfigError,
    ServerInfo,
    ServerTypeInfo,
    token_refused,
)
from .state import ClusterState, StateError, root_dir

if TYPE_CHECKING:
    from . import remote  # asyncssh: imported by the verbs that log in, not by `ls`

__all__ = [
    "check_name",
    "ClusterInfo",
    "UnknownCluster",
    "unknown_cluster",
    "list_clusters",
    "alist_clusters",
    "nuke",
    "anuke",
    "node_logs",
]

T = TypeVar("T")

LOG_LINES = 10_000  # per file: enough to debug, bounded for a log that grew for days


NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


def check_name(name: str) -> str:
    # Server names are "<name>-worker-<n>": the name must leave room in a 63-character hostname.
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(
            f"invalid cluster name {name!r}: use 1 to 40 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit (it becomes part of RFC 1123 hostnames)"
        )
    return name


class UnknownCluster(ConfigError):
    """No resource of the project carries this cluster's label (and no local state exists)."""


def unknown_cluster(name: str, hint: str = "") -> UnknownCluster:
    """The error for a cluster nothing carries the label of; ``hint`` says what to do."""
    return UnknownCluster(
        f"no cluster named {name!r} in this project (nothing carries its label"
        + (f"; {hint})" if hint else ")")
    )


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code, also when this thread already runs a loop (Jupyter)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def make_cloud(token: str | None = None, api_endpoint: str | None = None) -> Cloud:
    return Cloud(
        config.token(token) or "",  # Cloud refuses a missing one
        config.endpoint(api_endpoint),
        threads=int(config.get("api.threads")),
        request_timeout=config.seconds("timeouts.api-request"),
        max_retries=int(config.get("api.max-retries")),
        poll_interval=config.seconds("api.poll-interval"),
        backoff_base=config.seconds("api.backoff-base"),
        backoff_max=config.seconds("api.backoff-max"),
    )


@contextlib.asynccontextmanager
async def project_cloud(token: str | None = None, api_endpoint: str | None = None) -> AsyncIterator[Cloud]:
    """A ``Cloud`` for one command: closed afterwards, a refused token as a ``ConfigError``."""
    cloud = make_cloud(token, api_endpoint)
    try:
        yield cloud
    except CloudError as e:
        raise token_refused(e) from None
    finally:
        cloud.close()


def state_of(name: str) -> ClusterState:
    return ClusterState(root_dir(config.get("state-dir")), name)


# Listing -------------------------------------------------------------------------------------


@dataclass
class ClusterInfo:
    """One cluster of the project, as the API shows it."""

    name: str
    schedulers: int
    workers: int
    status: str
    created: str | None
    age_seconds: float | None
    hourly_cost: float
    local_state: bool
    # Worker servers whose dask worker never ran (a start killed half-way), not in ``workers``.
    not_joined: int = 0
    # EUR gross billed so far for the servers that exist (every started hour since each was
    # created, Primary IPv4 included); the API does not show deleted servers' hours.
    billed: float = 0.0
    servers: list[dict[str, Any]] = field(default_factory=list)
    other_resources: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "types": self.types}

    @property
    def types(self) -> str:
        """The server types it got: ``"cx23; workers: 2 cx33, 1 cpx32"`` (the scheduler's first)."""
        def mix(role: str) -> str:
            counts = Counter(s["type"] for s in self.servers if s["role"] == role)
            return ", ".join(f"{n} {t}" for t, n in sorted(counts.items(), key=lambda x: (-x[1], x[0])))

        scheduler, workers, kept = mix("scheduler"), mix("worker"), self._kept()
        parts = (scheduler and f"scheduler: {scheduler}", workers and f"workers: {workers}", kept)
        return "; ".join(x for x in parts if x)

    def _kept(self) -> str:
        """``"kept: 1 (paid, idle until 17:05)"``: retired workers' servers waiting for reuse."""
        until = sorted(s["kept_until"] or "" for s in self.servers if s["role"] == "kept")
        if not until:
            return ""
        when = time.strftime("%H:%M", time.localtime(int(until[0]))) if until[0].isdigit() else "?"
        return f"kept: {len(until)} (paid, idle until {when})"


def _status(found: ClusterResources) -> str:
    servers = found.servers
    if not servers:
        return "no servers"
    if not any(s.role == "scheduler" for s in servers):
        return "no scheduler"
    statuses = {s.status for s in servers}
    if statuses == {"running"}:
        return "running"
    return ", ".join(sorted(statuses - {"running"}))


def _age(created: str | None, now: datetime.datetime) -> float | None:
    if not created:
        return None
    try:
        when = datetime.datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (now - when).total_seconds())


def _billed(found: ClusterResources, types: dict[str, ServerTypeInfo], now: datetime.datetime) -> float:
    hour = config.seconds("billing-hour")
    total = 0.0
    for s in found.servers:
        info, age = types.get(s.server_type), _age(s.created, now)
        if info is not None and age is not None:
            total += (info.billed(s.location) or 0.0) * max(1, math.ceil(age / hour - 1e-9))
    return total


async def alist_clusters(
    *, token: str | None = None, api_endpoint: str | None = None
) -> list[ClusterInfo]:
    """Every cluster of the project (see :func:`list_clusters`)."""
    async with project_cloud(token, api_endpoint) as cloud:
        clusters, types = await asyncio.gather(cloud.all_clusters(), cloud.server_types())
    root = root_dir(config.get("state-dir"))
    now = datetime.datetime.now(datetime.timezone.utc)
    out = []
    for name, found in sorted(clusters.items()):
        cost = sum(
            types[s.server_type].billed(s.location) or 0.0  # the Primary IPv4 included
            for s in found.servers
            if s.server_type in types
        )
        out.append(
            ClusterInfo(
                name=name,
                schedulers=sum(s.role == "scheduler" for s in found.servers),
                workers=sum(s.role == "worker" and LABEL_JOINED in s.labels for s in found.servers),
                not_joined=sum(s.role == "worker" and LABEL_JOINED not in s.labels for s in found.servers),
                status=_status(found),
                created=found.created,
                age_seconds=_age(found.created, now),
                hourly_cost=cost,
                billed=_billed(found, types, now),
                local_state=(root / name / "cluster.json").is_file(),
                servers=[
                    {
                        "name": s.name,
                        "role": s.role,
                        "worker": s.labels.get(LABEL_WORKER),
                        "joined": s.role == "worker" and LABEL_JOINED in s.labels,
                        "kept_until": s.labels.get(LABEL_KEPT_UNTIL),
                        "status": s.status,
                        "type": s.server_type,
                        "location": s.location,
                        "public_ip": s.public_ip,
                        "private_ip": s.private_ip,
                    }
                    for s in sorted(found.servers, key=lambda s: s.name)
                ],
                other_resources={
                    "networks": len(found.networks),
                    "firewalls": len(found.firewalls),
                    "placement_groups": len(found.placement_groups),
                    "ssh_keys": len(found.ssh_keys),
                    "snapshots": len(found.images),
                },
            )
        )
    return out


def list_clusters(*, token: str | None = None, api_endpoint: str | None = None) -> list[ClusterInfo]:
    """Every cluster of the project: name, servers by role, status, age, hourly cost.

    Found by label, so clusters created by other processes or machines are listed too,
    and so are the leftovers of a crashed start (status ``no servers``/``no scheduler``).
    """
    return _run(alist_clusters(token=token, api_endpoint=api_endpoint))


# Deleting ------------------------------------------------------------------------------------


async def anuke(
    name: str,
    *,
    token: str | None = None,
    api_endpoint: str | None = None,
    timeout: float | None = None,
) -> ClusterResources:
    """Delete everything labelled with cluster ``name``, and its local state (see :func:`nuke`)."""
    check_name(name)  # also keeps the label selector from being anything but one equality
    state = state_of(name)
    had_state = await asyncio.to_thread(state.path.exists)
    async with project_cloud(token, api_endpoint) as cloud:
        found = await cloud.delete_cluster(
            name, timeout=timeout if timeout is not None else config.seconds("timeouts.close")
        )
    # Only after the API confirmed: the state is what reaches the cluster until then.
    await asyncio.to_thread(state.remove)
    if not len(found) and not had_state:
        raise unknown_cluster(name)
    return found


def nuke(
    name: str,
    *,
    token: str | None = None,
    api_endpoint: str | None = None,
    timeout: float | None = None,
) -> ClusterResources:
    """Delete every resource that carries cluster ``name``'s label, then its local state.

    Servers, network, firewall, placement groups, SSH key and snapshots; never anything of
    another cluster (label equality: ``c`` never matches ``c2``). Works on half-created and
    broken clusters and on clusters whose local state is gone. Returns what was deleted;
    raises :class:`UnknownCluster` when there was nothing at all.
    """
    return _run(anuke(name, token=token, api_endpoint=api_endpoint, timeout=timeout))


# Reaching the servers ------------------------------------------------------------------------


def node_label(server: ServerInfo) -> str:
    """``scheduler`` or the worker's spec name (``worker-3``): how users name a node."""
    if server.role == "scheduler":
        return "scheduler"
    return server.labels.get(LABEL_WORKER) or server.name


def pick_node(servers: Iterable[ServerInfo], cluster: str, node: str) -> ServerInfo:
    servers = list(servers)
    for server in servers:
        if node in (node_label(server), server.name):
            return server
    names = ", ".join(sorted(node_label(s) for s in servers)) or "none"
    raise ConfigError(f"cluster {cluster!r} has no node {node!r} (nodes: {names})")


async def node_logs(
    connect: Callable[[str, str], Awaitable[remote.Remote]],
    servers: Iterable[ServerInfo],
    host_keys: dict[str, str],
    *,
    lines: int = LOG_LINES,
    parallel: int = 16,
) -> dict[str, str]:
    """The dask and bootstrap logs of each server, over SSH with its pinned host key.

    Keys: ``scheduler``/``worker-N`` (the dask process's log) and ``... bootstrap``. A server
    that cannot be reached gets a one-line explanation instead of failing the rest; a host
    key that changed fails the whole call (``HostKeyMismatch``: not ours, never "unavailable").
    """
    limit = asyncio.Semaphore(parallel)

    from . import remote

    async def one(server: ServerInfo) -> dict[str, str]:
        label = node_label(server)
        role = "scheduler" if server.role == "scheduler" else "worker"
        files = {label: layout.log(role), f"{label} bootstrap": layout.BOOTSTRAP_LOG}
        key = host_keys.get(server.name)
        if not key or not server.public_ip:
            why = "no pinned host key" if not key else f"server is {server.status}"
            return {k: f"(not available: {why})" for k in files}
        async with limit:
            try:
                conn = await connect(server.public_ip, key)
            except remote.HostKeyMismatch:
                raise
            except (remote.RemoteError, OSError, ValueError) as e:
                return {k: f"(not available: {e})" for k in files}
            try:
                out = {}
                for k, path in files.items():
                    q = shlex.quote(path)
                    result = await conn.run(
                        f"if [ -f {q} ]; then tail -n {int(lines)} {q}; else echo '(no such log yet: ~/{path})'; fi",
                        check=False,
                        timeout=60,
                    )
                    out[k] = result.stdout
                return out
            except remote.RemoteError as e:
                return {k: f"(not available: {e})" for k in files}
            finally:
                await conn.close()

    results = await asyncio.gather(*(one(s) for s in servers))
    merged: dict[str, str] = {}
    for r in results:
        merged.update(r)
    return merged


@dataclass
class Access:
    """What reaching a cluster's servers takes: its local state and what the API lists."""

    name: str
    state: ClusterState
    metadata: dict[str, Any]
    ssh_private: str
    host_keys: dict[str, str]
    servers: list[ServerInfo]

    async def connect(self, host: str, host_key: str, retry_for: float = 15.0) -> remote.Remote:
        from . import remote

        return await remote.connect(
            host,
            port=int(self.metadata.get("ssh_port", 22)),
            client_key=self.ssh_private,
            host_key=host_key,
            retry_until=retry_for,
        )


async def access(name: str, *, token: str | None = None, api_endpoint: str | None = None) -> Access:
    """Local state plus the API's servers of cluster ``name``; clear errors when either is missing."""
    check_name(name)
    state = state_of(name)
    async with project_cloud(token, api_endpoint) as cloud:
        found = await cloud.cluster_resources(name)
    if not len(found):
        raise unknown_cluster(name)

    def read() -> tuple[dict[str, Any], str, dict[str, str]]:
        metadata = state.metadata()
        return metadata, state.secrets().ssh_private, {k: v[1] for k, v in state.host_keys().items()}

    try:
        metadata, ssh_private, pins = await asyncio.to_thread(read)
    except StateError as e:
        raise StateError(f"{e}; its servers cannot be reached from here") from None
    return Access(name, state, metadata, ssh_private, pins, found.servers)


def default_endpoint_configured() -> bool:
    """Whether the user chose an API endpoint (else a stored one may be used)."""
    return bool(config.get("api-endpoint") or os.environ.get("HCLOUD_ENDPOINT"))
