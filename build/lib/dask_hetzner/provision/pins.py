"""Pinned host keys: in memory for this process, and in the local state for every other."""

from __future__ import annotations

import asyncio

from ..cloud import ServerInfo
from ..state import ClusterState


class HostKeyPins:
    """Server name -> the public host key made for it (no trust on first use)."""

    def __init__(self) -> None:
        self.keys: dict[str, str] = {}
        # The local state directory that pins follow as servers come and go; None until the
        # cluster has written it (or while reattaching, until adopted).
        self.state: ClusterState | None = None

    def follow(self, state: ClusterState | None) -> None:
        """Pins follow servers in ``state`` from now on (None: no longer, it was removed)."""
        self.state = state

    def get(self, server_name: str) -> str | None:
        return self.keys.get(server_name)

    def update(self, keys: dict[str, str]) -> None:
        self.keys.update(keys)

    async def pin(self, server: ServerInfo, public_key: str) -> None:
        self.keys[server.name] = public_key
        if self.state is not None:
            # Off the loop: an fsync'ed write per server.
            await asyncio.to_thread(self.state.pin_host_key, server.name, server.id, public_key)

    async def forget(self, server: ServerInfo) -> None:
        if self.state is not None:
            # Only for the same server id: a successor of the same name keeps its own pin.
            await asyncio.to_thread(self.state.forget_host_key, server.name, server.id)
