"""The Hetzner Cloud API, asynchronously: the only module that imports ``hcloud``.

The official SDK is synchronous (requests), so every call runs in a private thread pool
and never on the event loop. Retries are ours, not the SDK's: it retries only a few codes,
sleeps inside its thread and ignores the rate-limit headers, while we retry every transient
fault (429, 423, 409 conflict, 5xx, timeouts) with backoff that follows ``RateLimit-*``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import requests
from hcloud import APIException, Client
from hcloud.firewalls import Firewall, FirewallRule
from hcloud.images import Image
from hcloud.locations import Location
from hcloud.networks import Network, NetworkSubnet
from hcloud.placement_groups import PlacementGroup
from hcloud.server_types import ServerType
from hcloud.servers import Server
from hcloud.ssh_keys import SSHKey

from . import __version__

logger = logging.getLogger(__name__)

T = TypeVar("T")

LABEL_CLUSTER = "dask-hetzner/cluster"
LABEL_ROLE = "dask-hetzner/role"
LABEL_WORKER = "dask-hetzner/worker"

# Faults that go away when asked again later (README "Faults that really happen").
TRANSIENT_CODES = {
    "rate_limit_exceeded",
    "locked",
    "conflict",
    "server_error",
    "unavailable",
    "bad_gateway",
    "timeout",
    "unknown_error",
    "maintenance",
}
TRANSIENT_STATUSES = {500, 502, 503, 504}


class CloudError(Exception):
    """An API call failed; the message says what was being done."""

    def __init__(self, what: str, code: str | int | None = None, message: str = "") -> None:
        self.what = what
        self.code = code
        self.api_message = message
        text = f"{what} failed"
        if code is not None:
            text += f": {code}"
        if message:
            text += f" ({message})"
        super().__init__(text)


class ConfigError(ValueError):
    """A user choice (type, location, image, token, ...) is not valid; raised before creating anything."""


def selector(cluster: str, **labels: str) -> str:
    parts = [f"{LABEL_CLUSTER}={cluster}"]
    parts += [f"{key}={value}" for key, value in labels.items()]
    return ",".join(parts)


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

    @property
    def role(self) -> str | None:
        return self.labels.get(LABEL_ROLE)


@dataclass
class ClusterResources:
    """Everything that carries one cluster's label."""

    servers: list[ServerInfo] = field(default_factory=list)
    networks: list[int] = field(default_factory=list)
    firewalls: list[int] = field(default_factory=list)
    placement_groups: list[int] = field(default_factory=list)
    ssh_keys: list[int] = field(default_factory=list)
    images: list[int] = field(default_factory=list)

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


def _server_info(server: Any) -> ServerInfo:
    pub = server.public_net.ipv4.ip if server.public_net and server.public_net.ipv4 else None
    priv = server.private_net[0].ip if server.private_net else None
    created = server.created.isoformat() if hasattr(server.created, "isoformat") else str(server.created)
    return ServerInfo(
        id=server.id,
        name=server.name,
        status=server.status,
        labels=dict(server.labels or {}),
        server_type=server.server_type.name if server.server_type else "",
        location=server.location.name if server.location else "",
        public_ip=pub,
        private_ip=priv,
        created=created,
    )


class RateLimit:
    """What the API's ``RateLimit-*`` headers last said, shared by all threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.limit: int | None = None
        self.remaining: int | None = None
        self.reset: float | None = None

    def update(self, headers: Any) -> None:
        try:
            limit = int(headers["RateLimit-Limit"])
            remaining = int(headers["RateLimit-Remaining"])
            reset = float(headers["RateLimit-Reset"])
        except (KeyError, ValueError, TypeError):
            return
        with self._lock:
            self.limit, self.remaining, self.reset = limit, remaining, reset

    def wait_for_token(self) -> float:
        """Seconds until the bucket holds one more request, from the last headers."""
        with self._lock:
            if self.limit is None or self.remaining is None or self.reset is None:
                return 1.0
            missing = max(1, self.limit - self.remaining)
            # Reset is when the bucket is full again; it refills linearly until then.
            per_token = max(0.0, self.reset - time.time()) / missing
            return min(60.0, max(per_token, 0.2))


class Cloud:
    """One project's API, for one event loop. Create with the token, close when done."""

    def __init__(
        self,
        token: str,
        endpoint: str,
        *,
        threads: int = 32,
        request_timeout: float = 30.0,
        max_retries: int = 8,
        poll_interval: float = 1.0,
    ) -> None:
        if not token:
            raise ConfigError(
                "no Hetzner Cloud API token: pass token=, set HCLOUD_TOKEN or hetzner.token"
            )
        self.endpoint = endpoint
        self.max_retries = max_retries
        self.poll_interval = poll_interval
        self.rate = RateLimit()
        self.requests = 0
        self.rate_limited = 0
        self._count_lock = threading.Lock()
        self._client = Client(
            token=token,
            api_endpoint=endpoint,
            application_name="dask-hetzner",
            application_version=__version__,
            timeout=request_timeout,
        )
        base = self._client._client
        # The SDK would sleep in its thread for some codes and not others; one policy here.
        base._retry_max_retries = 0
        base._session.hooks["response"].append(self._on_response)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hcloud")
        self._catalog_lock = asyncio.Lock()
        self._types: dict[str, ServerTypeInfo] | None = None
        self._locations: dict[str, LocationInfo] | None = None

    def _on_response(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.rate.update(response.headers)
        with self._count_lock:
            self.requests += 1
            if response.status_code == 429:
                self.rate_limited += 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client._client._session.close()

    async def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one SDK call in a thread, retrying transient faults; errors name ``what``."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            try:
                try:
                    future = loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))
                except RuntimeError:
                    # Python is exiting (atexit cleanup): no thread can start any more, and
                    # blocking the loop no longer hurts anyone, so call the SDK inline.
                    return fn(*args, **kwargs)
                return await future
            except APIException as e:
                code = e.code
                transient = code in TRANSIENT_CODES or code in TRANSIENT_STATUSES
                if not transient or attempt >= self.max_retries:
                    raise CloudError(what, code, e.message) from None
                if code == "rate_limit_exceeded" or code == 429:
                    delay = self.rate.wait_for_token() + random.uniform(0, 0.5)
                else:
                    delay = random.uniform(0.5, min(30.0, 2.0**attempt))
                logger.info("%s: %s, retrying in %.1f s", what, code, delay)
            except (requests.ConnectionError, requests.Timeout) as e:
                if attempt >= self.max_retries:
                    raise CloudError(what, type(e).__name__, "API not reachable") from None
                delay = random.uniform(0.5, min(30.0, 2.0**attempt))
                logger.info("%s: %s, retrying in %.1f s", what, type(e).__name__, delay)
            attempt += 1
            await asyncio.sleep(delay)

    # Catalog ------------------------------------------------------------------------------

    async def _load_catalog(self) -> None:
        async with self._catalog_lock:
            if self._types is not None:
                return
            types, locations = await asyncio.gather(
                self.call("listing server types", self._client.server_types.get_all),
                self.call("listing locations", self._client.locations.get_all),
            )
            self._locations = {
                loc.name: LocationInfo(loc.name, loc.city, loc.network_zone) for loc in locations
            }
            infos = {}
            for t in types:
                info = ServerTypeInfo(
                    name=t.name,
                    cores=t.cores,
                    memory_gb=float(t.memory),
                    disk_gb=t.disk,
                    architecture=t.architecture,
                    cpu_type=t.cpu_type,
                    # Deprecation is per location since 2025-09.
                    deprecated=bool(t.locations) and all(e.deprecation for e in t.locations),
                )
                for price in t.prices or []:
                    loc = price["location"]
                    info.hourly[loc] = float(price["price_hourly"]["gross"])
                    info.monthly[loc] = float(price["price_monthly"]["gross"])
                for entry in t.locations or []:
                    if entry.available and not entry.deprecation:
                        info.available.add(entry.location.name)
                infos[t.name] = info
            self._types = infos

    async def server_types(self) -> dict[str, ServerTypeInfo]:
        await self._load_catalog()
        assert self._types is not None
        return self._types

    async def locations(self) -> dict[str, LocationInfo]:
        await self._load_catalog()
        assert self._locations is not None
        return self._locations

    async def check_choices(self, types: Iterable[str], location: str, image: str) -> None:
        """Raise ConfigError, listing the valid choices, for an unknown type, location or image."""
        locations = await self.locations()
        if location not in locations:
            raise ConfigError(
                f"unknown location {location!r}; valid locations: {', '.join(sorted(locations))}"
            )
        catalog = await self.server_types()
        for name in set(types):
            info = catalog.get(name)
            orderable = sorted(n for n, t in catalog.items() if location in t.available)
            if info is None:
                raise ConfigError(
                    f"unknown server type {name!r}; types orderable in {location}: "
                    + ", ".join(orderable)
                )
            if location not in info.available:
                raise ConfigError(
                    f"server type {name!r} cannot be ordered in {location}"
                    f"{' (deprecated)' if info.deprecated else ''}; types orderable there: "
                    + ", ".join(orderable)
                )
        for arch in {catalog[name].architecture for name in set(types)}:
            await self.image_id(image, arch)

    async def image_id(self, name: str, architecture: str) -> int:
        images = await self.call(
            f"looking up image {name}",
            self._client.images.get_all,
            name=name,
            architecture=[architecture],
        )
        if not images:
            available = await self.call(
                "listing images",
                self._client.images.get_all,
                type=["system"],
                architecture=[architecture],
            )
            raise ConfigError(
                f"unknown image {name!r} for {architecture}; valid images: "
                + ", ".join(sorted({i.name for i in available if i.name}))
            )
        return images[0].id

    async def check_token(self) -> None:
        """A cheap authenticated request, so a bad token fails before anything is created."""
        try:
            await self.call(
                "checking the API token", self._client.ssh_keys.get_list, page=1, per_page=1
            )
        except CloudError as e:
            if e.code in ("unauthorized", 401):
                raise ConfigError("the Hetzner Cloud API token was refused (unauthorized)") from None
            raise

    # Shared resources ---------------------------------------------------------------------

    async def create_ssh_key(self, name: str, public_key: str, labels: dict[str, str]) -> int:
        key = await self.call(
            f"creating SSH key {name}",
            self._client.ssh_keys.create,
            name=name,
            public_key=public_key,
            labels=labels,
        )
        return key.id

    async def create_network(
        self, name: str, ip_range: str, subnet: str, network_zone: str, labels: dict[str, str]
    ) -> int:
        network = await self.call(
            f"creating network {name}",
            self._client.networks.create,
            name=name,
            ip_range=ip_range,
            subnets=[NetworkSubnet(type="cloud", ip_range=subnet, network_zone=network_zone)],
            labels=labels,
        )
        return network.id

    async def create_firewall(
        self, name: str, rules: list[dict[str, Any]], labels: dict[str, str]
    ) -> int:
        response = await self.call(
            f"creating firewall {name}",
            self._client.firewalls.create,
            name=name,
            rules=[FirewallRule(**rule) for rule in rules],
            labels=labels,
        )
        return response.firewall.id

    async def set_firewall_rules(self, firewall_id: int, rules: list[dict[str, Any]]) -> None:
        await self.call(
            f"setting rules of firewall {firewall_id}",
            self._client.firewalls.set_rules,
            Firewall(id=firewall_id),
            [FirewallRule(**rule) for rule in rules],
        )

    async def firewall_rules(self, firewall_id: int) -> list[dict[str, Any]]:
        fw = await self.call(
            f"reading firewall {firewall_id}", self._client.firewalls.get_by_id, firewall_id
        )
        return [
            {k: getattr(rule, k) for k in FirewallRule.__api_properties__} for rule in fw.rules
        ]

    async def create_placement_group(self, name: str, labels: dict[str, str]) -> int:
        response = await self.call(
            f"creating placement group {name}",
            self._client.placement_groups.create,
            name=name,
            type="spread",
            labels=labels,
        )
        return response.placement_group.id

    # Servers ------------------------------------------------------------------------------

    async def create_server(
        self,
        *,
        name: str,
        server_type: str,
        image: str,
        location: str,
        ssh_key_id: int,
        network_id: int,
        firewall_id: int,
        placement_group_id: int | None,
        user_data: str,
        labels: dict[str, str],
    ) -> ServerInfo:
        what = f"creating server {name} ({server_type} in {location})"
        try:
            response = await self.call(
                what,
                self._client.servers.create,
                name=name,
                server_type=ServerType(name=server_type),
                image=Image(name=image),
                location=Location(name=location),
                ssh_keys=[SSHKey(id=ssh_key_id)],
                networks=[Network(id=network_id)],
                firewalls=[Firewall(id=firewall_id)],
                placement_group=PlacementGroup(id=placement_group_id)
                if placement_group_id
                else None,
                user_data=user_data,
                labels=labels,
            )
        except CloudError as e:
            if e.code != "uniqueness_error":
                raise
            # A POST that timed out client-side may have succeeded: adopt it if it is ours.
            existing = await self.call(
                f"looking up server {name}", self._client.servers.get_by_name, name
            )
            if existing is None or any(existing.labels.get(k) != v for k, v in labels.items()):
                raise
            return _server_info(existing)
        return _server_info(response.server)

    async def servers(self, label_selector: str) -> list[ServerInfo]:
        servers = await self.call(
            f"listing servers ({label_selector})",
            self._client.servers.get_all,
            label_selector=label_selector,
        )
        return [_server_info(s) for s in servers]

    async def delete_server(self, server_id: int) -> None:
        """Delete one server; a server that is already gone is fine."""
        try:
            await self.call(
                f"deleting server {server_id}",
                self._client.servers.delete,
                Server(id=server_id),
            )
        except CloudError as e:
            if e.code != "not_found":
                raise

    async def cluster_resources(self, cluster: str) -> ClusterResources:
        sel = selector(cluster)
        c = self._client
        servers, networks, firewalls, groups, keys, images = await asyncio.gather(
            self.servers(sel),
            self.call("listing networks", c.networks.get_all, label_selector=sel),
            self.call("listing firewalls", c.firewalls.get_all, label_selector=sel),
            self.call("listing placement groups", c.placement_groups.get_all, label_selector=sel),
            self.call("listing SSH keys", c.ssh_keys.get_all, label_selector=sel),
            self.call("listing snapshots", c.images.get_all, label_selector=sel, type=["snapshot"]),
        )
        return ClusterResources(
            servers=servers,
            networks=[n.id for n in networks],
            firewalls=[f.id for f in firewalls],
            placement_groups=[g.id for g in groups],
            ssh_keys=[k.id for k in keys],
            images=[i.id for i in images],
        )

    async def all_clusters(self) -> dict[str, ClusterResources]:
        """Every cluster of the project, by the cluster label (never by name prefix)."""
        c = self._client
        sel = LABEL_CLUSTER
        servers, networks, firewalls, groups, keys, images = await asyncio.gather(
            self.call("listing servers", c.servers.get_all, label_selector=sel),
            self.call("listing networks", c.networks.get_all, label_selector=sel),
            self.call("listing firewalls", c.firewalls.get_all, label_selector=sel),
            self.call("listing placement groups", c.placement_groups.get_all, label_selector=sel),
            self.call("listing SSH keys", c.ssh_keys.get_all, label_selector=sel),
            self.call("listing snapshots", c.images.get_all, label_selector=sel, type=["snapshot"]),
        )
        out: dict[str, ClusterResources] = {}

        def bucket(obj: Any) -> ClusterResources:
            return out.setdefault(obj.labels[LABEL_CLUSTER], ClusterResources())

        for s in servers:
            bucket(s).servers.append(_server_info(s))
        for n in networks:
            bucket(n).networks.append(n.id)
        for f in firewalls:
            bucket(f).firewalls.append(f.id)
        for g in groups:
            bucket(g).placement_groups.append(g.id)
        for k in keys:
            bucket(k).ssh_keys.append(k.id)
        for i in images:
            bucket(i).images.append(i.id)
        return out

    async def delete_cluster(self, cluster: str, *, timeout: float) -> ClusterResources:
        """Delete everything labelled with ``cluster``, servers first, and wait until it is gone.

        Safe on a half-created cluster and idempotent; returns what was found.
        """
        deadline = time.monotonic() + timeout
        found = await self.cluster_resources(cluster)
        await asyncio.gather(*(self.delete_server(s.id) for s in found.servers))
        await self.wait_servers_gone(selector(cluster), deadline=deadline)
        c = self._client
        # Detaching lags behind server deletion: resource_in_use is retried until the deadline.
        await asyncio.gather(
            *(
                self._delete_until(f"firewall {i}", c.firewalls.delete, Firewall(id=i), deadline)
                for i in found.firewalls
            ),
            *(
                self._delete_until(
                    f"placement group {i}",
                    c.placement_groups.delete,
                    PlacementGroup(id=i),
                    deadline,
                )
                for i in found.placement_groups
            ),
            *(
                self._delete_until(f"SSH key {i}", c.ssh_keys.delete, SSHKey(id=i), deadline)
                for i in found.ssh_keys
            ),
            *(
                self._delete_until(f"snapshot {i}", c.images.delete, Image(id=i), deadline)
                for i in found.images
            ),
        )
        # A network can only go once its firewalls' servers have left it.
        await asyncio.gather(
            *(
                self._delete_until(f"network {i}", c.networks.delete, Network(id=i), deadline)
                for i in found.networks
            )
        )
        return found

    async def _delete_until(self, what: str, fn: Callable[[Any], Any], ref: Any, deadline: float) -> None:
        attempt = 0
        while True:
            try:
                await self.call(f"deleting {what}", fn, ref)
                return
            except CloudError as e:
                if e.code == "not_found":
                    return
                if e.code != "resource_in_use" or time.monotonic() > deadline:
                    raise
            attempt += 1
            await asyncio.sleep(min(5.0, 0.2 * 2**attempt))

    async def wait_servers_gone(self, label_selector: str, *, deadline: float) -> None:
        while True:
            left = await self.servers(label_selector)
            if not left:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"servers {', '.join(s.name for s in left)} still exist after deletion "
                    f"was requested ({label_selector})"
                )
            await asyncio.sleep(self.poll_interval)


class ServerWatcher:
    """One poller for a whole cluster: waiting for N servers costs one list request per interval.

    Waiters register a server id and the statuses they want; the poll loop runs only while
    someone waits, so an idle cluster makes no requests.
    """

    def __init__(self, cloud: Cloud, label_selector: str, interval: float) -> None:
        self.cloud = cloud
        self.label_selector = label_selector
        self.interval = interval
        # server id -> [(wanted statuses, registered at, future)]
        self._waiters: dict[int, list[tuple[set[str], float, asyncio.Future[ServerInfo]]]] = {}
        self._task: asyncio.Task[None] | None = None
        self.last: dict[int, ServerInfo] = {}

    async def wait(self, server_id: int, statuses: set[str], *, timeout: float, what: str) -> ServerInfo:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[ServerInfo] = loop.create_future()
        self._waiters.setdefault(server_id, []).append((statuses, time.monotonic(), fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            last = self.last.get(server_id)
            state = last.status if last else "unknown"
            raise TimeoutError(
                f"{what}: server {server_id} not {'/'.join(sorted(statuses))} after {timeout:.0f} s "
                f"(last status: {state})"
            ) from None
        finally:
            waiters = self._waiters.get(server_id, [])
            waiters[:] = [w for w in waiters if w[2] is not fut]
            if not waiters:
                self._waiters.pop(server_id, None)

    async def wait_gone(self, server_id: int, *, timeout: float) -> None:
        """Wait until the server no longer appears in the cluster's list."""
        try:
            await self.wait(server_id, set(), timeout=timeout, what=f"deleting server {server_id}")
        except CloudError as e:
            if e.code == "not_found":
                return
            raise

    async def _run(self) -> None:
        while self._waiters:
            started = time.monotonic()
            try:
                servers = await self.cloud.servers(self.label_selector)
            except CloudError as e:
                for waiters in list(self._waiters.values()):
                    for _, _, fut in waiters:
                        if not fut.done():
                            fut.set_exception(e)
                return
            self.last = {s.id: s for s in servers}
            for server_id, waiters in list(self._waiters.items()):
                info = self.last.get(server_id)
                for statuses, registered, fut in waiters:
                    if fut.done():
                        continue
                    # Only a list that began after the wait began can prove the server is gone.
                    if info is None and registered < started:
                        fut.set_exception(
                            CloudError(f"waiting for server {server_id}", "not_found", "server vanished")
                        )
                    elif info is not None and info.status in statuses:
                        fut.set_result(info)
            if not self._waiters:
                return
            # New waiters do not shorten the interval: the next poll serves them all.
            await asyncio.sleep(self.interval)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
