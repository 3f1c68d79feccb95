"""The simulated project: resources, ids, actions and their progress, server lifecycle.

Everything here runs on the simulator's event loop; request handlers are plain
functions (no awaits), so a request's changes are atomic.  Actions advance in
asyncio tasks; the lifecycle of a server (create -> start -> running -> SSH) is
one task per server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fcntl
import hashlib
import ipaddress
import logging
import os
import re
import secrets
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from . import catalog
from .catalog import Image, Location, ServerType
from .faults import FaultRule, FaultSet
from .labels import Selector, SelectorError, labels_errors, parse_selector
from .schema import FieldError, freeze
from .timing import ServerTimings, Timing

log = logging.getLogger(__name__)

USER_DATA_MAX = 32 * 1024
SPREAD_GROUP_MAX = 10
PLACEMENT_GROUPS_MAX = 50
FIREWALLS_PER_SERVER_MAX = 5
SERVERS_PER_NETWORK_MAX = 100
_HOSTNAME_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


# --------------------------------------------------------------------------- errors
class ApiError(Exception):
    """An error answer: ``{"error": {"code", "message", "details"}}`` with a status."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


def invalid_input(errors: Iterable[FieldError | tuple[str, str]], status: int = 422) -> ApiError:
    by_name: dict[str, list[str]] = {}
    for err in errors:
        name, message = (err.name, err.message) if isinstance(err, FieldError) else err
        by_name.setdefault(name, []).append(message)
    names = list(by_name)
    if len(names) == 1:
        message = f"invalid input in field '{names[0]}'"
    else:
        message = "invalid input in fields " + ", ".join(f"'{n}'" for n in names)
    fields = [{"name": n, "messages": m} for n, m in by_name.items()]
    return ApiError(status, "invalid_input", message, {"fields": fields})


def not_found(what: str = "resource") -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def uniqueness_error(field_name: str, message: str) -> ApiError:
    return ApiError(409, "uniqueness_error", message, {"fields": [{"name": field_name}]})


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+00:00")


# --------------------------------------------------------------------------- addresses
_LOCK_DIR = Path(tempfile.gettempdir()) / "dask-hetzner-sim-addresses"


class AddressPool:
    """Loopback addresses from one /16 block claimed for this simulator.

    Blocks are claimed with an exclusive ``flock`` so several simulators (test
    processes, a CLI one) on one machine never hand out the same address; the
    lock goes away with the process.  ``127.x.y.0`` and ``127.x.y.255`` are skipped.
    """

    PER_BLOCK = 256 * 254

    def __init__(self, kind: str, blocks: range):
        _LOCK_DIR.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(_LOCK_DIR, 0o1777)  # shared between users, like /tmp
        self._fh: IO[str] | None = None
        for block in blocks:
            try:  # another user's lock file may not be writable for us: skip that block
                fh = open(_LOCK_DIR / f"{kind}-127.{block}.lock", "a+")  # noqa: SIM115 - held for life
            except OSError:
                continue
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            self._fh = fh
            self.block = block
            break
        else:
            raise RuntimeError(f"no free {kind} loopback block in 127.{blocks.start}-{blocks.stop - 1}.0.0")
        self._next = 0
        self._free: deque[int] = deque()
        self._used: set[int] = set()

    def _ip(self, n: int) -> str:
        return f"127.{self.block}.{n // 254}.{n % 254 + 1}"

    def allocate(self) -> tuple[str, int]:
        """An unused address and its index (for derived values like IPv6)."""
        if self._next < self.PER_BLOCK:
            n = self._next
            self._next += 1
        elif self._free:
            n = self._free.popleft()  # reuse only once fresh ones ran out
        else:
            raise ApiError(422, "ip_not_available", "simulator address pool exhausted")
        self._used.add(n)
        return self._ip(n), n

    def release(self, ip: str) -> None:
        parts = ip.split(".")
        n = int(parts[2]) * 254 + int(parts[3]) - 1
        if n in self._used:
            self._used.discard(n)
            self._free.append(n)

    def close(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


# --------------------------------------------------------------------------- actions
@dataclass(eq=False)
class Action:
    id: int
    command: str
    resources: list[dict[str, Any]]
    started: float
    duration: float | None = 0.0  # None: never finishes
    fail: dict[str, str] | None = None  # error it will end with
    status: str = "running"
    finished: float | None = None
    error: dict[str, str] | None = None
    progress_value: int = 0
    _t0: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def begin(self) -> None:
        if self._t0 is None:
            self._t0 = time.monotonic()

    @property
    def progress(self) -> int:
        if self.status != "running":
            return self.progress_value
        if self._t0 is None or self.duration is None:
            return 0
        if self.duration <= 0:
            return 99
        frac = (time.monotonic() - self._t0) / self.duration
        return max(0, min(99, int(frac * 100)))

    def finish(self, error: dict[str, str] | None = None) -> None:
        if self.status != "running":
            return
        self.progress_value = self.progress if error else 100
        self.status = "error" if error else "success"
        self.error = error
        self.finished = time.time()
        self.done.set()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "command": self.command,
            "status": self.status,
            "progress": self.progress,
            "started": iso(self.started),
            "finished": iso(self.finished) if self.finished is not None else None,
            "resources": [dict(r) for r in self.resources],
            "error": dict(self.error) if self.error else None,
        }


@dataclass
class Effects:
    """Fault effects that apply to the actions one request creates."""

    slow: list[FaultRule] = field(default_factory=list)
    errors: list[FaultRule] = field(default_factory=list)
    created: int = 0


# --------------------------------------------------------------------------- resources
@dataclass(eq=False)
class SSHKey:
    id: int
    name: str
    public_key: str
    fingerprint: str
    labels: dict[str, str]
    created: float

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "fingerprint": self.fingerprint,
            "public_key": self.public_key,
            "labels": dict(self.labels),
            "created": iso(self.created),
        }


@dataclass(eq=False)
class Subnet:
    type: str
    ip_range: ipaddress.IPv4Network
    network_zone: str
    gateway: str

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "ip_range": str(self.ip_range),
            "network_zone": self.network_zone,
            "gateway": self.gateway,
        }


@dataclass(eq=False)
class Network:
    id: int
    name: str
    ip_range: ipaddress.IPv4Network
    subnets: list[Subnet]
    routes: list[dict[str, str]]
    labels: dict[str, str]
    created: float
    servers: set[int] = field(default_factory=set)
    expose_routes_to_vswitch: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "ip_range": str(self.ip_range),
            "subnets": [s.to_json() for s in self.subnets],
            "routes": [dict(r) for r in self.routes],
            "servers": sorted(self.servers),
            "load_balancers": [],
            "protection": {"delete": False},
            "labels": dict(self.labels),
            "created": iso(self.created),
            "expose_routes_to_vswitch": self.expose_routes_to_vswitch,
        }


@dataclass(eq=False)
class Firewall:
    id: int
    name: str
    labels: dict[str, str]
    rules: list[dict[str, Any]]
    created: float
    servers: list[int] = field(default_factory=list)  # applied directly
    selectors: list[tuple[str, Selector]] = field(default_factory=list)  # applied by label selector


@dataclass(eq=False)
class PlacementGroup:
    id: int
    name: str
    labels: dict[str, str]
    created: float
    servers: list[int] = field(default_factory=list)
    type: str = "spread"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "labels": dict(self.labels),
            "type": self.type,
            "created": iso(self.created),
            "servers": list(self.servers),
        }


@dataclass(eq=False)
class PrivateNic:
    ip: str
    mac: str
    alias_ips: list[str] = field(default_factory=list)
    # Hetzner lists a server's private_net only once its attach_to_network action has
    # finished: a create response has none (hcloud-go#168, "refetch the server").
    attached: bool = False


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


# --------------------------------------------------------------------------- helpers
def _name_errors(name: Any, field_name: str = "name", max_len: int = 128) -> list[FieldError]:
    if not isinstance(name, str) or not name.strip():
        return [FieldError(field_name, "name must not be empty")]
    if len(name) > max_len:
        return [FieldError(field_name, f"name is longer than {max_len} characters")]
    return []


def _hostname_errors(name: Any) -> list[FieldError]:
    if not isinstance(name, str) or not name:
        return [FieldError("name", "name must not be empty")]
    if len(name) > 253 or not all(_HOSTNAME_LABEL.match(p) for p in name.split(".")):
        return [FieldError("name", "name must be a valid hostname as per RFC 1123")]
    return []


def _labels_field_errors(labels: Any) -> list[FieldError]:
    if labels is None:
        return []
    return [FieldError("labels", msg) for msg in labels_errors(labels)]


def fingerprint(public_key: str) -> str:
    """MD5 fingerprint of an OpenSSH public key line; ValueError if it is none."""
    parts = public_key.strip().split()
    if len(parts) < 2 or not (parts[0].startswith(("ssh-", "ecdsa-", "sk-"))):
        raise ValueError("invalid public key")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("invalid public key") from exc
    # The key blob starts with its own type name, length-prefixed.
    if len(blob) < 4:
        raise ValueError("invalid public key")
    n = int.from_bytes(blob[:4], "big")
    if blob[4 : 4 + n].decode("ascii", "replace") != parts[0]:
        raise ValueError("invalid public key")
    digest = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, 32, 2))


def _parse_cidr(value: Any) -> ipaddress.IPv4Network | None:
    if not isinstance(value, str):
        return None
    try:
        return ipaddress.IPv4Network(value, strict=True)
    except ValueError:
        return None


_PRIVATE_RANGES = [ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")]


# --------------------------------------------------------------------------- store
class Store:
    def __init__(
        self,
        *,
        timing: Timing,
        faults: FaultSet,
        server_limit: int | None = None,
        hosts: Any = None,
        host_spec: Callable[..., Any] | None = None,
    ):
        self.timing = timing
        self.faults = faults
        self.server_limit = server_limit
        self.hosts = hosts
        self.host_spec = host_spec
        self.host_errors: list[str] = []
        self.effects: Effects | None = None

        self.servers: dict[int, Server] = {}
        self.ssh_keys: dict[int, SSHKey] = {}
        self.networks: dict[int, Network] = {}
        self.firewalls: dict[int, Firewall] = {}
        self.placement_groups: dict[int, PlacementGroup] = {}
        self.system_images: dict[int, Image] = {img.id: img for img in catalog.system_images()}
        self.snapshots: dict[int, Image] = {}
        self.actions: dict[int, Action] = {}
        self.timings: dict[int, ServerTimings] = {}

        self._ids = {
            "server": 1_000_000,
            "ssh_key": 2_000_000,
            "network": 3_000_000,
            "firewall": 4_000_000,
            "placement_group": 5_000_000,
            "primary_ip": 6_000_000,
            "image": 200_000_000,
            "action": 10_000_000,
        }
        self._names: dict[str, dict[str, int]] = {
            "server": {},
            "ssh_key": {},
            "network": {},
            "firewall": {},
            "placement_group": {},
        }
        self._mac = 0
        self.public_pool = AddressPool("public", range(64, 128))
        self.private_pool = AddressPool("private", range(128, 256))
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    # -- plumbing ------------------------------------------------------------
    def _next_id(self, kind: str) -> int:
        self._ids[kind] += 1
        return self._ids[kind]

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("simulator task failed: %r", exc, exc_info=exc)
            self.host_errors.append(f"task failed: {exc!r}")

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait until background work that can finish has finished (tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = [t for t in self._tasks if not t.done() and not getattr(t, "_sim_stuck", False)]
            if not pending:
                return
            await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self.public_pool.close()
        self.private_pool.close()

    def _claim_name(self, kind: str, name: str, obj_id: int, field_name: str = "name") -> None:
        owner = self._names[kind].get(name)
        if owner is not None and owner != obj_id:
            raise uniqueness_error(field_name, f"{kind.replace('_', ' ')} name is already used")

    def _rename(self, kind: str, old: str, new: str, obj_id: int) -> None:
        self._claim_name(kind, new, obj_id)
        if self._names[kind].get(old) == obj_id:
            del self._names[kind][old]
        self._names[kind][new] = obj_id

    # -- actions -------------------------------------------------------------
    def new_action(
        self, command: str, resources: list[tuple[int, str]], duration: float | None = None
    ) -> Action:
        """A running action; request fault effects may make it slow or failing."""
        action = Action(
            id=self._next_id("action"),
            command=command,
            resources=[{"id": rid, "type": rtype} for rid, rtype in resources],
            started=time.time(),
            duration=self.timing.action(command) if duration is None else duration,
        )
        eff = self.effects
        if eff is not None:
            first = eff.created == 0
            eff.created += 1
            for rule in eff.slow:
                if rule.params.get("command") in (None, command):
                    d = rule.params.get("duration")
                    action.duration = None if d is None else self.timing.scale(float(d))
            for rule in eff.errors:
                wanted = rule.params.get("command")
                if (wanted is None and first) or wanted == command:
                    action.fail = {
                        "code": str(rule.params.get("code") or "action_failed"),
                        "message": str(rule.params.get("message") or "Action failed"),
                    }
        self.actions[action.id] = action
        return action

    async def run_action(self, action: Action, alongside: Awaitable[Any] | None = None) -> bool:
        """Let ``action`` take its time, then finish it; True on success.

        ``alongside`` runs meanwhile; the action finishes once both are done.
        """
        action.begin()
        work = [] if alongside is None else [alongside]
        if action.duration is None:
            await asyncio.gather(*work)
            task = asyncio.current_task()
            if task is not None:
                task._sim_stuck = True  # type: ignore[attr-defined]  # settle() must not wait for it
            await asyncio.Event().wait()  # until cancelled
        else:
            await asyncio.gather(asyncio.sleep(action.duration), *work)
        action.finish(action.fail)
        return action.status == "success"

    def finish_now(self, action: Action) -> Action:
        """Schedule an action that needs no lifecycle (networks, firewalls ...)."""
        self.spawn(self.run_action(action))
        return action

    def action(self, action_id: int) -> Action:
        try:
            return self.actions[action_id]
        except KeyError:
            raise not_found("action") from None

    # -- lookups -------------------------------------------------------------
    def _get(self, table: dict[int, Any], obj_id: int, what: str) -> Any:
        try:
            return table[obj_id]
        except KeyError:
            raise not_found(what) from None

    def server(self, server_id: int) -> Server:
        return self._get(self.servers, server_id, "server")

    def ssh_key(self, key_id: int) -> SSHKey:
        return self._get(self.ssh_keys, key_id, "ssh key")

    def network(self, network_id: int) -> Network:
        return self._get(self.networks, network_id, "network")

    def firewall(self, firewall_id: int) -> Firewall:
        return self._get(self.firewalls, firewall_id, "firewall")

    def placement_group(self, pg_id: int) -> PlacementGroup:
        return self._get(self.placement_groups, pg_id, "placement group")

    def image(self, image_id: int) -> Image:
        img = self.system_images.get(image_id) or self.snapshots.get(image_id)
        if img is None:
            raise not_found("image")
        return img

    def all_images(self) -> list[Image]:
        return [*self.system_images.values(), *self.snapshots.values()]

    @staticmethod
    def _id_or_name(value: Any) -> tuple[int | None, str | None]:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        if isinstance(value, str) and value.isdigit():
            return int(value), value
        return None, value if isinstance(value, str) else None

    # -- rendering -----------------------------------------------------------
    def firewalls_of(self, server: Server) -> list[Firewall]:
        return [fw for fw in self.firewalls.values() if self._applies(fw, server)]

    @staticmethod
    def _applies(fw: Firewall, server: Server) -> bool:
        if server.id in fw.servers:
            return True
        return any(sel.matches(server.labels) for _, sel in fw.selectors)

    def server_json(self, server: Server) -> dict[str, Any]:
        pg = self.placement_groups.get(server.placement_group) if server.placement_group else None
        return {
            "id": server.id,
            "name": server.name,
            "status": server.status,
            "created": iso(server.created),
            "public_net": {
                "ipv4": None
                if server.ipv4 is None
                else {
                    "id": server.ipv4_id,
                    "ip": server.ipv4,
                    "blocked": False,
                    "dns_ptr": f"static.{'.'.join(reversed(server.ipv4.split('.')))}.clients.your-server.de",
                },
                "ipv6": None
                if server.ipv6 is None
                else {"id": server.ipv6_id, "ip": server.ipv6, "blocked": False, "dns_ptr": []},
                "floating_ips": [],
                "firewalls": [{"id": fw.id, "status": "applied"} for fw in self.firewalls_of(server)],
            },
            "private_net": [
                {"network": nid, "ip": nic.ip, "alias_ips": list(nic.alias_ips), "mac_address": nic.mac}
                for nid, nic in server.private.items()
                if nic.attached
            ],
            "server_type": _server_type_json(server.server_type),
            "location": _location_json(server.location),
            "image": _image_json(server.image),
            "iso": None,
            "rescue_enabled": False,
            "locked": False,
            "backup_window": None,
            "outgoing_traffic": 0,
            "ingoing_traffic": 0,
            "included_traffic": _included_traffic(server.server_type, server.location),
            "protection": {"delete": False, "rebuild": False},
            "labels": dict(server.labels),
            "volumes": [],
            "load_balancers": [],
            "primary_disk_size": server.server_type.disk,
            "placement_group": pg.to_json() if pg else None,
        }

    def firewall_json(self, fw: Firewall) -> dict[str, Any]:
        applied: list[dict[str, Any]] = [{"type": "server", "server": {"id": sid}} for sid in fw.servers]
        for text, sel in fw.selectors:
            matched = [s.id for s in self.servers.values() if sel.matches(s.labels)]
            applied.append(
                {
                    "type": "label_selector",
                    "label_selector": {"selector": text},
                    "applied_to_resources": [{"type": "server", "server": {"id": sid}} for sid in matched],
                }
            )
        return {
            "id": fw.id,
            "name": fw.name,
            "labels": dict(fw.labels),
            "created": iso(fw.created),
            "rules": [dict(r) for r in fw.rules],
            "applied_to": applied,
        }

    # -- ssh keys ------------------------------------------------------------
    def create_ssh_key(self, body: dict[str, Any]) -> SSHKey:
        errors = _name_errors(body["name"]) + _labels_field_errors(body.get("labels"))
        try:
            fp = fingerprint(body["public_key"])
        except ValueError:
            errors.append(FieldError("public_key", "invalid public key"))
            fp = ""
        if errors:
            raise invalid_input(errors)
        self._claim_name("ssh_key", body["name"], -1)
        if any(k.fingerprint == fp for k in self.ssh_keys.values()):
            raise uniqueness_error("public_key", "SSH key with the same fingerprint already exists")
        key = SSHKey(
            id=self._next_id("ssh_key"),
            name=body["name"],
            public_key=body["public_key"].strip(),
            fingerprint=fp,
            labels=dict(body.get("labels") or {}),
            created=time.time(),
        )
        self.ssh_keys[key.id] = key
        self._names["ssh_key"][key.name] = key.id
        return key

    def update_named(self, kind: str, obj: Any, body: dict[str, Any], hostname: bool = False) -> None:
        errors: list[FieldError] = []
        if "name" in body and body["name"] is not None:
            errors += _hostname_errors(body["name"]) if hostname else _name_errors(body["name"])
        if body.get("labels") is not None:
            errors += _labels_field_errors(body["labels"])
        if errors:
            raise invalid_input(errors)
        if body.get("name") is not None and body["name"] != obj.name:
            self._rename(kind, obj.name, body["name"], obj.id)
            obj.name = body["name"]
        if body.get("labels") is not None:
            obj.labels = dict(body["labels"])

    def delete_ssh_key(self, key_id: int) -> None:
        key = self.ssh_key(key_id)
        del self.ssh_keys[key.id]
        self._names["ssh_key"].pop(key.name, None)

    # -- networks ------------------------------------------------------------
    def _subnet(self, net_range: ipaddress.IPv4Network, sub: dict[str, Any], taken: list[Subnet], where: str) -> Subnet:
        if sub["type"] == "vswitch":
            raise invalid_input([(f"{where}.type", "vSwitch subnets are not supported by the simulator")])
        if sub["network_zone"] not in catalog.NETWORK_ZONES:
            raise invalid_input([(f"{where}.network_zone", "unknown network zone")])
        if sub.get("ip_range") is None:
            rng = next(
                (
                    cand
                    for cand in net_range.subnets(new_prefix=max(24, net_range.prefixlen))
                    if not any(cand.overlaps(t.ip_range) for t in taken)
                ),
                None,
            )
            if rng is None:
                raise ApiError(422, "no_subnet_available", "no free /24 range in the network")
        else:
            rng = _parse_cidr(sub["ip_range"])
            if rng is None or rng.prefixlen > 30:
                raise invalid_input([(f"{where}.ip_range", "invalid ip range")])
            if not rng.subnet_of(net_range):
                raise invalid_input([(f"{where}.ip_range", "subnet must be within the network's ip_range")])
            if any(rng.overlaps(t.ip_range) for t in taken):
                raise invalid_input([(f"{where}.ip_range", "subnet overlaps with another subnet")])
        return Subnet(sub["type"], rng, sub["network_zone"], str(net_range.network_address + 1))

    def create_network(self, body: dict[str, Any]) -> Network:
        errors = _name_errors(body["name"]) + _labels_field_errors(body.get("labels"))
        net_range = _parse_cidr(body["ip_range"])
        if net_range is None or net_range.prefixlen > 24:
            errors.append(FieldError("ip_range", "ip_range must be a network of at least /24"))
        elif not any(net_range.subnet_of(p) for p in _PRIVATE_RANGES):
            errors.append(FieldError("ip_range", "ip_range must be within a private (RFC 1918) range"))
        if errors:
            raise invalid_input(errors)
        assert net_range is not None
        self._claim_name("network", body["name"], -1)
        subnets: list[Subnet] = []
        for i, sub in enumerate(body.get("subnets") or []):
            subnets.append(self._subnet(net_range, sub, subnets, f"subnets.{i}"))
        routes = []
        for i, route in enumerate(body.get("routes") or []):
            dest, gw = _parse_cidr(route["destination"]), route["gateway"]
            try:
                gw_ip = ipaddress.IPv4Address(gw)
            except ValueError:
                gw_ip = None
            if dest is None or gw_ip is None or gw_ip not in net_range:
                raise invalid_input([(f"routes.{i}", "invalid route")])
            routes.append({"destination": str(dest), "gateway": str(gw_ip)})
        net = Network(
            id=self._next_id("network"),
            name=body["name"],
            ip_range=net_range,
            subnets=subnets,
            routes=routes,
            labels=dict(body.get("labels") or {}),
            created=time.time(),
            expose_routes_to_vswitch=bool(body.get("expose_routes_to_vswitch", False)),
        )
        self.networks[net.id] = net
        self._names["network"][net.name] = net.id
        return net

    def add_subnet(self, network_id: int, body: dict[str, Any]) -> Action:
        net = self.network(network_id)
        net.subnets.append(self._subnet(net.ip_range, body, net.subnets, "ip_range"))
        return self.finish_now(self.new_action("add_subnet", [(net.id, "network")]))

    def delete_subnet(self, network_id: int, body: dict[str, Any]) -> Action:
        net = self.network(network_id)
        rng = _parse_cidr(body["ip_range"])
        sub = next((s for s in net.subnets if s.ip_range == rng), None)
        if sub is None:
            raise not_found("subnet")
        net.subnets.remove(sub)
        return self.finish_now(self.new_action("delete_subnet", [(net.id, "network")]))

    def delete_network(self, network_id: int) -> None:
        net = self.network(network_id)
        # "Attached resources will be detached automatically."
        for sid in list(net.servers):
            server = self.servers.get(sid)
            if server is not None:
                self._detach(server, net)
        del self.networks[net.id]
        self._names["network"].pop(net.name, None)

    def _attach(self, server: Server, net: Network, ip: Any = None, alias_ips: Iterable[Any] = ()) -> None:
        if net.id in server.private:
            raise ApiError(422, "server_already_attached", "server is already attached to the network")
        zone = server.location.network_zone
        if not any(s.network_zone == zone for s in net.subnets):
            raise ApiError(422, "no_subnet_available", f"network has no subnet in network zone {zone}")
        if len(net.servers) >= SERVERS_PER_NETWORK_MAX:
            raise ApiError(422, "no_subnet_available", "network is full")
        if ip is not None:
            # Checked like Hetzner does; the address handed out is still a loopback one.
            try:
                wanted = ipaddress.IPv4Address(ip)
            except ValueError:
                raise invalid_input([("ip", "invalid ip")]) from None
            if wanted not in net.ip_range:
                raise ApiError(422, "ip_not_available", "the requested IP is not within the network")
        addr, _ = self.private_pool.allocate()
        self._mac += 1
        mac = "86:00:00:" + ":".join(f"{b:02x}" for b in self._mac.to_bytes(3, "big"))
        server.private[net.id] = PrivateNic(ip=addr, mac=mac, alias_ips=[str(a) for a in alias_ips])
        net.servers.add(server.id)

    async def _run_attach(self, server: Server, action: Action) -> None:
        """Run a create's next action; an attach_to_network shows its NIC once it succeeds."""
        if await self.run_action(action) and action.command == "attach_to_network":
            for res in action.resources:
                nic = server.private.get(res["id"]) if res["type"] == "network" else None
                if nic is not None:
                    nic.attached = True

    def _detach(self, server: Server, net: Network) -> None:
        nic = server.private.pop(net.id, None)
        if nic is not None:
            self.private_pool.release(nic.ip)
        net.servers.discard(server.id)

    # -- firewalls -----------------------------------------------------------
    @staticmethod
    def _rules(rules: list[dict[str, Any]], where: str = "rules") -> list[dict[str, Any]]:
        out = []
        errors: list[FieldError] = []
        for i, rule in enumerate(rules):
            name = f"{where}.{i}"
            proto = rule["protocol"]
            port = rule.get("port")
            if proto in ("tcp", "udp"):
                if not isinstance(port, str) or not re.fullmatch(r"(any|\d{1,5}(-\d{1,5})?)", port):
                    errors.append(FieldError(f"{name}.port", "port must be a port or a port range"))
                else:
                    nums = [int(p) for p in port.split("-")] if port != "any" else [1]
                    if not all(1 <= n <= 65535 for n in nums) or nums != sorted(nums):
                        errors.append(FieldError(f"{name}.port", "port out of range"))
            elif port is not None:
                errors.append(FieldError(f"{name}.port", f"port is not allowed for protocol {proto}"))
            key = "source_ips" if rule["direction"] == "in" else "destination_ips"
            ips = rule.get(key) or []
            if not ips:
                errors.append(FieldError(f"{name}.{key}", f"{key} is required for direction {rule['direction']}"))
            for j, cidr in enumerate(ips):
                try:
                    ipaddress.ip_network(cidr, strict=False)
                except ValueError:
                    errors.append(FieldError(f"{name}.{key}.{j}", "invalid CIDR"))
            out.append(
                {
                    "direction": rule["direction"],
                    "source_ips": list(rule.get("source_ips") or []) if rule["direction"] == "in" else [],
                    "destination_ips": list(rule.get("destination_ips") or []) if rule["direction"] == "out" else [],
                    "protocol": proto,
                    "port": port,
                    "description": rule.get("description"),
                }
            )
        if errors:
            raise invalid_input(errors)
        return out

    def _apply_targets(self, fw: Firewall, apply_to: list[dict[str, Any]], where: str) -> list[Action]:
        """Validate then apply ``apply_to`` entries; one action per entry."""
        new_servers: list[Server] = []
        new_selectors: list[tuple[str, Selector]] = []
        for i, res in enumerate(apply_to):
            if res["type"] == "server":
                sid = (res.get("server") or {}).get("id")
                if sid is None:
                    raise invalid_input([(f"{where}.{i}.server", "Missing data for required field.")])
                server = self.servers.get(sid)
                if server is None:
                    raise ApiError(404, "firewall_resource_not_found", f"server {sid} not found")
                if sid in fw.servers:
                    raise ApiError(422, "firewall_already_applied", "firewall is already applied to the server")
                if server in new_servers:
                    raise ApiError(422, "server_already_added", "server was applied more than once")
                if server.ipv4 is None and server.ipv6 is None:
                    raise ApiError(422, "private_net_only_server", "server has no public interface")
                if len(self.firewalls_of(server)) >= FIREWALLS_PER_SERVER_MAX:
                    raise ApiError(
                        403,
                        "resource_limit_exceeded",
                        "a server can have at most 5 firewalls",
                        {"limits": [{"name": "firewalls_per_server"}]},
                    )
                new_servers.append(server)
            else:
                text = (res.get("label_selector") or {}).get("selector")
                if text is None:
                    raise invalid_input([(f"{where}.{i}.label_selector", "Missing data for required field.")])
                try:
                    sel = parse_selector(text)
                except SelectorError as exc:
                    raise invalid_input([(f"{where}.{i}.label_selector.selector", str(exc))]) from None
                if any(t == text for t, _ in fw.selectors):
                    raise ApiError(422, "firewall_already_applied", "firewall is already applied to the label selector")
                new_selectors.append((text, sel))
        actions = []
        for server in new_servers:
            fw.servers.append(server.id)
            actions.append(self.new_action("apply_firewall", [(fw.id, "firewall"), (server.id, "server")]))
        for text, sel in new_selectors:
            fw.selectors.append((text, sel))
            actions.append(self.new_action("apply_firewall", [(fw.id, "firewall")]))
        return [self.finish_now(a) for a in actions]

    def create_firewall(self, body: dict[str, Any]) -> tuple[Firewall, list[Action]]:
        errors = _name_errors(body["name"]) + _labels_field_errors(body.get("labels"))
        if errors:
            raise invalid_input(errors)
        rules = self._rules(body.get("rules") or [])
        self._claim_name("firewall", body["name"], -1)
        fw = Firewall(
            id=self._next_id("firewall"),
            name=body["name"],
            labels=dict(body.get("labels") or {}),
            rules=rules,
            created=time.time(),
        )
        actions = self._apply_targets(fw, body.get("apply_to") or [], "apply_to")
        self.firewalls[fw.id] = fw
        self._names["firewall"][fw.name] = fw.id
        return fw, actions

    def set_rules(self, firewall_id: int, body: dict[str, Any]) -> list[Action]:
        fw = self.firewall(firewall_id)
        fw.rules = self._rules(body["rules"])
        actions = [self.new_action("set_firewall_rules", [(fw.id, "firewall")])]
        for server in self.servers.values():
            if self._applies(fw, server):
                actions.append(self.new_action("apply_firewall", [(fw.id, "firewall"), (server.id, "server")]))
        return [self.finish_now(a) for a in actions]

    def apply_firewall(self, firewall_id: int, body: dict[str, Any]) -> list[Action]:
        return self._apply_targets(self.firewall(firewall_id), body["apply_to"], "apply_to")

    def remove_firewall(self, firewall_id: int, body: dict[str, Any]) -> list[Action]:
        fw = self.firewall(firewall_id)
        drop_servers: list[int] = []
        drop_selectors: list[str] = []
        for i, res in enumerate(body["remove_from"]):
            if res["type"] == "server":
                sid = (res.get("server") or {}).get("id")
                if sid is None:
                    raise invalid_input([(f"remove_from.{i}.server", "Missing data for required field.")])
                if sid not in fw.servers:
                    server = self.servers.get(sid)
                    if server is not None and self._applies(fw, server):
                        raise ApiError(
                            422,
                            "firewall_managed_by_label_selector",
                            "firewall is applied via a label selector and cannot be removed manually",
                        )
                    raise ApiError(404, "firewall_resource_not_found", "firewall is not applied to the server")
                drop_servers.append(sid)
            else:
                text = (res.get("label_selector") or {}).get("selector")
                if not any(t == text for t, _ in fw.selectors):
                    raise ApiError(404, "firewall_resource_not_found", "firewall is not applied to the label selector")
                drop_selectors.append(text or "")
        actions = []
        for sid in drop_servers:
            fw.servers.remove(sid)
            actions.append(self.new_action("remove_firewall", [(fw.id, "firewall"), (sid, "server")]))
        for text in drop_selectors:
            fw.selectors = [(t, s) for t, s in fw.selectors if t != text]
            actions.append(self.new_action("remove_firewall", [(fw.id, "firewall")]))
        return [self.finish_now(a) for a in actions]

    def delete_firewall(self, firewall_id: int) -> None:
        fw = self.firewall(firewall_id)
        if fw.servers or any(self._applies(fw, s) for s in self.servers.values()):
            raise ApiError(422, "resource_in_use", "firewall is still applied to a resource")
        del self.firewalls[fw.id]
        self._names["firewall"].pop(fw.name, None)

    # -- placement groups ----------------------------------------------------
    def create_placement_group(self, body: dict[str, Any]) -> PlacementGroup:
        errors = _name_errors(body["name"]) + _labels_field_errors(body.get("labels"))
        if errors:
            raise invalid_input(errors)
        self._claim_name("placement_group", body["name"], -1)
        if len(self.placement_groups) >= PLACEMENT_GROUPS_MAX:
            raise ApiError(
                403,
                "resource_limit_exceeded",
                "placement group limit exceeded",
                {"limits": [{"name": "placement_group_limit"}]},
            )
        pg = PlacementGroup(
            id=self._next_id("placement_group"),
            name=body["name"],
            labels=dict(body.get("labels") or {}),
            created=time.time(),
            type=body["type"],
        )
        self.placement_groups[pg.id] = pg
        self._names["placement_group"][pg.name] = pg.id
        return pg

    def delete_placement_group(self, pg_id: int) -> None:
        pg = self.placement_group(pg_id)
        if pg.servers:
            raise ApiError(422, "resource_in_use", "placement group still contains servers")
        del self.placement_groups[pg.id]
        self._names["placement_group"].pop(pg.name, None)

    def _join_group(self, server: Server, pg: PlacementGroup) -> None:
        if len(pg.servers) >= SPREAD_GROUP_MAX:
            raise ApiError(422, "placement_error", "spread placement group is full (10 servers)")
        pg.servers.append(server.id)
        server.placement_group = pg.id

    def _leave_group(self, server: Server) -> None:
        pg = self.placement_groups.get(server.placement_group) if server.placement_group else None
        if pg is not None and server.id in pg.servers:
            pg.servers.remove(server.id)
        server.placement_group = None

    # -- images --------------------------------------------------------------
    def update_image(self, image_id: int, body: dict[str, Any]) -> Image:
        img = self.image(image_id)
        if img.type == "system":
            raise ApiError(403, "forbidden", "system images cannot be changed")
        errors = _labels_field_errors(body.get("labels"))
        if errors:
            raise invalid_input(errors)
        if body.get("description") is not None:
            img.description = body["description"]
        if body.get("type") == "snapshot":  # converts a backup into a snapshot
            img.type = "snapshot"
        if body.get("labels") is not None:
            img.labels = dict(body["labels"])
        return img

    def delete_image(self, image_id: int) -> None:
        img = self.image(image_id)
        if img.type == "system":
            raise ApiError(403, "forbidden", "system images cannot be deleted")
        del self.snapshots[img.id]

    def create_image(self, server_id: int, body: dict[str, Any]) -> tuple[Image, Action]:
        server = self.server(server_id)
        errors = _labels_field_errors(body.get("labels"))
        if errors:
            raise invalid_input(errors)
        self._check_unlocked(server)
        img = Image(
            id=self._next_id("image"),
            type=body.get("type") or "snapshot",
            name=None,
            description=body.get("description") or f"{server.name}-{iso(time.time())}",
            os_flavor=server.image.os_flavor,
            os_version=server.image.os_version,
            architecture=server.server_type.architecture,
            disk_size=server.server_type.disk,
            created=iso(time.time()),
            image_size=None,
            status="creating",
            created_from={"id": server.id, "name": server.name},
            labels=dict(body.get("labels") or {}),
            rapid_deploy=False,
        )
        self.snapshots[img.id] = img
        action = self.new_action("create_image", [(server.id, "server"), (img.id, "image")])
        server.busy = action

        async def run() -> None:
            ok = await self.run_action(action)
            if server.busy is action:
                server.busy = None
            if img.id in self.snapshots:
                img.status = "available" if ok else "unavailable"
                img.image_size = round(server.server_type.disk * 0.05, 2) if ok else None

        self.spawn(run())
        return img, action

    # -- servers: creation ---------------------------------------------------
    def _resolve_server_type(self, value: Any) -> ServerType:
        sid, name = self._id_or_name(value)
        st = catalog.SERVER_TYPES_BY_ID.get(sid) if sid is not None else None
        st = st or (catalog.SERVER_TYPES_BY_NAME.get(name) if name else None)
        if st is None:
            raise invalid_input([("server_type", "server type not found")])
        return st

    def _resolve_location(self, value: Any) -> Location:
        lid, name = self._id_or_name(value)
        loc = catalog.LOCATIONS_BY_ID.get(lid) if lid is not None else None
        loc = loc or (catalog.LOCATIONS_BY_NAME.get(name) if name else None)
        if loc is None:
            raise invalid_input([("location", "location not found")])
        return loc

    def _resolve_image(self, value: Any, arch: str) -> Image:
        iid, name = self._id_or_name(value)
        img: Image | None
        if iid is not None and (iid in self.system_images or iid in self.snapshots):
            img = self.image(iid)
        else:
            img = next(
                (i for i in self.system_images.values() if i.name == name and i.architecture == arch),
                None,
            )
            if img is None:
                raise invalid_input([("image", "image not found")])
        if img.architecture != arch:
            raise invalid_input([("image", f"image is not compatible with architecture {arch}")])
        if img.status != "available":
            raise ApiError(422, "invalid_input", "image is not available yet", {"fields": [{"name": "image", "messages": ["image is not available"]}]})
        return img

    def _resolve_ssh_keys(self, values: list[Any]) -> list[SSHKey]:
        keys = []
        for i, value in enumerate(values):
            kid, name = self._id_or_name(value)
            key = self.ssh_keys.get(kid) if kid is not None else None
            if key is None and name is not None:
                owner = self._names["ssh_key"].get(name)
                key = self.ssh_keys.get(owner) if owner is not None else None
            if key is None:
                raise invalid_input([(f"ssh_keys.{i}", f"ssh key {value!r} not found")])
            keys.append(key)
        return keys

    def server_count(self) -> int:
        return len(self.servers)

    def create_server(self, body: dict[str, Any]) -> dict[str, Any]:
        errors = _hostname_errors(body["name"]) + _labels_field_errors(body.get("labels"))
        user_data = body.get("user_data")
        if user_data is not None and len(user_data.encode()) > USER_DATA_MAX:
            errors.append(FieldError("user_data", "user_data is limited to 32 KiB"))
        if body.get("volumes"):
            errors.append(FieldError("volumes", "volumes are not supported by the simulator"))
        pn = body.get("public_net") or {}
        if pn.get("ipv4") is not None or pn.get("ipv6") is not None:
            errors.append(FieldError("public_net", "primary IPs are not supported by the simulator"))
        if errors:
            raise invalid_input(errors)
        st = self._resolve_server_type(body["server_type"])
        loc = self._resolve_location(body.get("location") or "fsn1")
        image = self._resolve_image(body["image"], st.architecture)
        keys = self._resolve_ssh_keys(body.get("ssh_keys") or [])
        networks = []
        for i, nid in enumerate(body.get("networks") or []):
            net = self.networks.get(nid)
            if net is None:
                raise invalid_input([(f"networks.{i}", f"network {nid} not found")])
            if not any(s.network_zone == loc.network_zone for s in net.subnets):
                raise ApiError(422, "no_subnet_available", f"network {nid} has no subnet in {loc.network_zone}")
            networks.append(net)
        firewalls = []
        for i, ref in enumerate(body.get("firewalls") or []):
            fw = self.firewalls.get(ref["firewall"])
            if fw is None:
                raise invalid_input([(f"firewalls.{i}.firewall", f"firewall {ref['firewall']} not found")])
            firewalls.append(fw)
        if len(firewalls) > FIREWALLS_PER_SERVER_MAX:
            raise invalid_input([("firewalls", "a server can have at most 5 firewalls")])
        pg = None
        if body.get("placement_group") is not None:
            pg = self.placement_groups.get(body["placement_group"])
            if pg is None:
                raise invalid_input([("placement_group", "placement group not found")])
        self._claim_name("server", body["name"], -1)
        if self.server_limit is not None and len(self.servers) >= self.server_limit:
            raise ApiError(
                403, "resource_limit_exceeded", "server limit exceeded", {"limits": [{"name": "server_limit"}]}
            )
        if st.deprecated:
            raise ApiError(
                412,
                "resource_unavailable",
                f'Server Type "{st.name}" is unavailable in "{loc.name}" and can no longer be ordered',
            )
        if not st.orderable_in(loc.name):
            raise ApiError(
                412,
                "resource_unavailable",
                "unable to provision servers for this location, try with a different location or try later",
            )
        if pg is not None and len(pg.servers) >= SPREAD_GROUP_MAX:
            raise ApiError(422, "placement_error", "spread placement group is full (10 servers)")

        sid = self._next_id("server")
        enable_v4 = pn.get("enable_ipv4", True) is not False
        enable_v6 = pn.get("enable_ipv6", True) is not False
        host_ip, n = self.public_pool.allocate()
        timings = ServerTimings(server_id=sid, name=body["name"])
        timings.mark("requested")
        server = Server(
            id=sid,
            name=body["name"],
            server_type=st,
            location=loc,
            image=image,
            labels=dict(body.get("labels") or {}),
            created=time.time(),
            host_ip=host_ip,
            ipv4=host_ip if enable_v4 else None,
            ipv4_id=self._next_id("primary_ip") if enable_v4 else None,
            ipv6=f"2001:db8:{self.public_pool.block:x}:{n:x}::/64" if enable_v6 else None,
            ipv6_id=self._next_id("primary_ip") if enable_v6 else None,
            user_data=user_data,
            authorized_keys=[k.public_key for k in keys],
            timings=timings,
        )
        self.servers[sid] = server
        self.timings[sid] = timings
        self._names["server"][server.name] = sid
        for net in networks:
            self._attach(server, net)
        for fw in firewalls:
            if sid not in fw.servers:
                fw.servers.append(sid)
        if pg is not None:
            self._join_group(server, pg)

        timings.drawn["create"] = self.timing.create_server()
        create = self.new_action("create_server", [(sid, "server")], duration=timings.drawn["create"])
        timings.drawn["create"] = create.duration if create.duration is not None else float("inf")
        start_after = body.get("start_after_create")
        start = None
        if start_after is None or start_after:
            timings.drawn["start"] = self.timing.start_server()
            start = self.new_action("start_server", [(sid, "server")], duration=timings.drawn["start"])
            timings.drawn["start"] = start.duration if start.duration is not None else float("inf")
        extra = [self.new_action("attach_to_network", [(sid, "server"), (n.id, "network")]) for n in networks]
        extra += [self.new_action("apply_firewall", [(f.id, "firewall"), (sid, "server")]) for f in firewalls]
        server.busy = create
        server.task = self.spawn(self._lifecycle(server, create, start, extra))
        return {
            "server": server,
            "action": create,
            "next_actions": [a for a in (start, *extra) if a is not None],
            "root_password": None if keys else secrets.token_urlsafe(15),
        }

    # -- servers: lifecycle --------------------------------------------------
    async def _lifecycle(self, server: Server, create: Action, start: Action | None, extra: list[Action]) -> None:
        ok = await self.run_action(create)
        server.timings.mark("created")
        for action in extra:
            action.duration = 0.0 if ok else action.duration
            if not ok:
                action.fail = {"code": "action_failed", "message": "server creation failed"}
            self.spawn(self._run_attach(server, action))
        if not ok:
            server.busy = None
            server.status = "off"
            if start is not None:
                start.finish({"code": "action_failed", "message": "server creation failed"})
            return
        if start is None:
            server.busy = None
            server.status = "off"
            return
        server.status = "starting"
        server.busy = start
        ok = await self.run_action(start)
        server.busy = None
        if not ok:
            server.status = "off"
            return
        await self._running(server)

    async def _running(self, server: Server) -> None:
        """The server is up: boot its host, arm host faults."""
        server.status = "running"
        server.timings.mark("running")
        for rule in self.faults.host_rules("server_vanishes"):
            if rule.matches_server(server.id, server.name, server.labels):
                self.spawn(self._vanish_later(server, rule))
        ssh_delay = self.timing.ssh_delay()
        server.timings.drawn.setdefault("ssh_delay", ssh_delay)
        for rule in self.faults.host_rules("slow_boot"):
            if rule.matches_server(server.id, server.name, server.labels):
                extra = self.timing.scale(float(rule.params.get("delay", 60.0)))
                ssh_delay += extra
                server.timings.drawn["slow_boot"] = server.timings.drawn.get("slow_boot", 0.0) + extra
        ssh_never = any(
            rule.matches_server(server.id, server.name, server.labels)
            for rule in self.faults.host_rules("ssh_never")
        )
        if ssh_never:
            server.timings.drawn["ssh_never"] = 1.0
        if self.hosts is not None and self.host_spec is not None:
            spec = self.host_spec(
                server_id=server.id,
                name=server.name,
                public_ip=server.host_ip,
                private_ips=[nic.ip for nic in server.private.values()],
                authorized_keys=list(server.authorized_keys),
                user_data=server.user_data,
            )
            server.host_exists = True
            try:
                await self.hosts.boot(spec, ssh_delay=ssh_delay, ssh_never=ssh_never)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken host is a broken server, not a broken API
                log.exception("host boot failed for server %s", server.id)
                self.host_errors.append(f"boot {server.id}: {exc!r}")
                return
        server.timings.mark("booted")
        if not ssh_never:  # hosts listen ssh_delay after boot returns
            server.timings.phases["ssh_expected"] = server.timings.phases["booted"] + ssh_delay
        for rule in self.faults.host_rules("processes_die"):
            if rule.matches_server(server.id, server.name, server.labels):
                self.spawn(self._kill_later(server, rule))
        for rule in self.faults.host_rules("ssh_drop"):
            if rule.matches_server(server.id, server.name, server.labels):
                self.spawn(self._drop_ssh_later(server, rule))

    async def _kill_later(self, server: Server, rule: FaultRule) -> None:
        await asyncio.sleep(self.timing.scale(float(rule.params.get("after") or 0.0)))
        self.kill_processes(server)

    def kill_processes(self, server: Server) -> None:
        if server.id not in self.servers or server.status != "running":
            return
        server.timings.mark("processes_died")
        if self.hosts is not None and server.host_exists:
            try:
                self.hosts.kill_processes(server.id)
            except Exception as exc:
                log.exception("kill_processes failed for server %s", server.id)
                self.host_errors.append(f"kill_processes {server.id}: {exc!r}")

    async def _drop_ssh_later(self, server: Server, rule: FaultRule) -> None:
        await asyncio.sleep(self.timing.scale(float(rule.params.get("after") or 0.0)))
        if self.servers.get(server.id) is not server or server.status != "running":
            return
        server.timings.mark("ssh_dropped")
        if self.hosts is not None and server.host_exists and hasattr(self.hosts, "drop_ssh"):
            down = self.timing.scale(float(rule.params.get("down") or 0.0))
            try:
                await self.hosts.drop_ssh(server.id, down=down)
            except Exception as exc:
                log.exception("drop_ssh failed for server %s", server.id)
                self.host_errors.append(f"drop_ssh {server.id}: {exc!r}")

    async def _vanish_later(self, server: Server, rule: FaultRule) -> None:
        await asyncio.sleep(self.timing.scale(float(rule.params.get("after") or 0.0)))
        await self.vanish(server)

    async def vanish(self, server: Server) -> None:
        """The server disappears: no action, no API call; its host is destroyed."""
        if self.servers.get(server.id) is not server:
            return
        if server.task is not None and server.task is not asyncio.current_task():
            server.task.cancel()
        self._remove(server)
        server.timings.mark("vanished")
        await self._host_call("destroy", server)

    async def _host_call(self, method: str, server: Server) -> None:
        if self.hosts is None or not server.host_exists:
            return
        try:
            await getattr(self.hosts, method)(server.id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("hosts.%s failed for server %s", method, server.id)
            self.host_errors.append(f"{method} {server.id}: {exc!r}")

    def _remove(self, server: Server) -> None:
        """Forget a server and everything that pointed at it."""
        self.servers.pop(server.id, None)
        if self._names["server"].get(server.name) == server.id:
            del self._names["server"][server.name]
        for nid in list(server.private):
            net = self.networks.get(nid)
            if net is not None:
                self._detach(server, net)
            else:
                self.private_pool.release(server.private.pop(nid).ip)
        for fw in self.firewalls.values():
            if server.id in fw.servers:
                fw.servers.remove(server.id)
        self._leave_group(server)
        self.public_pool.release(server.host_ip)
        for action in self.actions.values():
            if action.status == "running" and any(
                r["type"] == "server" and r["id"] == server.id for r in action.resources
            ) and action is not server.delete_action:
                action.finish({"code": "server_deleted", "message": "the server was deleted"})

    # -- servers: actions ----------------------------------------------------
    def _check_unlocked(self, server: Server) -> None:
        if server.status == "deleting":
            raise ApiError(423, "locked", "server is being deleted")
        if server.busy is not None and server.busy.status == "running":
            raise ApiError(423, "locked", f"server is locked by a running {server.busy.command} action")

    def _power_task(self, server: Server, coro: Any) -> None:
        if server.task is not None and not server.task.done():
            server.task.cancel()  # e.g. a boot still waiting for SSH
        server.task = self.spawn(coro)

    def delete_server(self, server_id: int) -> Action:
        server = self.server(server_id)
        if server.delete_action is not None:
            return server.delete_action
        action = self.new_action("delete_server", [(server.id, "server")])
        server.delete_action = action
        server.timings.mark("delete_requested")
        server.status = "deleting"
        old = server.task

        async def run() -> None:
            if old is not None and not old.done():
                old.cancel()
                with contextlib.suppress(BaseException):
                    await old
            # The power is cut at once and the action takes its own time, side by side: a
            # host slow to stop (a loaded machine) does not add to Hetzner's delete time.
            ok = await self.run_action(action, alongside=self._host_call("destroy", server))
            if not ok:
                # A delete action that failed leaves the server, powered off (still billed).
                server.delete_action = None
                server.status = "off"
                return
            server.timings.mark("deleted")
            self._remove(server)

        server.task = self.spawn(run())
        return action

    def power(self, server_id: int, command: str) -> Action:
        """poweroff, shutdown, poweron, reboot, reset."""
        server = self.server(server_id)
        self._check_unlocked(server)
        names = {
            "poweroff": "stop_server",
            "shutdown": "shutdown_server",
            "poweron": "start_server",
            "reboot": "reboot_server",
            "reset": "reset_server",
        }
        action = self.new_action(names[command], [(server.id, "server")])
        if command in ("poweroff", "shutdown"):
            if server.status == "off":
                return self.finish_now(action)  # nothing to do, still an action
            server.busy = action

            async def stop() -> None:
                if command == "shutdown":
                    server.status = "stopping"
                await self._host_call("power_off", server)
                ok = await self.run_action(action)
                server.busy = None
                if ok:
                    server.status = "off"
                    server.timings.mark("off")

            self._power_task(server, stop())
        elif command == "poweron":
            if server.status == "running":
                return self.finish_now(action)
            server.busy = action

            async def start() -> None:
                server.status = "starting"
                ok = await self.run_action(action)
                server.busy = None
                if ok:
                    await self._running(server)
                else:
                    server.status = "off"

            self._power_task(server, start())
        else:
            if server.status != "running":
                return self.finish_now(action)  # a reboot of a stopped server does nothing
            server.busy = action

            async def reboot() -> None:
                await self._host_call("power_off", server)
                ok = await self.run_action(action)
                server.busy = None
                if ok:
                    await self._running(server)

            self._power_task(server, reboot())
        return action

    def attach_network(self, server_id: int, body: dict[str, Any]) -> Action:
        server = self.server(server_id)
        net = self.networks.get(body["network"])
        if net is None:
            raise not_found("network")
        self._check_unlocked(server)
        self._attach(server, net, body.get("ip"), body.get("alias_ips") or ())
        action = self.new_action("attach_to_network", [(server.id, "server"), (net.id, "network")])
        self.spawn(self._run_attach(server, action))
        return action

    def detach_network(self, server_id: int, body: dict[str, Any]) -> Action:
        server = self.server(server_id)
        net = self.networks.get(body["network"])
        if net is None:
            raise not_found("network")
        if net.id not in server.private:
            raise ApiError(422, "server_not_attached", "server is not attached to the network")
        self._check_unlocked(server)
        self._detach(server, net)
        return self.finish_now(self.new_action("detach_from_network", [(server.id, "server"), (net.id, "network")]))

    def add_to_group(self, server_id: int, body: dict[str, Any]) -> Action:
        server = self.server(server_id)
        pg = self.placement_groups.get(body["placement_group"])
        if pg is None:
            raise not_found("placement group")
        if server.placement_group is not None:
            raise ApiError(422, "already_in_placement_group", "server is already in a placement group")
        if server.status != "off":
            raise ApiError(422, "server_not_stopped", "server must be powered off")
        self._check_unlocked(server)
        self._join_group(server, pg)
        return self.finish_now(
            self.new_action("add_to_placement_group", [(server.id, "server"), (pg.id, "placement_group")])
        )

    def remove_from_group(self, server_id: int) -> Action:
        server = self.server(server_id)
        if server.placement_group is None:
            raise ApiError(422, "not_in_placement_group", "server is not in a placement group")
        self._check_unlocked(server)
        pg_id = server.placement_group
        self._leave_group(server)
        return self.finish_now(
            self.new_action("remove_from_placement_group", [(server.id, "server"), (pg_id, "placement_group")])
        )

    # -- inventory -----------------------------------------------------------
    def resources(self) -> dict[str, list[dict[str, Any]]]:
        return {
            "servers": [self.server_json(s) for s in self.servers.values()],
            "ssh_keys": [k.to_json() for k in self.ssh_keys.values()],
            "networks": [n.to_json() for n in self.networks.values()],
            "firewalls": [self.firewall_json(f) for f in self.firewalls.values()],
            "placement_groups": [p.to_json() for p in self.placement_groups.values()],
            "images": [i.to_json() for i in self.snapshots.values()],
        }

    def iter_servers(self) -> Iterator[Server]:
        return iter(list(self.servers.values()))


# Static parts of a server's JSON, built once.
_ST_CACHE: dict[int, dict[str, Any]] = {}


def _server_type_json(st: ServerType) -> dict[str, Any]:
    if st.id not in _ST_CACHE:
        _ST_CACHE[st.id] = freeze(_deep_freeze(st.to_json()))
    return _ST_CACHE[st.id]


_LOC_CACHE: dict[int, dict[str, Any]] = {}


def _location_json(loc: Location) -> dict[str, Any]:
    if loc.id not in _LOC_CACHE:
        _LOC_CACHE[loc.id] = freeze(loc.to_json())
    return _LOC_CACHE[loc.id]


def _included_traffic(st: ServerType, loc: Location) -> int:
    for price in _server_type_json(st)["prices"]:
        if price["location"] == loc.name:
            return int(price["included_traffic"])
    return 0


_IMG_CACHE: dict[int, dict[str, Any]] = {}


def _image_json(img: Image) -> dict[str, Any]:
    if img.type != "system":  # snapshots change (status, labels)
        return img.to_json()
    if img.id not in _IMG_CACHE:
        _IMG_CACHE[img.id] = freeze(_deep_freeze(img.to_json()))
    return _IMG_CACHE[img.id]


def _deep_freeze(obj: Any) -> Any:
    """Mark every nested object of a shared, never-mutated JSON value as frozen."""
    if isinstance(obj, dict):
        for v in obj.values():
            _deep_freeze(v)
        freeze(obj)
    elif isinstance(obj, list):
        for v in obj:
            _deep_freeze(v)
    return obj
