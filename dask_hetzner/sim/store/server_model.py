"""The server record every kind refers to (kept apart from ``servers.py`` so that the kinds
a server joins can name it without importing the server store)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from ..catalog import Image, Location, ServerType
from ..timing import ServerTimings
from .actions import Action
from .base import ApiError


@dataclass(eq=False)
class PrivateNic:
    ip: str
    mac: str
    alias_ips: list[str] = field(default_factory=list)
    # Hetzner lists a server's private_net only once its attach_to_network action has
    # finished: a create response has none (hcloud-go#168, "refetch the server").
    attached: bool = False
    requested_ip: str | None = None  # an explicit ``ip`` (store/networks.py maps it)


@dataclass(eq=False)
class Server:
    id: int
    name: str
    server_type: ServerType
    location: Location
    image: Image
    labels: dict[str, str]
    created: float
    host_ip: str  # the loopback address its host listens on
    ipv4: str | None  # reported public IPv4 (the same address), None if disabled
    ipv4_id: int | None
    ipv6: str | None
    ipv6_id: int | None
    user_data: str | None
    authorized_keys: list[str]
    timings: ServerTimings
    status: str = "initializing"
    private: dict[int, PrivateNic] = field(default_factory=dict)
    placement_group: int | None = None
    task: asyncio.Task[Any] | None = None  # current lifecycle / power task
    busy: Action | None = None  # the running action that locks it
    host_exists: bool = False  # hosts.boot was called at least once
    delete_action: Action | None = None


def check_unlocked(server: Server) -> None:
    """423 while the server is being deleted or a running action locks it."""
    if server.status == "deleting":
        raise ApiError(423, "locked", "server is being deleted")
    if server.busy is not None and server.busy.status == "running":
        raise ApiError(423, "locked", f"server is locked by a running {server.busy.command} action")
