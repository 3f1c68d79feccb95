"""The project's own view of the API's objects: labels, servers, server types, resources.

The SDK adapter (``sdk.py``) builds these from the SDK's objects; nothing else in the package
sees an SDK object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

LABEL_CLUSTER = "dask-hetzner/cluster"
LABEL_ROLE = "dask-hetzner/role"
LABEL_WORKER = "dask-hetzner/worker"
# A retired worker's server kept (role "kept") while its started hour is paid: until when
# (Unix time), so any process can show it.
LABEL_KEPT_UNTIL = "dask-hetzner/kept-until"
# A random id per cluster, made by the start that claimed the name and kept in cluster.json:
# a start adopts or deletes only what carries its own (a concurrent start of the same name
# never takes over or rolls back another's resources).
LABEL_START = "dask-hetzner/start"
# Set on a worker's server once its dask worker runs (started and listening): a worker
# server without it never got that far (its start was killed half-way), which `ls` shows
# as "not joined" and reattaching deletes instead of counting.
LABEL_JOINED = "dask-hetzner/joined"

# The labelled resources a cluster shares besides its servers (snapshots are images).
Kind = Literal["ssh_key", "network", "firewall", "placement_group", "snapshot"]
# How messages name one of each kind.
NOUN: dict[Kind, str] = {
    "ssh_key": "SSH key",
    "network": "network",
    "firewall": "firewall",
    "placement_group": "placement group",
    "snapshot": "snapshot",
}


def selector(cluster: str, **labels: str) -> str:
    parts = [f"{LABEL_CLUSTER}={cluster}"]
    parts += [f"{key}={value}" for key, value in labels.items()]
    return ",".join(parts)


def owned(cluster: str, start: str | None) -> str:
    """The selector of what the start ``start`` of ``cluster`` made (None: a cluster made
    before start ids existed, selected by its cluster label alone)."""
    return selector(cluster) if start is None else selector(cluster, **{LABEL_START: start})


def cluster_labels(cluster: str, role: str, start: str | None) -> dict[str, str]:
    """The labels of a resource ``start`` creates for ``cluster``."""
    labels = {LABEL_CLUSTER: cluster, LABEL_ROLE: role}
    if start is not None:
        labels[LABEL_START] = start
    return labels


@dataclass
class ServerTypeInfo:
    name: str
    cores: int
    memory_gb: float
    disk_gb: int
    architecture: str
    cpu_type: str
    deprecated: bool
    # location -> gross EUR per hour
    hourly: dict[str, float] = field(default_factory=dict)
    monthly: dict[str, float] = field(default_factory=dict)
    # locations where it can be ordered now
    available: set[str] = field(default_factory=set)
    # locations where Hetzner recommends it now (``server_types[].locations[].recommended``)
    recommended: set[str] = field(default_factory=set)
    # location -> gross EUR per hour of the Primary IPv4 a server gets there (``GET /pricing``)
    ipv4: dict[str, float] = field(default_factory=dict)

    def billed(self, location: str) -> float | None:
        """Gross EUR/h Hetzner bills for one server there, its Primary IPv4 included."""
        if location not in self.hourly:
            return None
        return self.hourly[location] + self.ipv4.get(location, 0.0)

    def price(self, locations: Sequence[str]) -> float:
        """Gross EUR/h (Primary IPv4 included) of one server that may land in any of
        ``locations`` (fallbacks too): the dearest of those it has a price in; 0.0 if none."""
        return max((self.billed(loc) or 0.0 for loc in locations if loc in self.hourly), default=0.0)


@dataclass(frozen=True)
class NewServer:
    """What a server is created with (``POST /servers``), handed down the layers as one value."""

    name: str
    server_type: str
    image: str
    location: str
    ssh_key_id: int
    network_id: int
    firewall_id: int
    placement_group_id: int | None
    # cloud-init with the server's private host key: never in a repr.
    user_data: str = field(repr=False)
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class LocationInfo:
    name: str
    city: str
    network_zone: str


@dataclass
class ServerInfo:
    id: int
    name: str
    status: str
    labels: dict[str, str]
    server_type: str
    location: str
    public_ip: str | None
    private_ip: str | None
    created: str
    # The create_server action, when this came from our own POST: how a failed create shows.
    action_id: int | None = None

    @property
    def role(self) -> str | None:
        return self.labels.get(LABEL_ROLE)


@dataclass
class ResourceInfo:
    """A labelled resource other than a server (SSH key, network, firewall, group, snapshot)."""

    id: int
    labels: dict[str, str]
    created: str  # ISO 8601; "" if the API did not say
    # A placement group's servers (ids); empty for other kinds.
    servers: list[int] = field(default_factory=list)


@dataclass
class ClusterResources:
    """Everything that carries one cluster's label."""

    servers: list[ServerInfo] = field(default_factory=list)
    networks: list[int] = field(default_factory=list)
    firewalls: list[int] = field(default_factory=list)
    placement_groups: list[int] = field(default_factory=list)
    ssh_keys: list[int] = field(default_factory=list)
    images: list[int] = field(default_factory=list)
    # placement group id -> ids of its servers (to reuse groups when reattaching)
    group_servers: dict[int, list[int]] = field(default_factory=dict)
    # ISO-8601 creation time of the oldest resource (for ``ls``: a cluster's age)
    created: str | None = None

    def saw_created(self, when: str) -> None:
        """One of its resources was created at ``when`` (ISO 8601; "" if unknown)."""
        if when and (self.created is None or when < self.created):
            self.created = when

    def __len__(self) -> int:
        return sum(
            len(x)
            for x in (
                self.servers,
                self.networks,
                self.firewalls,
                self.placement_groups,
                self.ssh_keys,
                self.images,
            )
        )
