"""The Hetzner Cloud API, asynchronously: the only module that imports ``hcloud``.

The official SDK is synchronous (requests), so every call runs in a private thread pool
and never on the event loop. Retries are ours, not the SDK's: it retries only a few codes,
sleeps inside its thread and ignores the rate-limit headers, while we retry every transient
fault (429, 423, 409 conflict, 5xx, timeouts) with backoff that follows ``RateLimit-*``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
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


class ActionFailed(CloudError):
    """An action (e.g. create_server) ended in error; its resource may still exist."""


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
    # The create_server action, when this came from our own POST: how a failed create shows.
    action_id: int | None = None

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
    # placement group id -> ids of its servers (to reuse groups when reattaching)
    group_servers: dict[int, list[int]] = field(default_factory=dict)
    # ISO-8601 creation time of the oldest resource (for ``ls``: a cluster's age)
    created: str | None = None

    def _saw(self, obj: Any) -> None:
        when = _iso(getattr(obj, "created", None))
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


def _iso(when: Any) -> str:
    return when.isoformat() if hasattr(when, "isoformat") else str(when or "")


def _server_info(server: Any) -> ServerInfo:
    pub = server.public_net.ipv4.ip if server.public_net and server.public_net.ipv4 else None
    priv = server.private_net[0].ip if server.private_net else None
    created = _iso(server.created)
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
    """What the API's ``RateLimit-*`` headers last said, shared by all threads.

    Hetzner refills the bucket linearly until ``RateLimit-Reset`` (unix time of a full
    bucket). Once the headers say it is empty, requests queue here one refill period apart
    instead of running into 429s.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.limit: int | None = None
        self.remaining: int | None = None
        self.reset: float | None = None
        self._at = 0.0  # time.time() of the last headers
        self._sent = 0  # requests started since the last headers

    def update(self, headers: Any) -> None:
        try:
            limit = int(headers["RateLimit-Limit"])
            remaining = int(headers["RateLimit-Remaining"])
            reset = float(headers["RateLimit-Reset"])
        except (KeyError, ValueError, TypeError):
            return
        with self._lock:
            self.limit, self.remaining, self.reset = limit, remaining, reset
            self._at = time.time()
            self._sent = 0

    def exhausted(self) -> None:
        """A 429 arrived (perhaps without headers): the bucket is empty now."""
        with self._lock:
            if self.limit is not None:
                self.remaining = 0
                self._at = time.time()
                self._sent = 0

    def _per_token(self) -> float:
        assert self.limit is not None and self.remaining is not None and self.reset is not None
        missing = self.limit - self.remaining
        span = self.reset - self._at
        if missing > 0 and span > 0:
            return span / missing
        return 3600.0 / self.limit  # the documented refill: the whole limit in an hour

    def delay(self) -> float:
        """Seconds the next request should wait so that it finds a token in the bucket."""
        with self._lock:
            if self.limit is None or self.remaining is None or self.reset is None:
                return 0.0
            per = self._per_token()
            available = self.remaining + (time.time() - self._at) / per - self._sent
            self._sent += 1
            if available >= 1:
                return 0.0
            # Each queued request finds `available` one lower: they leave one period apart.
            return min(60.0, (1.0 - available) * per)


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
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
    ) -> None:
        if not token:
            raise ConfigError(
                "no Hetzner Cloud API token: pass token=, set HCLOUD_TOKEN or hetzner.token"
            )
        self.endpoint = endpoint
        self.max_retries = max_retries
        self.poll_interval = poll_interval
        self.request_timeout = request_timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.rate = RateLimit()
        self.requests = 0
        self.rate_limited = 0
        self.retries = 0
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
        # Requests running in threads; teardown waits for them (a cancelled create may succeed).
        self._inflight: set[concurrent.futures.Future[Any]] = set()
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

    def backoff(self, attempt: int) -> float:
        """Seconds before retry number ``attempt`` (0-based): exponential, jittered, capped."""
        return min(self.backoff_max, self.backoff_base * 2.0**attempt) * random.uniform(0.5, 1.0)

    async def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one SDK call in a thread, retrying transient faults; errors name ``what``."""
        return await self._call(what, fn, args, kwargs, None)

    async def _call(
        self,
        what: str,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        undo: Callable[[T], Awaitable[None]] | None,
    ) -> T:
        """``call``; with ``undo``, a result that arrives after a cancellation is undone."""
        attempt = 0
        while True:
            wait = self.rate.delay()
            if wait > 0:
                # The bucket is empty (RateLimit-Reset says when it refills): queue for a token.
                await asyncio.sleep(wait)
            try:
                try:
                    cf = self._pool.submit(fn, *args, **kwargs)
                except RuntimeError:
                    # Python is exiting (atexit cleanup): no thread can start any more, and
                    # blocking the loop no longer hurts anyone, so call the SDK inline.
                    return fn(*args, **kwargs)
                self._inflight.add(cf)
                cf.add_done_callback(self._inflight.discard)
                try:
                    return await asyncio.wrap_future(cf)
                except asyncio.CancelledError:
                    # A request already sent goes on in its thread; what it creates is undone.
                    if undo is not None and not cf.cancelled():
                        await self._undo_late(what, cf, undo)
                    raise
            except APIException as e:
                code = e.code
                transient = code in TRANSIENT_CODES or code in TRANSIENT_STATUSES
                if not transient or attempt >= self.max_retries:
                    raise CloudError(what, code, e.message) from None
                if code == "rate_limit_exceeded" or code == 429:
                    # Also without headers (a proxy's 429): the next request queues for a token.
                    self.rate.exhausted()
                delay = self.backoff(attempt)
                logger.info("%s: %s, retrying in %.2f s", what, code, delay)
            except (requests.ConnectionError, requests.Timeout) as e:
                if attempt >= self.max_retries:
                    raise CloudError(what, type(e).__name__, "API not reachable") from None
                delay = self.backoff(attempt)
                logger.info("%s: %s, retrying in %.2f s", what, type(e).__name__, delay)
            attempt += 1
            with self._count_lock:
                self.retries += 1
            await asyncio.sleep(delay)

    async def _undo_late(
        self, what: str, cf: concurrent.futures.Future[T], undo: Callable[[T], Awaitable[None]]
    ) -> None:
        try:
            # Bounded by the request timeout the SDK was given.
            result = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(cf)), self.request_timeout + 5
            )
        except Exception:
            return  # it failed: nothing was created
        try:
            await undo(result)
        except Exception as e:
            logger.warning("%s: undoing after cancellation failed: %s", what, e)

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for requests still running in threads, e.g. of cancelled callers."""
        pending = [asyncio.wrap_future(cf) for cf in list(self._inflight)]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    async def action_error(self, action_id: int) -> tuple[str, str] | None:
        """``(code, message)`` if the action ended in error, else None."""
        action = await self.call(
            f"reading action {action_id}", self._client.actions.get_by_id, action_id
        )
        if action.status != "error":
            return None
        error = action.error or {}
        return str(error.get("code") or "action_failed"), str(error.get("message") or "")

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

    async def _create_named(
        self,
        what: str,
        kind: str,
        name: str,
        labels: dict[str, str],
        create: Callable[..., Any],
        created_id: Callable[[Any], int],
        lookup: Callable[[str], Any],
        delete: Callable[[int], Any],
        **kwargs: Any,
    ) -> Any:
        """POST a named resource and return the SDK's answer (or the adopted resource).

        A 409 ``uniqueness_error`` on a resource carrying this cluster's labels means an
        earlier attempt of this very POST succeeded (it timed out or met a 5xx on the way
        back): that one is adopted. A result arriving after a cancellation is deleted.
        """

        async def undo(result: Any) -> None:
            await self.call(f"deleting {kind} {name}", delete, created_id(result))

        try:
            return await self._call(
                what, create, (), {"name": name, "labels": labels, **kwargs}, undo
            )
        except CloudError as e:
            if e.code != "uniqueness_error":
                raise
            existing = await self.call(f"looking up {kind} {name}", lookup, name)
            if existing is None or any(
                (existing.labels or {}).get(k) != v for k, v in labels.items()
            ):
                raise CloudError(
                    what,
                    e.code,
                    f"{e.api_message}; a {kind} named {name!r} exists that is not this "
                    "cluster's (a leftover?): delete it or choose another cluster name",
                ) from None
            logger.info("%s: adopting the %s an earlier attempt created", what, kind)
            return existing

    async def create_ssh_key(self, name: str, public_key: str, labels: dict[str, str]) -> int:
        c = self._client
        key = await self._create_named(
            f"creating SSH key {name}",
            "SSH key",
            name,
            labels,
            c.ssh_keys.create,
            lambda r: r.id,
            c.ssh_keys.get_by_name,
            lambda i: c.ssh_keys.delete(SSHKey(id=i)),
            public_key=public_key,
        )
        return key.id

    async def create_network(
        self, name: str, ip_range: str, subnet: str, network_zone: str, labels: dict[str, str]
    ) -> int:
        c = self._client
        network = await self._create_named(
            f"creating network {name}",
            "network",
            name,
            labels,
            c.networks.create,
            lambda r: r.id,
            c.networks.get_by_name,
            lambda i: c.networks.delete(Network(id=i)),
            ip_range=ip_range,
            subnets=[NetworkSubnet(type="cloud", ip_range=subnet, network_zone=network_zone)],
        )
        return network.id

    async def create_firewall(
        self, name: str, rules: list[dict[str, Any]], labels: dict[str, str]
    ) -> int:
        c = self._client
        result = await self._create_named(
            f"creating firewall {name}",
            "firewall",
            name,
            labels,
            c.firewalls.create,
            lambda r: r.firewall.id,
            c.firewalls.get_by_name,
            lambda i: c.firewalls.delete(Firewall(id=i)),
            rules=[FirewallRule(**rule) for rule in rules],
        )
        return result.firewall.id if hasattr(result, "firewall") else result.id

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
        c = self._client
        result = await self._create_named(
            f"creating placement group {name}",
            "placement group",
            name,
            labels,
            c.placement_groups.create,
            lambda r: r.placement_group.id,
            c.placement_groups.get_by_name,
            lambda i: c.placement_groups.delete(PlacementGroup(id=i)),
            type="spread",
        )
        return result.placement_group.id if hasattr(result, "placement_group") else result.id

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
        c = self._client
        result = await self._create_named(
            f"creating server {name} ({server_type} in {location})",
            "server",
            name,
            labels,
            c.servers.create,
            lambda r: r.server.id,
            c.servers.get_by_name,
            lambda i: c.servers.delete(Server(id=i)),
            server_type=ServerType(name=server_type),
            image=Image(name=image),
            location=Location(name=location),
            ssh_keys=[SSHKey(id=ssh_key_id)],
            networks=[Network(id=network_id)],
            firewalls=[Firewall(id=firewall_id)],
            placement_group=PlacementGroup(id=placement_group_id) if placement_group_id else None,
            user_data=user_data,
        )
        if not hasattr(result, "server"):
            return _server_info(result)  # adopted: its create action is unknown
        info = _server_info(result.server)
        info.action_id = result.action.id if result.action else None
        return info

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
        found = ClusterResources(
            servers=servers,
            networks=[n.id for n in networks],
            firewalls=[f.id for f in firewalls],
            placement_groups=[g.id for g in groups],
            ssh_keys=[k.id for k in keys],
            images=[i.id for i in images],
            group_servers={g.id: list(g.servers or []) for g in groups},
        )
        for obj in (*servers, *networks, *firewalls, *groups, *keys, *images):
            found._saw(obj)
        return found

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
            bucket(g).group_servers[g.id] = list(g.servers or [])
        for k in keys:
            bucket(k).ssh_keys.append(k.id)
        for i in images:
            bucket(i).images.append(i.id)
        for obj in (*servers, *networks, *firewalls, *groups, *keys, *images):
            bucket(obj)._saw(obj)
        return out

    async def delete_cluster(self, cluster: str, *, timeout: float) -> ClusterResources:
        """Delete everything labelled with ``cluster``, servers first, and wait until it is gone.

        Safe on a half-created cluster and idempotent; returns what was found. Every delete
        runs in parallel, so the time does not grow with the number of servers.
        """
        deadline = time.monotonic() + timeout
        # A create still in flight (its caller was cancelled) must land before the listing.
        await self.drain(min(timeout, self.request_timeout + 5))
        found = await self.cluster_resources(cluster)
        todo = found
        while True:
            await self._delete_found(cluster, todo, deadline)
            # Only a listing after the deletes proves nothing was created meanwhile.
            todo = await self.cluster_resources(cluster)
            if not len(todo):
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"deleting cluster {cluster}: {len(todo)} resources still exist after "
                    f"{timeout:.0f} s (servers: {', '.join(s.name for s in todo.servers) or 'none'})"
                )
            for key in ("servers", "networks", "firewalls", "placement_groups", "ssh_keys", "images"):
                getattr(found, key).extend(getattr(todo, key))

    async def _delete_found(self, cluster: str, found: ClusterResources, deadline: float) -> None:
        # A server already "deleting" (its node asked) needs no second request.
        await asyncio.gather(
            *(self.delete_server(s.id) for s in found.servers if s.status != "deleting")
        )
        if found.servers:
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
            await asyncio.sleep(min(self.backoff(attempt), max(0.0, deadline - time.monotonic())))
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


@dataclass(eq=False)
class _Waiter:
    statuses: set[str]
    registered: float
    future: asyncio.Future[ServerInfo]
    what: str
    action_id: int | None
    worker: str | None  # its dask-hetzner/worker label: lets a poll list only awaited servers
    lazy: bool  # nobody waits for the answer yet: polled every LAZY_POLLS intervals
    private_ip: bool  # the answer must carry the private IP (attach_to_network finished)

    def answered_by(self, info: ServerInfo) -> bool:
        return info.status in self.statuses and (not self.private_ip or info.private_ip is not None)


# A lazy waiter's server is reached by other means (SSH) and the poll only confirms it, or
# catches a failed create: one list every LAZY_POLLS intervals is enough.
LAZY_POLLS = 5


class ServerWatcher:
    """One poller for a whole cluster: waiting for N servers costs one list request per interval.

    Waiters register a server id and the statuses they want; the poll loop runs only while
    someone waits, so an idle cluster makes no requests. When only workers are awaited, the
    list is narrowed to them by their labels: one page, however large the cluster.
    A *lazy* waiter (``lazy=True``) is polled every ``LAZY_POLLS`` intervals until
    :meth:`hurry` says its answer is needed now. A server waited for as running
    that shows ``off`` gets its create action read once a poll: an action that ended in
    error (README fault 5) fails the wait at once instead of at its timeout.
    """

    def __init__(self, cloud: Cloud, label_selector: str, interval: float) -> None:
        self.cloud = cloud
        self.label_selector = label_selector
        self.interval = interval
        self._waiters: dict[int, list[_Waiter]] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._polled_at = 0.0  # time.monotonic() of the last list's start
        self.last: dict[int, ServerInfo] = {}

    async def wait(
        self,
        server_id: int,
        statuses: set[str],
        *,
        timeout: float,
        what: str,
        action_id: int | None = None,
        worker: str | None = None,
        lazy: bool = False,
        private_ip: bool = False,
    ) -> ServerInfo:
        loop = asyncio.get_running_loop()
        waiter = _Waiter(
            statuses,
            time.monotonic(),
            loop.create_future(),
            what,
            action_id,
            worker,
            lazy,
            private_ip,
        )
        self._waiters.setdefault(server_id, []).append(waiter)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        elif statuses and not lazy:
            self._nudge()
        try:
            return await asyncio.wait_for(waiter.future, timeout)
        except asyncio.TimeoutError:
            last = self.last.get(server_id)
            state = last.status if last else "unknown"
            if last is not None and last.status in statuses and private_ip and last.private_ip is None:
                state += ", no private IP yet"
            raise TimeoutError(
                f"{what}: server {server_id} not {'/'.join(sorted(statuses))} after {timeout:.0f} s "
                f"(last status: {state})"
            ) from None
        finally:
            waiters = self._waiters.get(server_id, [])
            waiters[:] = [w for w in waiters if w is not waiter]
            if not waiters:
                self._waiters.pop(server_id, None)

    def hurry(self, server_id: int) -> None:
        """The answer for ``server_id`` is needed now: poll within an interval, not LAZY_POLLS."""
        for w in self._waiters.get(server_id, []):
            w.lazy = False
        self._nudge()

    def _nudge(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def wait_gone(
        self, server_id: int, *, timeout: float, worker: str | None = None, lazy: bool = False
    ) -> None:
        """Wait until the server no longer appears in the cluster's list."""
        try:
            await self.wait(
                server_id,
                set(),
                timeout=timeout,
                what=f"deleting server {server_id}",
                worker=worker,
                lazy=lazy,
            )
        except CloudError as e:
            if e.code == "not_found":
                return
            raise

    def _pending(self) -> list[_Waiter]:
        return [w for ws in self._waiters.values() for w in ws if not w.future.done()]

    async def _run(self) -> None:
        self._wake = asyncio.Event()
        deletion_interval = self.interval
        while True:
            waiting = self._pending()
            if not waiting:
                return
            started = self._polled_at = time.monotonic()
            names = {w.worker for w in waiting}
            label_selector = self.label_selector
            if None not in names:
                # Only workers awaited: list just them (a full list of 100 servers is 2 pages).
                label_selector += f",{LABEL_WORKER} in ({','.join(sorted(n for n in names if n))})"
            try:
                servers = await self.cloud.servers(label_selector)
            except CloudError as e:
                for waiters in list(self._waiters.values()):
                    for w in waiters:
                        if not w.future.done():
                            w.future.set_exception(e)
                return
            listed = {s.id: s for s in servers}
            if label_selector == self.label_selector:
                self.last = listed
            else:
                self.last.update(listed)
            off: list[_Waiter] = []
            for server_id, waiters in list(self._waiters.items()):
                info = listed.get(server_id)
                if info is None:
                    self.last.pop(server_id, None)
                for w in waiters:
                    if w.future.done():
                        continue
                    # Only a list that began after the wait began can prove the server is gone.
                    if info is None and w.registered < started:
                        w.future.set_exception(
                            CloudError(f"waiting for server {server_id}", "not_found", "server vanished")
                        )
                    elif info is not None and w.answered_by(info):
                        w.future.set_result(info)
                    elif info is not None and info.status == "off" and w.action_id is not None:
                        off.append(w)
            if off:
                await self._check_actions(off)
            # Answered waiters leave once their tasks resume; they need no further poll.
            pending = self._pending()
            if not pending:
                return
            if any(w.statuses and not w.lazy for w in pending):
                interval = deletion_interval = self.interval
            elif any(not w.lazy for w in pending):
                # Only deletions awaited: they take seconds whatever we do, so poll less often.
                deletion_interval = min(deletion_interval * 1.5, LAZY_POLLS * self.interval)
                interval = deletion_interval
            else:
                interval = LAZY_POLLS * self.interval
            await self._pause(interval)

    async def _pause(self, interval: float) -> None:
        """Sleep ``interval``; a waiter that needs its answer now shortens it to one interval
        after the last poll (new waiters do not poll at once: the next poll serves them all)."""
        assert self._wake is not None
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), interval)
        except asyncio.TimeoutError:
            return
        rest = self.interval - (time.monotonic() - self._polled_at)
        if rest > 0:
            await asyncio.sleep(rest)

    async def _check_actions(self, waiters: list[_Waiter]) -> None:
        results = await asyncio.gather(
            *(self.cloud.action_error(w.action_id or 0) for w in waiters),
            return_exceptions=True,
        )
        for w, result in zip(waiters, results, strict=True):
            if isinstance(result, tuple) and not w.future.done():
                code, message = result
                w.future.set_exception(ActionFailed(w.what, code, message))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
