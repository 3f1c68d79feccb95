"""What the nodes of one cluster share: the API, keys, network, firewall, placement groups.

It also owns provisioning that starts ahead of ``SpecCluster``: the initial workers'
servers are created and bootstrapped while the scheduler starts, and a ``WorkerServer``
takes its ready server from here instead of waiting for its own.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from . import gcfreeze, remote
from .cloud import (
    LABEL_CLUSTER,
    LABEL_ROLE,
    LABEL_WORKER,
    ActionFailed,
    Cloud,
    CloudError,
    ConfigError,
    ServerInfo,
    ServerWatcher,
    selector,
)
from .config import START_TIMEOUTS
from .idle import IdleSettings
from .security import ClusterCA, SSHKeyPair, TLSCert
from .state import ClusterState

logger = logging.getLogger(__name__)

PLACEMENT_GROUP_SIZE = 10  # Hetzner's limit for a spread group
# Hetzner's limit for one network; every server of a cluster is in its private network, and
# workers exchange data with each other over it, so the scheduler and 99 workers at most.
SERVERS_PER_NETWORK = 100
MAX_WORKERS = SERVERS_PER_NETWORK - 1


@dataclass
class _Group:
    id: int
    members: set[str] = field(default_factory=set)
    full: bool = False


class ClusterContext:
    def __init__(
        self,
        *,
        name: str,
        cloud: Cloud,
        location: str,
        fallback_locations: list[str],
        image: str,
        scheduler_type: str,
        worker_type: str,
        connect: str,
        allowed_cidrs: list[str],
        network_ip_range: str,
        ssh_port: int,
        scheduler_port: int,
        dashboard_port: int,
        timeouts: dict[str, float],
        versions: dict[str, str],
        bootstrap_scripts: dict[str, str],
        ssh_key: SSHKeyPair,
        ca: ClusterCA,
        client_cert: TLSCert,
        progress: Callable[[str, str], None] | None = None,
    ) -> None:
        self.name = name
        self.cloud = cloud
        self.location = location
        self.fallback_locations = fallback_locations
        self.image = image
        self.scheduler_type = scheduler_type
        self.worker_type = worker_type
        self.connect = connect
        self.allowed_cidrs = allowed_cidrs
        self.network_ip_range = network_ip_range
        self.ssh_port = ssh_port
        self.scheduler_port = scheduler_port
        self.dashboard_port = dashboard_port
        self.timeouts = timeouts
        self.versions = versions
        self.bootstrap_scripts = bootstrap_scripts
        self.ssh_key = ssh_key
        self.ca = ca
        self.client_cert = client_cert
        self.progress = progress
        self.watcher = ServerWatcher(cloud, selector(name), cloud.poll_interval)
        self.host_keys: dict[str, str] = {}  # server name -> pinned public host key
        self.servers: dict[str, ServerInfo] = {}  # server name -> what the API said
        self.ssh_key_id: int | None = None
        self.network_id: int | None = None
        self.firewall_id: int | None = None
        self._groups: list[_Group] = []
        self._group_lock = asyncio.Lock()
        self._sold_out: set[tuple[str, str]] = set()  # (server type, location) that said 412
        self._provisioning: dict[str, asyncio.Task[Any]] = {}
        # Servers whose delete was sent: a new server of the same name (a lost worker's
        # successor) must wait for them, not adopt them after a 409.
        self._deleted: set[int] = set()
        self._confirming: set[asyncio.Future[None]] = set()  # deletions confirmed in the background
        # Set when the whole cluster is being closed: nodes skip what teardown does for all.
        self.closing = False
        # Where workers reach the scheduler (tls://private-ip:port), once known.
        self.scheduler_private: str | None = None
        self._scheduler_known: asyncio.Event | None = None
        # The scheduler's server while it is provisioned: its private IP is the address.
        self.scheduler_reached: Reached | None = None
        self.dashboard_link: str | None = None
        # Set by the cluster: the local state directory that pins follow as servers come and go.
        self.state: ClusterState | None = None
        # Set by the cluster when idle_timeout is on: the scheduler's server gets the token.
        self.idle: IdleSettings | None = None

    async def ssh(
        self,
        host: str,
        host_key: str,
        *,
        retry_for: float | None = None,
        probe_interval: float | None = None,
    ) -> remote.Remote:
        """Log in as root with the cluster's key, trusting only the pinned host key."""
        return await remote.connect(
            host,
            port=self.ssh_port,
            client_key=self.ssh_key.private_openssh,
            host_key=host_key,
            timeout=30.0,
            retry_until=self.timeouts["ssh"] if retry_for is None else retry_for,
            probe_interval=probe_interval,
        )

    @property
    def start_timeout(self) -> float:
        """The bound on a node's whole start: the sum of its phases' timeouts."""
        return sum(self.timeouts[k] for k in START_TIMEOUTS)

    # The scheduler's address, for workers ---------------------------------------------------

    def _known(self) -> asyncio.Event:
        if self._scheduler_known is None:  # made in the loop: the context is made outside it
            self._scheduler_known = asyncio.Event()
        return self._scheduler_known

    def set_scheduler_address(self, address: str) -> None:
        self.scheduler_private = address
        self._known().set()

    async def wait_scheduler_address(self, waiter: str) -> str:
        """The scheduler's private address; bounded by the scheduler's own start."""
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Python 3.11's wait_for can swallow a cancellation that raced its inner future;
            # a provision cancelled so must not go on to wait for a scheduler that never comes.
            raise asyncio.CancelledError(f"{waiter}: cancelled")
        timeout = self.start_timeout
        if not self._known().is_set() and self.scheduler_reached is not None:
            # A worker is ready for it: the scheduler's private IP is needed now.
            self.scheduler_reached.hurry()
        try:
            await asyncio.wait_for(self._known().wait(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"{waiter}: the scheduler's address was not known within {timeout:.0f} s"
            ) from None
        assert self.scheduler_private is not None
        return self.scheduler_private

    # Host keys, in memory and in the local state ---------------------------------------------

    async def pin_host_key(self, server: ServerInfo, public_key: str) -> None:
        self.host_keys[server.name] = public_key
        if self.state is not None:
            # Off the loop: an fsync'ed write per server.
            await asyncio.to_thread(self.state.pin_host_key, server.name, server.id, public_key)

    async def forget_host_key(self, server: ServerInfo) -> None:
        if self.state is not None:
            await asyncio.to_thread(self.state.forget_host_key, server.name, server.id)

    async def adopt(self, found: Any) -> None:
        """Reattaching: take over the shared resources and servers the API lists (``found``)."""
        if not (found.ssh_keys and found.networks and found.firewalls):
            raise CloudError(
                f"reattaching to cluster {self.name}: its SSH key, network or firewall is missing "
                "(a half-created or half-deleted cluster: delete it with dask-hetzner nuke)"
            )
        self.ssh_key_id = found.ssh_keys[0]
        self.network_id = found.networks[0]
        self.firewall_id = found.firewalls[0]
        by_id = {s.id: s.name for s in found.servers}
        self._groups = [
            _Group(gid, {by_id[i] for i in found.group_servers.get(gid, []) if i in by_id})
            for gid in sorted(found.placement_groups)
        ]
        for server in found.servers:
            self.servers[server.name] = server

    # Progress -----------------------------------------------------------------------------

    def report(self, node: str, phase: str) -> None:
        logger.info("%s %s: %s", self.name, node, phase)
        if self.progress is not None:
            self.progress(node, phase)

    def labels(self, role: str) -> dict[str, str]:
        return {LABEL_CLUSTER: self.name, LABEL_ROLE: role}

    # Shared resources ---------------------------------------------------------------------

    def firewall_rules(self) -> list[dict[str, Any]]:
        """Only SSH (and ICMP) from allowed_cidrs; the scheduler port too with connect=public."""
        rules = [
            {
                "direction": "in",
                "protocol": "tcp",
                "port": str(self.ssh_port),
                "source_ips": list(self.allowed_cidrs),
                "destination_ips": [],
                "description": "ssh",
            },
            {
                "direction": "in",
                "protocol": "icmp",
                "port": None,
                "source_ips": list(self.allowed_cidrs),
                "destination_ips": [],
                "description": "icmp",
            },
        ]
        if self.connect == "public":
            rules.append(
                {
                    "direction": "in",
                    "protocol": "tcp",
                    "port": str(self.scheduler_port),
                    "source_ips": list(self.allowed_cidrs),
                    "destination_ips": [],
                    "description": "dask scheduler (TLS)",
                }
            )
        return rules

    async def setup(self) -> None:
        """Create the SSH key, network and firewall, in parallel."""
        zone = (await self.cloud.locations())[self.location].network_zone
        net = ipaddress.ip_network(self.network_ip_range)
        subnet = next(net.subnets(new_prefix=max(net.prefixlen, 24)))
        shared = self.labels("shared")

        async def key() -> None:
            self.ssh_key_id = await self.cloud.create_ssh_key(
                f"{self.name}", self.ssh_key.public_openssh, shared
            )

        async def network() -> None:
            self.network_id = await self.cloud.create_network(
                f"{self.name}", str(net), str(subnet), zone, shared
            )

        async def firewall() -> None:
            self.firewall_id = await self.cloud.create_firewall(
                f"{self.name}", self.firewall_rules(), shared
            )

        await asyncio.gather(key(), network(), firewall())

    async def _group_for(self, server_name: str) -> int:
        async with self._group_lock:
            for group in self._groups:
                if not group.full and len(group.members) < PLACEMENT_GROUP_SIZE:
                    group.members.add(server_name)
                    return group.id
            group_id = await self.cloud.create_placement_group(
                f"{self.name}-{len(self._groups)}", self.labels("shared")
            )
            self._groups.append(_Group(group_id, {server_name}))
            return group_id

    def _release_group(self, server_name: str) -> None:
        for group in self._groups:
            group.members.discard(server_name)

    # Servers ------------------------------------------------------------------------------

    async def create_server(
        self, *, name: str, server_type: str, user_data: str, labels: dict[str, str]
    ) -> ServerInfo:
        assert self.ssh_key_id and self.network_id and self.firewall_id
        preferred = [self.location] + [x for x in self.fallback_locations if x != self.location]
        # A type sold out in a location stays so for a while: later servers go elsewhere first.
        locations = [x for x in preferred if (server_type, x) not in self._sold_out]
        locations += [x for x in preferred if x not in locations]
        last: CloudError | None = None
        for location in locations:
            for _ in range(3):
                group = await self._group_for(name)
                try:
                    server = await self.cloud.create_server(
                        name=name,
                        server_type=server_type,
                        image=self.image,
                        location=location,
                        ssh_key_id=self.ssh_key_id,
                        network_id=self.network_id,
                        firewall_id=self.firewall_id,
                        placement_group_id=group,
                        user_data=user_data,
                        labels=labels,
                    )
                except CloudError as e:
                    self._release_group(name)
                    if e.code == "placement_error":
                        # Full (or out of spread capacity): next time use another group.
                        for g in self._groups:
                            if g.id == group:
                                g.full = True
                        last = e
                        continue
                    if e.code == "resource_unavailable":
                        self._sold_out.add((server_type, location))
                        last = e
                        break
                    raise
                except BaseException:
                    self._release_group(name)
                    raise
                self._sold_out.discard((server_type, location))
                self.servers[server.name] = server
                return server
        assert last is not None
        if last.code == "resource_unavailable":
            tried = ", ".join(locations)
            hint = "" if self.fallback_locations else " (set fallback_locations to try others)"
            raise CloudError(
                f"creating server {name}: server type {server_type} is unavailable in {tried}{hint}",
                last.code,
                last.api_message,
            )
        raise last

    async def create_reachable_server(
        self,
        *,
        name: str,
        server_type: str,
        user_data: str,
        labels: dict[str, str],
        host_key: str,
        on_created: Callable[[ServerInfo], Awaitable[None]] | None = None,
    ) -> Reached:
        """Create a server and log in over SSH once it is up; on any failure delete it.

        SSH is tried from the moment the API answers the create: the server is up when its
        sshd answers, whatever the last status poll said, so no poll is on the way to it.
        The watcher only confirms the server lazily (it catches a failed create, and brings
        the private IP, which the API shows once attach_to_network has finished).

        A create action that ends in error leaves a server that will never run (README
        fault 5): it is deleted and the server created once more before giving up.
        ``on_created`` runs once the API has answered the create (pins, progress).
        """
        for attempt in (1, 2):
            server = await self.create_server(
                name=name, server_type=server_type, user_data=user_data, labels=labels
            )
            while server.id in self._deleted:
                # "Adopted" the predecessor being deleted: let it go, then create anew.
                await self.watcher.wait_gone(
                    server.id, timeout=self.timeouts["close"], worker=labels.get(LABEL_WORKER)
                )
                server = await self.create_server(
                    name=name, server_type=server_type, user_data=user_data, labels=labels
                )
            what = f"creating server {name} ({server_type} in {server.location})"
            located = asyncio.ensure_future(
                self.watcher.wait(
                    server.id,
                    {"running"},
                    timeout=self.timeouts["server-create"],
                    what=what,
                    action_id=server.action_id,
                    worker=server.labels.get(LABEL_WORKER),
                    lazy=True,
                    private_ip=True,
                )
            )
            try:
                if on_created is not None:
                    await on_created(server)
                conn = await self._reach(server, host_key, located)
                return Reached(server, conn, located, self.watcher)
            except ActionFailed as e:
                # Shielded: a Ctrl-C now must not leave the broken server behind.
                await asyncio.shield(self.delete_server(server, wait=True))
                if attempt == 2:
                    raise ActionFailed(
                        what, e.code, f"{e.api_message}; its create action failed twice"
                    ) from None
                logger.warning("%s: create action failed (%s); trying a new server", what, e.code)
            except BaseException:
                await _cancelled(located)
                await asyncio.shield(self.delete_server(server, wait=True))
                raise
        raise AssertionError("unreachable")

    async def _reach(
        self, server: ServerInfo, host_key: str, located: asyncio.Future[ServerInfo]
    ) -> remote.Remote:
        """SSH to a server being created; bounded by server-create, then ssh once it runs."""
        assert server.public_ip, f"server {server.name} has no public IPv4"
        ssh_timeout = self.timeouts["ssh"]
        login = asyncio.ensure_future(
            self.ssh(
                server.public_ip,
                host_key,
                retry_for=self.timeouts["server-create"] + ssh_timeout,
                probe_interval=self.watcher.interval,
            )
        )
        where = f"server {server.name} ({server.location})"  # not only its address
        try:
            await asyncio.wait({login, located}, return_when=asyncio.FIRST_COMPLETED)
            if not login.done():
                located.result()  # the create failed (or timed out): raise that
                # It runs: from now on, SSH has its own bound.
                try:
                    await asyncio.wait_for(asyncio.shield(login), ssh_timeout)
                except asyncio.TimeoutError:
                    raise remote.SSHTimeout(
                        f"{where}: SSH on {server.public_ip}:{self.ssh_port} not reachable after "
                        f"{ssh_timeout:g} s of running"
                    ) from None
            try:
                return login.result()
            except remote.SSHTimeout as e:
                raise remote.SSHTimeout(f"{where}: {e}") from e
        finally:
            if not login.done():
                await _cancelled(login)

    async def delete_server(self, server: ServerInfo, *, wait: bool = True) -> None:
        self._deleted.add(server.id)
        self._release_group(server.name)
        self.servers.pop(server.name, None)
        await self.cloud.delete_server(server.id)
        await self.forget_host_key(server)
        if wait:
            await self.watcher.wait_gone(
                server.id, timeout=self.timeouts["close"], worker=server.labels.get(LABEL_WORKER)
            )
        elif not self.closing:
            # Nobody waits for it (a retired worker): a lazy poll still sees it go.
            task = asyncio.ensure_future(self._confirm_gone(server))
            self._confirming.add(task)
            task.add_done_callback(self._confirming.discard)

    async def _confirm_gone(self, server: ServerInfo) -> None:
        worker = server.labels.get(LABEL_WORKER)
        timeout = self.timeouts["close"]
        try:
            await self.watcher.wait_gone(server.id, timeout=timeout, worker=worker, lazy=True)
        except TimeoutError:
            # A delete action that failed: the server would be billed until the cluster closes.
            logger.warning("server %s still exists %.0f s after its delete: deleting it again", server.name, timeout)
            await self.cloud.delete_server(server.id)
        except Exception as e:
            logger.warning("confirming the deletion of server %s: %s", server.name, e)

    # Provisioning ahead of SpecCluster ------------------------------------------------------

    def prestart(self, name: str, role: str, options: dict[str, Any]) -> None:
        """Begin provisioning ``name`` now (a worker's process starts with ``options``)."""
        from .nodes import provision

        if name not in self._provisioning:
            task = asyncio.ensure_future(provision(self, name, role, options))
            # Full collections meanwhile walk only new objects (see gcfreeze).
            gcfreeze.HEAP.hold()
            task.add_done_callback(lambda _: gcfreeze.HEAP.release())
            self._provisioning[name] = task

    async def take_or_provision(self, name: str, role: str, options: dict[str, Any]) -> Any:
        self.prestart(name, role, options)
        task = self._provisioning[name]
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._provisioning.pop(name, None)

    async def cancel_provision(self, name: str) -> None:
        task = self._provisioning.pop(name, None)
        if task is None:
            return
        task.cancel()
        try:
            prepared = await task
        except BaseException:
            return  # provision() deletes its own server when it fails or is cancelled
        # It finished just before the cancel arrived.
        await prepared.conn.close()
        await self.delete_server(prepared.server, wait=True)

    async def cancel_all(self) -> None:
        await asyncio.gather(
            *(self.cancel_provision(n) for n in list(self._provisioning)), return_exceptions=True
        )

    async def teardown(self) -> None:
        """Delete everything carrying this cluster's label and wait until the API confirms."""
        await self.cancel_all()
        for task in list(self._confirming):
            await _cancelled(task)  # the listing below covers them
        self.watcher.stop()
        await self.cloud.delete_cluster(self.name, timeout=self.timeouts["close"])
        self.servers.clear()

    async def hourly_cost(self) -> float:
        types = await self.cloud.server_types()
        return sum(
            types[s.server_type].hourly.get(s.location, 0.0)
            for s in self.servers.values()
            if s.server_type in types
        )


@dataclass
class Reached:
    """A server being created whose SSH login worked (see ``create_reachable_server``)."""

    server: ServerInfo  # as the create answered: no private IP yet
    conn: remote.Remote
    _located: asyncio.Future[ServerInfo]
    _watcher: ServerWatcher

    async def located(self, *, hurry: bool = True) -> ServerInfo:
        """The API's view of it, running and with its private IP; with ``hurry``, a lazy
        poll that has not brought it yet is asked for now."""
        if hurry:
            self.hurry()
        return await asyncio.shield(self._located)

    def hurry(self) -> None:
        if not self._located.done():
            self._watcher.hurry(self.server.id)

    async def abandon(self) -> None:
        await _cancelled(self._located)


async def _cancelled(fut: asyncio.Future[Any]) -> None:
    """Cancel ``fut`` and wait for it, whatever it ends with."""
    fut.cancel()
    try:
        await fut
    except BaseException as e:
        if isinstance(e, asyncio.CancelledError) and not fut.cancelled():
            raise  # not its cancellation: ours
        # Its own failure or cancellation: nobody waits for it any more.


def check_same_zone(locations: dict[str, Any], location: str, fallbacks: list[str]) -> None:
    zone = locations[location].network_zone
    for other in fallbacks:
        if other not in locations:
            raise ConfigError(
                f"unknown fallback location {other!r}; valid locations: {', '.join(sorted(locations))}"
            )
        if locations[other].network_zone != zone:
            raise ConfigError(
                f"fallback location {other} is in network zone {locations[other].network_zone}, "
                f"but {location} is in {zone}: one private network cannot span them"
            )
