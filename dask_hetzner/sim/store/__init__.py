"""The simulated project: one module per resource kind, like hcloud-python's clients.

==================== =============================================================
``base.py``          error answers, field checks, timestamps
``addresses.py``     loopback address pools (public and private)
``actions.py``       actions and their progress; ``Core``: ids, unique names, tasks
``ssh_keys.py``      SSH keys
``networks.py``      networks, subnets, servers' attachments
``firewalls.py``     firewalls, rules, what they apply to
``placement_groups`` spread placement groups
``images.py``        system images and snapshots
``server_model.py``  the server record (and its NICs) that every kind refers to
``servers.py``       create validation and creation, removal
``lifecycle.py``     create -> start -> running, host boot, host faults
``server_actions``   delete, power, network / group actions, snapshots of a server
``views.py``         JSON of catalog parts and of servers
==================== =============================================================

``Store`` ties the kinds together for the HTTP layer (``routes.py``) and the ``Simulator``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from ..faults import FaultRule, FaultSet
from ..timing import ServerTimings, Timing
from .actions import Action, Core, Effects
from .addresses import AddressPool
from .base import ApiError, invalid_input, not_found, uniqueness_error
from .firewalls import Firewall, FirewallStore
from .images import ImageStore
from .lifecycle import Lifecycle
from .networks import Network, NetworkStore
from .placement_groups import PlacementGroup, PlacementGroupStore
from .server_actions import ServerActions
from .server_model import Server
from .servers import Created, ServerStore
from .ssh_keys import SSHKey, SSHKeyStore, fingerprint

__all__ = [
    "Action",
    "AddressPool",
    "ApiError",
    "Created",
    "Effects",
    "Firewall",
    "Network",
    "PlacementGroup",
    "SSHKey",
    "Server",
    "Store",
    "fingerprint",
    "invalid_input",
    "not_found",
    "uniqueness_error",
]


class Store:
    """Every resource kind of one simulated project; each kind's rules live in its module."""

    def __init__(
        self,
        *,
        timing: Timing,
        faults: FaultSet,
        server_limit: int | None = None,
        hosts: Any = None,
        host_spec: Callable[..., Any] | None = None,
    ):
        self.core = Core(timing=timing, faults=faults)
        self.hosts = hosts
        self.public_pool = AddressPool("public", range(64, 128))
        self.private_pool = AddressPool("private", range(128, 256))
        self.servers: dict[int, Server] = {}
        self.ssh_key_store = SSHKeyStore(self.core)
        self.network_store = NetworkStore(self.core, self.private_pool, self.servers)
        self.firewall_store = FirewallStore(self.core, self.servers)
        self.group_store = PlacementGroupStore(self.core)
        self.image_store = ImageStore(self.core)
        self.image_store.hosts = hosts
        self.server_store = ServerStore(
            self.core,
            table=self.servers,
            pool=self.public_pool,
            ssh_keys=self.ssh_key_store,
            images=self.image_store,
            networks=self.network_store,
            firewalls=self.firewall_store,
            groups=self.group_store,
            server_limit=server_limit,
        )
        self.lifecycle = Lifecycle(self.core, self.server_store, hosts, host_spec)
        self.server_actions = ServerActions(self.lifecycle)
        # The tables by kind (tests and diagnostics read them).
        self.ssh_keys = self.ssh_key_store.items
        self.networks = self.network_store.items
        self.firewalls = self.firewall_store.items
        self.placement_groups = self.group_store.items
        self.snapshots = self.image_store.snapshots
        self.actions: dict[int, Action] = self.core.actions
        self.timings: dict[int, ServerTimings] = self.server_store.timings
        self.host_errors: list[str] = self.core.host_errors
        self._firewalls_pushed: dict[int, list[dict[str, Any]] | None] = {}

    @property
    def effects(self) -> Effects | None:
        """Fault effects on the actions of the request being handled (set by the HTTP layer)."""
        return self.core.effects

    @effects.setter
    def effects(self, value: Effects | None) -> None:
        self.core.effects = value

    # -- background work -----------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        return self.core.spawn(coro)

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait until background work that can finish has finished (tests)."""
        await self.core.settle(timeout)

    async def close(self) -> None:
        await self.core.cancel_tasks()
        self.public_pool.close()
        self.private_pool.close()

    def sync_firewalls(self) -> None:
        """Hand each server's firewall rules to its host when they changed (after a change
        request): the hosts enforce them (``hosts.set_firewall``, sim/firewall.py)."""
        set_firewall = getattr(self.hosts, "set_firewall", None)
        if set_firewall is None:
            return
        for server in self.servers.values():
            applied = self.firewall_store.of(server)
            rules = [dict(r) for fw in applied for r in fw.rules] if applied else None
            if server.id not in self._firewalls_pushed or self._firewalls_pushed[server.id] != rules:
                self._firewalls_pushed[server.id] = rules
                self.spawn(set_firewall(server.id, rules))
        for gone in set(self._firewalls_pushed) - set(self.servers):
            del self._firewalls_pushed[gone]

    # -- servers -------------------------------------------------------------
    def create_server(self, body: dict[str, Any]) -> Created:
        created = self.server_store.create(body)
        self.lifecycle.begin(created)
        return created

    def server_count(self) -> int:
        return len(self.servers)

    def iter_servers(self) -> Iterator[Server]:
        return iter(list(self.servers.values()))

    def strike(self, server: Server, rule: FaultRule) -> None:
        """A host fault added while ``server`` runs strikes it too (``Simulator.inject``)."""
        if rule.kind == "processes_die":
            self.spawn(self.lifecycle.kill_later(server, rule))
        elif rule.kind == "ssh_drop":
            self.spawn(self.lifecycle.drop_ssh_later(server, rule))
        else:
            self.spawn(self.lifecycle.vanish_later(server, rule))

    # -- inventory -----------------------------------------------------------
    def lookup(self, rtype: str, rid: int) -> Any:
        """A resource by type and id (404 if absent), for per-resource action lists."""
        getter: Callable[[int], Any] = {
            "server": self.server_store.get,
            "network": self.network_store.get,
            "firewall": self.firewall_store.get,
            "image": self.image_store.get,
        }[rtype]
        return getter(rid)

    def resources(self) -> dict[str, list[dict[str, Any]]]:
        return {
            "servers": [self.server_store.to_json(s) for s in self.servers.values()],
            "ssh_keys": [k.to_json() for k in self.ssh_keys.values()],
            "networks": [n.to_json() for n in self.networks.values()],
            "firewalls": [self.firewall_store.to_json(f) for f in self.firewalls.values()],
            "placement_groups": [p.to_json() for p in self.placement_groups.values()],
            "images": [i.to_json() for i in self.snapshots.values()],
        }
