"""What every server of a cluster shares: its SSH key, network, firewall, placement groups."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from ..cloud import Cloud, CloudError, ClusterResources, cluster_labels
from ..settings import ClusterSettings

PLACEMENT_GROUP_SIZE = 10  # Hetzner's limit for a spread group


def firewall_rules(s: ClusterSettings) -> list[dict[str, Any]]:
    """Only SSH (and ICMP) from allowed_cidrs; the scheduler port too with connect=public."""

    def rule(protocol: str, port: int | None, description: str) -> dict[str, Any]:
        return {
            "direction": "in",
            "protocol": protocol,
            "port": None if port is None else str(port),
            "source_ips": list(s.allowed_cidrs),
            "destination_ips": [],
            "description": description,
        }

    rules = [rule("tcp", s.ssh_port, "ssh"), rule("icmp", None, "icmp")]
    if s.connect == "public":
        rules.append(rule("tcp", s.scheduler_port, "dask scheduler (TLS)"))
    return rules


@dataclass
class _Group:
    id: int
    members: set[str] = field(default_factory=set)
    full: bool = False


class SharedResources:
    """Creates (or adopts) the shared resources and hands out placement-group slots."""

    def __init__(self, cloud: Cloud, settings: ClusterSettings, public_key: str, start: str | None) -> None:
        self.cloud = cloud
        self.settings = settings
        self._public_key = public_key
        self._labels = cluster_labels(settings.name, "shared", start)
        self.ssh_key_id: int | None = None
        self.network_id: int | None = None
        self.firewall_id: int | None = None
        self._groups: list[_Group] = []
        self._group_lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return bool(self.ssh_key_id and self.network_id and self.firewall_id)

    async def claim(self) -> None:
        """Claim the cluster's name: create its SSH key, whose name the API keeps unique in a
        project. Of two starts of the same name, only one gets past here (the other's
        create meets a 409 on a key with another start id, and adopts nothing)."""
        s = self.settings
        self.ssh_key_id = await self.cloud.create_ssh_key(s.name, self._public_key, self._labels)

    async def setup(self) -> None:
        """Create the network and firewall, in parallel (after :meth:`claim`)."""
        s = self.settings
        zone = (await self.cloud.locations())[s.location].network_zone
        net = ipaddress.ip_network(s.network_ip_range)
        subnet = next(net.subnets(new_prefix=max(net.prefixlen, 24)))
        shared = self._labels

        async def network() -> None:
            self.network_id = await self.cloud.create_network(s.name, str(net), str(subnet), zone, shared)

        async def firewall() -> None:
            self.firewall_id = await self.cloud.create_firewall(s.name, firewall_rules(s), shared)

        await asyncio.gather(network(), firewall())

    def adopt(self, found: ClusterResources) -> None:
        """Reattaching: take over the shared resources the API lists."""
        if not (found.ssh_keys and found.networks and found.firewalls):
            raise CloudError(
                f"reattaching to cluster {self.settings.name}: its SSH key, network or firewall is "
                "missing (a half-created or half-deleted cluster: delete it with dask-hetzner nuke)"
            )
        self.ssh_key_id = found.ssh_keys[0]
        self.network_id = found.networks[0]
        self.firewall_id = found.firewalls[0]
        by_id = {s.id: s.name for s in found.servers}
        self._groups = [
            _Group(gid, {by_id[i] for i in found.group_servers.get(gid, []) if i in by_id})
            for gid in sorted(found.placement_groups)
        ]

    async def group_for(self, server_name: str) -> int:
        """A spread placement group with room for one more server (a new one when all are full)."""
        async with self._group_lock:
            for group in self._groups:
                if not group.full and len(group.members) < PLACEMENT_GROUP_SIZE:
                    group.members.add(server_name)
                    return group.id
            group_id = await self.cloud.create_placement_group(
                f"{self.settings.name}-{len(self._groups)}", self._labels
            )
            self._groups.append(_Group(group_id, {server_name}))
            return group_id

    def release(self, server_name: str) -> None:
        for group in self._groups:
            group.members.discard(server_name)

    def mark_full(self, group_id: int) -> None:
        for group in self._groups:
            if group.id == group_id:
                group.full = True
