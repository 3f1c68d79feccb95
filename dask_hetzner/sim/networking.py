"""The network side of one HostManager: each server's namespace, addresses and firewall.

Started at the first boot (``netns.Network``: the hub and this machine's link); per server a
namespace from its first boot to its deletion (``netns.Holder``, ``egress.Egress``), its
addresses at every boot and the firewall rules the API gives (``firewall.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from typing import Any

from . import firewall
from .egress import Egress
from .host import Host
from .netns import Holder, Network
from .store.addresses import AddressPool

log = logging.getLogger(__name__)

Rules = list[dict[str, Any]] | None  # a server's firewall rules; None: no firewall applies


class Networking:
    def __init__(self, wanted: bool) -> None:
        self._network: asyncio.Future[Network | None] | None = None
        self._pool: AddressPool | None = None
        self._client_ip: str | None = None
        if wanted and os.geteuid() == 0:
            # Claimed now, so the client's address is known before the first boot.
            self._pool = AddressPool("client", range(1, 64))
            self._client_ip = self._pool.allocate()[0]
        self.rules: dict[int, Rules] = {}  # by server id, as the API last gave them
        self._guarded: list[str] = []

    @property
    def client_ip(self) -> str | None:
        failed = self._network is not None and self._network.done() and self._network.result() is None
        return None if failed else self._client_ip

    @property
    def started(self) -> bool:
        return self._network is not None and self._network.done() and self._network.result() is not None

    async def start(self, guarded: Sequence[str] = ()) -> bool:
        """Make the network now (else at the first boot): the client's address exists from
        here on, so the API can answer there (servers reach it, as they reach Hetzner's).
        ``guarded``: the public address blocks (``Network``)."""
        self._guarded = list(guarded)
        return await self._start() is not None

    async def connect(self, host: Host) -> None:
        """Give the server its namespace (first boot), its addresses and its firewall."""
        network = await self._start()
        if network is None:
            return
        if host.netns is None:
            netns = await Holder.start()
            egress = Egress()
            try:
                await network.attach(host.spec.server_id, netns)
                await egress.start(netns.pid)
            except BaseException:
                egress.close()
                await netns.stop()
                raise
            host.netns, host.egress = netns, egress
        await network.address(host.netns, host.spec.public_ip, host.spec.private_ips)
        await self.apply_firewall(host)

    async def apply_firewall(self, host: Host) -> None:
        """Load the server's current rules into its namespace (callers hold the host's lock)."""
        if host.netns is None:
            return
        rules = self.rules.get(host.spec.server_id)
        if rules is None and host.firewall is None:
            return  # nothing loaded, nothing to load
        await firewall.apply(host.netns.pid, host.spec.public_ip, rules)
        host.firewall = rules

    async def disconnect(self, host: Host) -> None:
        """A deleted server: its namespace, relays and route go."""
        self.rules.pop(host.spec.server_id, None)
        if host.netns is None:
            return
        netns, host.netns = host.netns, None
        if host.egress is not None:
            host.egress.close()
            host.egress = None
        await netns.stop()
        network = await self._start()
        if network is not None:
            await network.detach(host.spec.public_ip)

    async def close(self) -> None:
        network = await self._network if self._network is not None else None
        if network is not None:
            await network.close()
        if self._pool is not None:
            self._pool.close()

    async def _start(self) -> Network | None:
        # One start, however many hosts boot at once.
        if self._network is None:
            self._network = asyncio.ensure_future(self._make())
        return await asyncio.shield(self._network)

    async def _make(self) -> Network | None:
        if self._client_ip is None:
            return None
        try:
            network = Network(self._client_ip, self._guarded)
            await network.start()
        except Exception as exc:
            log.warning("simulated servers SHARE this machine's network (no namespaces): %s", exc)
            return None
        return network
