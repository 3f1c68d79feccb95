"""The SDK adapter: the only module of ``dask_hetzner`` that imports ``hcloud``.

The official SDK is synchronous (requests), so every request runs in a private thread pool,
never on the event loop. Here the SDK's objects become the project's own (``model.py``) and
its exceptions become ``CloudError`` naming what was being done; what to do about a failure
is the retry policy's business (``retry.py``). The SDK's own retries are off: it retries
only a few codes, sleeps inside its thread and ignores the rate-limit headers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
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

from .. import __version__
from .errors import CloudError, Unreachable
from .model import Kind, LocationInfo, NewServer, ResourceInfo, ServerInfo, ServerTypeInfo

T = TypeVar("T")

# Called in the request's thread with every HTTP response's status and headers.
ResponseHook = Callable[[int, Mapping[str, str]], None]

# Each kind -> the SDK's sub-client and the class that refers to one by id.
_KINDS: dict[Kind, tuple[str, type[Any]]] = {
    "ssh_key": ("ssh_keys", SSHKey),
    "network": ("networks", Network),
    "firewall": ("firewalls", Firewall),
    "placement_group": ("placement_groups", PlacementGroup),
    "snapshot": ("images", Image),
}


def _iso(when: Any) -> str:
    return when.isoformat() if hasattr(when, "isoformat") else str(when or "")


def _server_info(server: Any) -> ServerInfo:
    pub = server.public_net.ipv4.ip if server.public_net and server.public_net.ipv4 else None
    priv = server.private_net[0].ip if server.private_net else None
    return ServerInfo(
        id=server.id,
        name=server.name,
        status=server.status,
        labels=dict(server.labels or {}),
        server_type=server.server_type.name if server.server_type else "",
        location=server.location.name if server.location else "",
        public_ip=pub,
        private_ip=priv,
        created=_iso(server.created),
    )


def _resource_info(kind: Kind, obj: Any) -> ResourceInfo:
    return ResourceInfo(
        id=obj.id,
        labels=dict(obj.labels or {}),
        created=_iso(getattr(obj, "created", None)),
        servers=list(obj.servers or []) if kind == "placement_group" else [],
    )


def _server_type_info(t: Any) -> ServerTypeInfo:
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
        if entry.recommended and not entry.deprecation:
            info.recommended.add(entry.location.name)
    return info


def _translated(what: str, fn: Callable[[], T]) -> T:
    """``fn()``, its SDK and connection errors turned into ``CloudError`` naming ``what``."""
    try:
        return fn()
    except APIException as e:
        raise CloudError(what, e.code, e.message) from None
    except (requests.ConnectionError, requests.Timeout) as e:
        raise Unreachable(what, type(e).__name__, "API not reachable") from None


class Sdk:
    """One project's SDK client and its thread pool.

    Its request methods (below ``start``) block: they are run through :meth:`start`, by
    the retry policy, and return the project's own objects.
    """

    def __init__(
        self, token: str, endpoint: str, *, threads: int, request_timeout: float
    ) -> None:
        self.request_timeout = request_timeout
        self._client = Client(
            token=token,
            api_endpoint=endpoint,
            application_name="dask-hetzner",
            application_version=__version__,
            timeout=request_timeout,
        )
        # The SDK would sleep in its thread for some codes and not others; one policy: ours.
        self._client._client._retry_max_retries = 0
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hcloud")
        # One kept-alive connection per thread: requests' default pool of 10 dropped the
        # others (a warning per request when 50 servers are deleted at once).
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=threads)
        self._client._client._session.mount("https://", adapter)
        self._client._client._session.mount("http://", adapter)
        # Requests running in threads; teardown waits for them (a cancelled create may succeed).
        self._inflight: set[concurrent.futures.Future[Any]] = set()

    def on_response(self, hook: ResponseHook) -> None:
        """Call ``hook(status, headers)`` for every HTTP response (in the request's thread)."""

        def requests_hook(response: requests.Response, *args: Any, **kwargs: Any) -> None:
            hook(response.status_code, response.headers)

        self._client._client._session.hooks["response"].append(requests_hook)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client._client._session.close()

    def start(self, what: str, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run ``fn`` (one of the request methods, bound to its arguments) in a thread."""
        try:
            cf = self._pool.submit(_translated, what, fn)
        except RuntimeError:
            # Python is exiting (atexit cleanup): no thread can start any more, and
            # blocking the loop no longer hurts anyone, so call the SDK inline.
            cf = concurrent.futures.Future()
            try:
                cf.set_result(_translated(what, fn))
            except Exception as e:
                cf.set_exception(e)
            return cf
        self._inflight.add(cf)
        cf.add_done_callback(self._inflight.discard)
        return cf

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for requests still running in threads, e.g. of cancelled callers."""
        pending = [asyncio.wrap_future(cf) for cf in list(self._inflight)]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    # Requests -----------------------------------------------------------------------------

    def action_error(self, action_id: int) -> tuple[str, str] | None:
        action = self._client.actions.get_by_id(action_id)
        if action.status != "error":
            return None
        error: Mapping[str, object] = action.error or {}
        return str(error.get("code") or "action_failed"), str(error.get("message") or "")

    def failed_action(self, server_id: int, commands: tuple[str, ...]) -> tuple[str, str] | None:
        """``(code, message)`` of an action of the server among ``commands`` that ended in
        error (for a server adopted after a 409, whose create action id nobody knows, or an
        ``attach_to_network`` that failed)."""
        server = Server(id=server_id)
        for action in self._client.servers.get_actions(server, status=["error"]):
            if action.command in commands:
                error: Mapping[str, object] = action.error or {}
                message = str(error.get("message") or "")
                return str(error.get("code") or "action_failed"), f"{action.command}: {message}"
        return None

    def server_types(self) -> dict[str, ServerTypeInfo]:
        found: list[Any] = self._client.server_types.get_all()
        return {t.name: _server_type_info(t) for t in found}

    def ipv4_prices(self) -> dict[str, float]:
        """Gross EUR/h of a Primary IPv4 by location. hcloud 2.27 has no pricing client:
        ``GET /pricing`` through its generic request (the spec's ``get_pricing``)."""
        body: dict[str, Any] = self._client.request("GET", "/pricing")
        return {
            p["location"]: float(p["price_hourly"]["gross"])
            for entry in body["pricing"]["primary_ips"]
            if entry["type"] == "ipv4"
            for p in entry["prices"]
        }

    def locations(self) -> dict[str, LocationInfo]:
        found: list[Any] = self._client.locations.get_all()
        return {loc.name: LocationInfo(loc.name, loc.city, loc.network_zone) for loc in found}

    def image_ids(self, name: str, architecture: str) -> list[int]:
        images: list[Any] = self._client.images.get_all(name=name, architecture=[architecture])
        return [i.id for i in images]

    def system_image_names(self, architecture: str) -> list[str]:
        images = self._client.images.get_all(type=["system"], architecture=[architecture])
        return [i.name for i in images if i.name]

    def check_token(self) -> None:
        self._client.ssh_keys.get_list(page=1, per_page=1)

    def check_write(self) -> None:
        """A POST that creates nothing: an empty placement group body is refused (422
        invalid_input), but a read-only token is refused before that (401 token_readonly)."""
        self._client.request("POST", "/placement_groups", json={})

    def create_ssh_key(self, name: str, labels: dict[str, str], public_key: str) -> ResourceInfo:
        key = self._client.ssh_keys.create(name=name, labels=labels, public_key=public_key)
        return _resource_info("ssh_key", key)

    def create_network(
        self, name: str, labels: dict[str, str], ip_range: str, subnet: str, network_zone: str
    ) -> ResourceInfo:
        network = self._client.networks.create(
            name=name,
            labels=labels,
            ip_range=ip_range,
            subnets=[NetworkSubnet(type="cloud", ip_range=subnet, network_zone=network_zone)],
        )
        return _resource_info("network", network)

    def create_firewall(
        self, name: str, labels: dict[str, str], rules: list[dict[str, Any]]
    ) -> ResourceInfo:
        result = self._client.firewalls.create(
            name=name,
            labels=labels,  # type: ignore[arg-type]  # hcloud annotates it as str, wrongly
            rules=[FirewallRule(**rule) for rule in rules],
        )
        return _resource_info("firewall", result.firewall)

    def create_placement_group(self, name: str, labels: dict[str, str]) -> ResourceInfo:
        result = self._client.placement_groups.create(name=name, labels=labels, type="spread")
        return _resource_info("placement_group", result.placement_group)

    def create_server(self, new: NewServer) -> ServerInfo:
        group = new.placement_group_id
        result = self._client.servers.create(
            name=new.name,
            labels=new.labels,
            server_type=ServerType(name=new.server_type),
            image=Image(name=new.image),
            location=Location(name=new.location),
            ssh_keys=[SSHKey(id=new.ssh_key_id)],
            networks=[Network(id=new.network_id)],
            firewalls=[Firewall(id=new.firewall_id)],
            placement_group=PlacementGroup(id=group) if group else None,
            user_data=new.user_data,
        )
        info = _server_info(result.server)
        info.action_id = result.action.id if result.action else None
        return info

    def find(self, kind: Kind, name: str) -> ResourceInfo | None:
        obj = getattr(self._client, _KINDS[kind][0]).get_by_name(name)
        return None if obj is None else _resource_info(kind, obj)

    def find_server(self, name: str) -> ServerInfo | None:
        server = self._client.servers.get_by_name(name)
        return None if server is None else _server_info(server)

    def resources(self, kind: Kind, label_selector: str) -> list[ResourceInfo]:
        sub = getattr(self._client, _KINDS[kind][0])
        if kind == "snapshot":
            found = sub.get_all(label_selector=label_selector, type=["snapshot"])
        else:
            found = sub.get_all(label_selector=label_selector)
        return [_resource_info(kind, obj) for obj in found]

    def servers(self, label_selector: str) -> list[ServerInfo]:
        return [_server_info(s) for s in self._client.servers.get_all(label_selector=label_selector)]

    def delete(self, kind: Kind, resource_id: int) -> None:
        attribute, ref = _KINDS[kind]
        getattr(self._client, attribute).delete(ref(id=resource_id))

    def update_server(self, server_id: int, name: str, labels: dict[str, str]) -> ServerInfo:
        """``PUT /servers/{id}``: a new name and labels (a kept server taken by a new worker)."""
        return _server_info(self._client.servers.update(Server(id=server_id), name=name, labels=labels))

    def delete_server(self, server_id: int) -> None:
        self._client.servers.delete(Server(id=server_id))
