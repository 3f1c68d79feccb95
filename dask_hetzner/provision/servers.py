"""Creating one server, reaching it over SSH, and deleting it again.

A server is up when its sshd answers with the pinned host key, whatever the last status
poll said: SSH is tried from the moment the API answers the create. One lazy poller for
the whole cluster (``ServerWatcher``) only confirms servers: it catches a failed create and
brings the private IP, which the API shows once ``attach_to_network`` has finished.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import config, remote
from ..aio import cancelled
from ..bill import Bill
from ..cloud import (
    LABEL_ROLE,
    LABEL_WORKER,
    ActionFailed,
    Cloud,
    CloudError,
    NewServer,
    ServerInfo,
    ServerWatcher,
)
from ..cloud.preferences import Skipped, candidates
from ..settings import ClusterSettings
from .limits import WHERE_TO_RAISE, ServerLimitReached, is_limit
from .pins import HostKeyPins
from .shared import SharedResources

logger = logging.getLogger(__name__)


# A fresh server whose SSH host key is not the one its cloud-config pinned.
CLOUD_INIT_FAILED = (
    "its SSH host key is not the one its user data pinned: cloud-init did not apply the user "
    "data on first boot (docs/troubleshooting.md, 'cloud-init did not apply')"
)


def group_full(e: CloudError) -> bool:
    """A spread placement group that holds 10 servers already: ``placement_group_member_limit_reached``
    today, ``service_error`` before (terraform-provider-hcloud #1170), ``placement_error`` for a
    spread placement that cannot be met (docs/simulator.md, "Deliberate behaviours")."""
    if e.code in ("placement_group_member_limit_reached", "placement_error"):
        return True
    return e.code == "service_error" and "placement group" in e.api_message


def not_offered(e: CloudError) -> bool:
    """Hetzner's 422 for a type that location does not sell at all (not a sold-out 412)."""
    return e.code == "invalid_input" and "unsupported location" in e.api_message


class Login:
    """Log in as root with the cluster's key, trusting only the pinned host key."""

    def __init__(self, port: int, private_key: str, ssh_timeout: float) -> None:
        self.port = port
        self._private_key = private_key
        self._ssh_timeout = ssh_timeout

    def __repr__(self) -> str:  # never the key
        return f"<Login root@*:{self.port}>"

    async def __call__(
        self,
        host: str,
        host_key: str,
        *,
        retry_for: float | None = None,
        probe_interval: float | None = None,
        seen: dict[str, str] | None = None,
    ) -> remote.Remote:
        return await remote.connect(
            host,
            port=self.port,
            client_key=self._private_key,
            host_key=host_key,
            # One attempt: a healthy sshd logs in within a second or two; a connection that
            # was accepted but stalls (a half-started sshd) is better dropped and retried
            # within the ssh bound than waited out beyond it.
            timeout=min(30.0, max(5.0, self._ssh_timeout / 3)),
            retry_until=self._ssh_timeout if retry_for is None else retry_for,
            probe_interval=probe_interval,
            seen=seen,
        )


@dataclass
class Reached:
    """A server being created whose SSH login worked (see ``ServerFactory.create_reachable``)."""

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
        await cancelled(self._located)


class ServerFactory:
    """Creates, reaches and deletes this cluster's servers; knows which exist."""

    def __init__(
        self,
        cloud: Cloud,
        settings: ClusterSettings,
        shared: SharedResources,
        watcher: ServerWatcher,
        pins: HostKeyPins,
        login: Login,
    ) -> None:
        self.cloud = cloud
        self.settings = settings
        self.shared = shared
        self.watcher = watcher
        self.pins = pins
        self.login = login
        self.servers: dict[str, ServerInfo] = {}  # server name -> what the API said last
        self._sold_out: set[tuple[str, str]] = set()  # (server type, location) that said 412
        # Servers whose delete was sent: a new server of the same name (a lost worker's
        # successor) must wait for them, not adopt them after a 409.
        self._deleted: set[int] = set()
        self._confirming: set[asyncio.Future[None]] = set()  # deletions confirmed in the background
        # The whole cluster is being deleted: retired servers need no confirmation one by one.
        self.closing = False
        # The account's server limit struck (the first such error), and when.
        self.limit_hit: ServerLimitReached | None = None
        self.limit_event = asyncio.Event()
        self.scheduler_recorded = asyncio.Event()  # its server exists (allow-fewer-workers)
        self.bill = Bill(config.seconds("billing-hour"))  # every server created, deleted ones too

    def begin_closing(self) -> None:
        """The whole cluster is being deleted: teardown confirms every deletion at once."""
        self.closing = True

    def record(self, server: ServerInfo) -> None:
        """The API's latest view of one of this cluster's servers."""
        self.servers[server.name] = server
        if server.labels.get(LABEL_ROLE) == "scheduler":
            self.scheduler_recorded.set()

    async def create(
        self, *, name: str, server_types: Sequence[str], user_data: str, labels: dict[str, str]
    ) -> ServerInfo:
        """POST one server: the first type of the list that can be had, in the location, else
        a same-zone fallback (``preferences.candidates``); a new placement group when one is full."""
        assert self.shared.ready, "the shared resources are not created yet"
        catalog = await self.cloud.server_types()
        pairs, skipped = candidates(catalog, server_types, self.settings.locations, self._sold_out)
        refused: list[str] = []
        last: CloudError | None = None
        for server_type, location in pairs:
            for _ in range(3):
                group = await self.shared.group_for(name)
                try:
                    server = await self._post(name, server_type, location, group, user_data, labels)
                except CloudError as e:
                    self.shared.release(name)
                    last = e
                    if group_full(e):
                        # Full (or out of spread capacity): next time use another group.
                        self.shared.mark_full(group)
                        continue
                    if e.code == "resource_unavailable" or not_offered(e):
                        # Sold out (or, the catalog being stale, not sold) here: later
                        # servers try this pair last.
                        self._sold_out.add((server_type, location))
                        why = "is not offered in" if not_offered(e) else "is unavailable in"
                        refused.append(f"server type {server_type} {why} {location}")
                        break
                    if is_limit(e):
                        raise self._limit_reached(name, e) from None
                    raise
                except BaseException:
                    self.shared.release(name)
                    raise
                self._sold_out.discard((server_type, location))
                self.record(server)
                info = catalog.get(server.server_type)
                self.bill.opened(server.id, server.name, info.billed(server.location) if info else None)
                return server
        raise self._nothing_fits(name, refused, skipped, last)

    async def _post(
        self, name: str, server_type: str, location: str, group: int, user_data: str, labels: dict[str, str]
    ) -> ServerInfo:
        shared = self.shared
        assert shared.ssh_key_id and shared.network_id and shared.firewall_id
        return await self.cloud.create_server(
            NewServer(
                name=name,
                server_type=server_type,
                image=self.settings.image,
                location=location,
                ssh_key_id=shared.ssh_key_id,
                network_id=shared.network_id,
                firewall_id=shared.firewall_id,
                placement_group_id=group,
                user_data=user_data,
                labels=labels,
            )
        )

    def _limit_reached(self, name: str, e: CloudError) -> ServerLimitReached:
        error = ServerLimitReached(
            f"creating server {name}: the Hetzner account's server limit is reached with "
            f"{len(self.servers)} servers of this cluster; {WHERE_TO_RAISE}",
            e.api_message,
            len(self.servers),
        )
        if self.limit_hit is None:
            self.limit_hit = error
            self.limit_event.set()
        return error

    def _nothing_fits(
        self, name: str, refused: list[str], skipped: list[Skipped], last: CloudError | None
    ) -> CloudError:
        """One message naming every type × location tried (412) or skipped (catalog)."""
        if last is not None and last.code != "resource_unavailable" and not not_offered(last):
            return last
        hint = "" if self.settings.fallback_locations else " (set fallback_locations to try others)"
        if last is not None and not_offered(last):
            hint += " (dask-hetzner types lists where each type is sold)"
        tried = "; ".join(refused + [f"skipped {x}" for x in skipped])
        return CloudError(
            f"creating server {name}: no server type could be had: {tried}{hint}",
            "resource_unavailable",
            last.api_message if last is not None else "nothing orderable",
        )

    async def create_reachable(
        self,
        *,
        name: str,
        server_types: Sequence[str],
        user_data: str,
        labels: dict[str, str],
        host_key: str,
        on_created: Callable[[ServerInfo], Awaitable[None]] | None = None,
    ) -> Reached:
        """Create a server and log in over SSH once it is up; on any failure delete it.

        A create action that ends in error leaves a server that will never run
        (docs/simulator.md, fault ``action_error``): it is deleted and the server created once
        more before giving up. ``on_created`` runs once the API has answered the create.
        """
        for attempt in (1, 2):
            server = await self._create_anew(name, server_types, user_data, labels)
            what = f"creating server {name} ({server.server_type} in {server.location})"
            located = asyncio.ensure_future(self._located(server, what))
            try:
                if on_created is not None:
                    await on_created(server)
                conn = await self._reach(server, host_key, located)
                return Reached(server, conn, located, self.watcher)
            except ActionFailed as e:
                # Shielded: a Ctrl-C now must not leave the broken server behind.
                await asyncio.shield(self.delete(server, wait=True))
                if attempt == 2:
                    raise ActionFailed(
                        what, e.code, f"{e.api_message}; its create action failed twice"
                    ) from None
                logger.warning("%s: create action failed (%s); trying a new server", what, e.code)
            except remote.HostKeyMismatch as e:
                # Never reached yet: not an attacker but cloud-init that did not apply the
                # user data (a first-boot crash, docs/simulator.md fault `cloud_init_fails`).
                await cancelled(located)
                await asyncio.shield(self.delete(server, wait=True))
                if attempt == 2:
                    raise remote.HostKeyMismatch(f"{what}: {CLOUD_INIT_FAILED} twice ({e})") from None
                logger.warning("%s: %s (%s); trying a new server", what, CLOUD_INIT_FAILED, e)
            except BaseException:
                await cancelled(located)
                await asyncio.shield(self.delete(server, wait=True))
                raise
        raise AssertionError("unreachable")

    async def _create_anew(
        self, name: str, server_types: Sequence[str], user_data: str, labels: dict[str, str]
    ) -> ServerInfo:
        server = await self.create(name=name, server_types=server_types, user_data=user_data, labels=labels)
        while server.id in self._deleted:
            # "Adopted" the predecessor being deleted: let it go, then create anew.
            await self.watcher.wait_gone(
                server.id, timeout=self.settings.timeouts["close"], worker=labels.get(LABEL_WORKER)
            )
            server = await self.create(name=name, server_types=server_types, user_data=user_data, labels=labels)
        return server

    def _located(self, server: ServerInfo, what: str) -> Awaitable[ServerInfo]:
        return self.watcher.wait(
            server.id,
            {"running"},
            timeout=self.settings.timeouts["server-create"],
            what=what,
            action_id=server.action_id,
            worker=server.labels.get(LABEL_WORKER),
            lazy=True,
            private_ip=True,
        )

    async def _reach(
        self, server: ServerInfo, host_key: str, located: asyncio.Future[ServerInfo]
    ) -> remote.Remote:
        """SSH to a server being created; bounded by server-create, then ssh once it runs."""
        assert server.public_ip, f"server {server.name} has no public IPv4"
        timeouts = self.settings.timeouts
        ssh_timeout = timeouts["ssh"]
        seen: dict[str, str] = {}
        login = asyncio.ensure_future(
            self.login(
                server.public_ip,
                host_key,
                retry_for=timeouts["server-create"] + ssh_timeout,
                probe_interval=self.watcher.interval,
                seen=seen,
            )
        )
        where = f"server {server.name} ({server.location})"  # not only its address
        try:
            racers: set[asyncio.Future[Any]] = {login, located}  # of different result types
            await asyncio.wait(racers, return_when=asyncio.FIRST_COMPLETED)
            if not login.done():
                located.result()  # the create failed (or timed out): raise that
                # It runs: from now on, SSH has its own bound.
                try:
                    await asyncio.wait_for(asyncio.shield(login), ssh_timeout)
                except asyncio.TimeoutError:
                    raise remote.SSHTimeout(
                        f"{where}: SSH on {server.public_ip}:{self.login.port} not reachable after "
                        f"{ssh_timeout:g} s of running (last: {seen.get('last', 'no attempt ended')})"
                    ) from None
            try:
                return login.result()
            except remote.SSHTimeout as e:
                raise remote.SSHTimeout(f"{where}: {e}") from e
        finally:
            if not login.done():
                await cancelled(login)

    async def delete(self, server: ServerInfo, *, wait: bool = True) -> None:
        self._deleted.add(server.id)
        self.servers.pop(server.name, None)
        await self.cloud.delete_server(server.id)
        self.bill.closed(server.id)
        await self.pins.forget(server)
        if wait:
            await self.watcher.wait_gone(
                server.id, timeout=self.settings.timeouts["close"], worker=server.labels.get(LABEL_WORKER)
            )
            self._release(server)
        elif not self.closing:
            # Nobody waits for it (a retired worker): a lazy poll still sees it go.
            task = asyncio.ensure_future(self._confirm_gone(server))
            self._confirming.add(task)
            task.add_done_callback(self._confirming.discard)

    async def _confirm_gone(self, server: ServerInfo) -> None:
        worker = server.labels.get(LABEL_WORKER)
        timeout = self.settings.timeouts["close"]
        try:
            await self.watcher.wait_gone(server.id, timeout=timeout, worker=worker, lazy=True)
            self._release(server)
        except TimeoutError:
            # A delete action that failed: the server would be billed until the cluster closes.
            logger.warning("server %s still exists %.0f s after its delete: deleting it again", server.name, timeout)
            await self.cloud.delete_server(server.id)
        except Exception as e:
            logger.warning("confirming the deletion of server %s: %s", server.name, e)

    def _release(self, server: ServerInfo) -> None:
        # Its placement group's slot frees only once the API confirms it is gone (a deleted
        # server still counts: placement_group_member_limit_reached); not a successor's slot.
        if server.name not in self.servers:
            self.shared.release(server.name)

    def forget_all(self) -> None:
        """Teardown confirmed that every server of the cluster is gone."""
        self.servers.clear()
        self.bill.close_all()

    async def stop_confirming(self) -> None:
        """Teardown lists and deletes everything anyway: the background confirmations stop."""
        for task in list(self._confirming):
            await cancelled(task)
