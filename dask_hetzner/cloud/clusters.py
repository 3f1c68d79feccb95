"""Finding and deleting by label: a cluster's servers and resources, every cluster of a project.

A cluster is what carries its ``dask-hetzner/cluster`` label, never what has its name as a
prefix. Deleting is safe on a half-created cluster and idempotent.
"""

from __future__ import annotations

import asyncio
import time

from .errors import CloudError
from .model import LABEL_CLUSTER, NOUN, ClusterResources, Kind, ResourceInfo, ServerInfo, owned
from .retry import Retry

# Each shared kind: how listing it is named in messages, and its list in ClusterResources.
_SHARED: dict[Kind, tuple[str, str]] = {
    "network": ("networks", "networks"),
    "firewall": ("firewalls", "firewalls"),
    "placement_group": ("placement groups", "placement_groups"),
    "ssh_key": ("SSH keys", "ssh_keys"),
    "snapshot": ("snapshots", "images"),
}


def _add(found: ClusterResources, kind: Kind, resource: ResourceInfo) -> None:
    getattr(found, _SHARED[kind][1]).append(resource.id)
    if kind == "placement_group":
        found.group_servers[resource.id] = list(resource.servers)


class Clusters:
    def __init__(self, retry: Retry, poll_interval: float) -> None:
        self.retry = retry
        self.sdk = retry.sdk
        self.poll_interval = poll_interval

    async def servers(self, label_selector: str) -> list[ServerInfo]:
        return await self.retry.call(
            f"listing servers ({label_selector})", self.sdk.servers, label_selector
        )

    async def update_server(self, server_id: int, name: str, labels: dict[str, str]) -> ServerInfo:
        return await self.retry.call(f"renaming server {server_id} to {name}", self.sdk.update_server, server_id, name, labels)

    async def delete_server(self, server_id: int) -> None:
        """Delete one server; a server that is already gone is fine."""
        try:
            await self.retry.call(f"deleting server {server_id}", self.sdk.delete_server, server_id)
        except CloudError as e:
            if e.code != "not_found":
                raise

    async def _shared(self, label_selector: str) -> dict[Kind, list[ResourceInfo]]:
        """The resources besides servers that ``label_selector`` selects, by kind."""
        lists = await asyncio.gather(
            *(
                self.retry.call(f"listing {plural}", self.sdk.resources, kind, label_selector)
                for kind, (plural, _) in _SHARED.items()
            )
        )
        return dict(zip(_SHARED, lists, strict=True))

    async def cluster_resources(self, cluster: str, start: str | None = None) -> ClusterResources:
        sel = owned(cluster, start)
        servers, shared = await asyncio.gather(self.servers(sel), self._shared(sel))
        found = ClusterResources(servers=servers)
        for server in servers:
            found.saw_created(server.created)
        for kind, resources in shared.items():
            for resource in resources:
                _add(found, kind, resource)
                found.saw_created(resource.created)
        return found

    async def all_clusters(self) -> dict[str, ClusterResources]:
        """Every cluster of the project, by the cluster label (never by name prefix)."""
        sel = LABEL_CLUSTER
        servers, shared = await asyncio.gather(
            self.retry.call("listing servers", self.sdk.servers, sel), self._shared(sel)
        )
        out: dict[str, ClusterResources] = {}
        for server in servers:
            found = out.setdefault(server.labels[LABEL_CLUSTER], ClusterResources())
            found.servers.append(server)
            found.saw_created(server.created)
        for kind, resources in shared.items():
            for resource in resources:
                found = out.setdefault(resource.labels[LABEL_CLUSTER], ClusterResources())
                _add(found, kind, resource)
                found.saw_created(resource.created)
        return out

    async def delete_cluster(
        self, cluster: str, *, timeout: float, start: str | None = None
    ) -> ClusterResources:
        """Delete everything labelled with ``cluster`` (and ``start``, when given: a rollback
        never touches what a concurrent start of the same name made), servers first, and wait
        until it is gone.

        Safe on a half-created cluster and idempotent; returns what was found. Every delete
        runs in parallel, so the time does not grow with the number of servers.
        """
        deadline = time.monotonic() + timeout
        # A create still in flight (its caller was cancelled) must land before the listing.
        await self.sdk.drain(min(timeout, self.sdk.request_timeout + 5))
        found = await self.cluster_resources(cluster, start)
        todo = found
        while True:
            await self._delete_found(owned(cluster, start), todo, deadline)
            # Only a listing after the deletes proves nothing was created meanwhile.
            todo = await self.cluster_resources(cluster, start)
            if not len(todo):
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"deleting cluster {cluster}: {len(todo)} resources still exist after "
                    f"{timeout:.0f} s (servers: {', '.join(s.name for s in todo.servers) or 'none'})"
                )
            for key in ("servers", "networks", "firewalls", "placement_groups", "ssh_keys", "images"):
                getattr(found, key).extend(getattr(todo, key))

    async def _delete_found(self, sel: str, found: ClusterResources, deadline: float) -> None:
        # A server already "deleting" (its node asked) needs no second request.
        await asyncio.gather(
            *(self.delete_server(s.id) for s in found.servers if s.status != "deleting")
        )
        if found.servers:
            await self.wait_servers_gone(sel, deadline=deadline)
        # Detaching lags behind server deletion: resource_in_use is retried until the deadline.
        kinds: tuple[Kind, ...] = ("firewall", "placement_group", "ssh_key", "snapshot")
        await asyncio.gather(
            *(
                self._delete_until(kind, i, deadline)
                for kind in kinds
                for i in getattr(found, _SHARED[kind][1])
            )
        )
        # A network can only go once its firewalls' servers have left it.
        await asyncio.gather(*(self._delete_until("network", i, deadline) for i in found.networks))

    async def _delete_until(self, kind: Kind, resource_id: int, deadline: float) -> None:
        attempt = 0
        while True:
            try:
                await self.retry.call(
                    f"deleting {NOUN[kind]} {resource_id}", self.sdk.delete, kind, resource_id
                )
                return
            except CloudError as e:
                if e.code == "not_found":
                    return
                if e.code != "resource_in_use" or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(
                min(self.retry.backoff(attempt), max(0.0, deadline - time.monotonic()))
            )
            attempt += 1

    async def wait_servers_gone(self, label_selector: str, *, deadline: float) -> None:
        # A delete action takes 2 to 6 s: every interval for that long (close() returns as
        # soon as they are gone), then less and less often (a list of 100 servers costs 2).
        interval = self.poll_interval
        began = time.monotonic()
        while True:
            left = await self.servers(label_selector)
            if not left:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"servers {', '.join(s.name for s in left)} still exist after deletion "
                    f"was requested ({label_selector})"
                )
            await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
            if time.monotonic() - began > 6 * self.poll_interval:
                interval = min(interval * 1.5, 5 * self.poll_interval)
