"""The HTTP API under ``/v1``: routing, auth, errors, pagination, rate-limit headers.

One catch-all aiohttp handler does the routing itself so that unknown paths,
wrong methods and malformed input get Hetzner's error bodies, never aiohttp's.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import re
import secrets
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from .faults import API_FAULTS, FaultRule, FaultSet
from .labels import SelectorError, parse_selector
from .ratelimit import RateLimiter, RateLimitState
from .schema import Spec, SpecViolation
from .store import Action, ApiError, Effects, Store, invalid_input, not_found
from .timing import Timing

log = logging.getLogger(__name__)

PER_PAGE_DEFAULT = 25
PER_PAGE_MAX = 50
QUERY_ERROR_STATUS = 400  # invalid query parameters (label selector, sort, page ...)


@dataclass
class Stats:
    """Requests by ``"METHOD /template"``, answers by status, and 429s."""

    requests: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)  # 2xx answers by "METHOD /template"
    statuses: Counter[int] = field(default_factory=Counter)
    rate_limited: int = 0
    total: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "rate_limited": self.rate_limited,
            "requests": dict(self.requests),
            "ok": dict(self.ok),
            "statuses": dict(self.statuses),
        }

    def __getitem__(self, key: str) -> Any:  # stats["total"], like the dict of as_dict()
        return self.as_dict()[key]

    def reset(self) -> None:
        self.requests.clear()
        self.ok.clear()
        self.statuses.clear()
        self.rate_limited = 0
        self.total = 0


@dataclass
class Ctx:
    store: Store
    path: dict[str, int]
    query: dict[str, Any]
    body: Any
    url: str  # absolute URL of the request without its query (for Link headers)
    raw_query: list[tuple[str, str]]


@dataclass
class Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Ctx], Reply]


@dataclass
class Route:
    method: str
    template: str
    operation_id: str
    handler: Handler
    regex: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        pattern = re.sub(r"\{(\w+)\}", lambda m: f"(?P<{m.group(1)}>\\d+)", self.template)
        self.regex = re.compile(f"^{pattern}$")


# --------------------------------------------------------------------------- listing
def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, "") if value is None else (1, value)


def _keyed(getter: Callable[[Any], Any], obj: Any) -> tuple[int, Any]:
    return _sort_key(getter(obj))


def sort_items(items: list[Any], sorts: Iterable[str] | None, getters: dict[str, Callable[[Any], Any]]) -> list[Any]:
    items = sorted(items, key=lambda o: getters["id"](o))
    for spec in reversed(list(sorts or [])):
        name, _, direction = spec.partition(":")
        getter = getters.get(name)
        if getter is None:  # the spec enum already rejected unknown fields
            continue
        items.sort(key=functools.partial(_keyed, getter), reverse=direction == "desc")
    return items


def selector_filter(items: list[Any], ctx: Ctx, labels: Callable[[Any], dict[str, str]]) -> list[Any]:
    text = ctx.query.get("label_selector")
    if text is None or text == "":
        return items
    try:
        sel = parse_selector(text)
    except SelectorError as exc:
        raise invalid_input([("label_selector", str(exc))], status=QUERY_ERROR_STATUS) from None
    return [o for o in items if sel.matches(labels(o))]


def paginate(ctx: Ctx, key: str, items: list[Any], render: Callable[[Any], Any]) -> Reply:
    page = ctx.query.get("page", 1)
    per_page = ctx.query.get("per_page", PER_PAGE_DEFAULT)
    if page < 1:
        raise invalid_input([("page", "page must be >= 1")], status=QUERY_ERROR_STATUS)
    if per_page < 1:
        raise invalid_input([("per_page", "per_page must be >= 1")], status=QUERY_ERROR_STATUS)
    per_page = min(per_page, PER_PAGE_MAX)
    total = len(items)
    last = max(1, math.ceil(total / per_page))
    chunk = items[(page - 1) * per_page : page * per_page]
    prev_page = page - 1 if page > 1 else None
    next_page = page + 1 if page < last else None
    body = {
        key: [render(o) for o in chunk],
        "meta": {
            "pagination": {
                "page": page,
                "per_page": per_page,
                "previous_page": prev_page,
                "next_page": next_page,
                "last_page": last,
                "total_entries": total,
            }
        },
    }
    links = []
    kept = [(k, v) for k, v in ctx.raw_query if k not in ("page", "per_page")]
    for rel, target in (("prev", prev_page), ("next", next_page), ("last", last)):
        if target is not None:
            qs = urlencode([*kept, ("page", str(target)), ("per_page", str(per_page))])
            links.append(f'<{ctx.url}?{qs}>; rel="{rel}"')
    return Reply(200, body, {"Link": ", ".join(links)} if links else {})


# --------------------------------------------------------------------------- handlers
def _name_filter(items: list[Any], ctx: Ctx) -> list[Any]:
    name = ctx.query.get("name")
    return items if name is None else [o for o in items if getattr(o, "name", None) == name]


_BASIC_SORT = {"id": lambda o: o.id, "name": lambda o: o.name, "created": lambda o: o.created}


def _actions_reply(actions: list[Action], ctx: Ctx) -> Reply:
    if ctx.query.get("status"):
        actions = [a for a in actions if a.status in ctx.query["status"]]
    getters = {
        "id": lambda a: a.id,
        "command": lambda a: a.command,
        "status": lambda a: a.status,
        "started": lambda a: a.started,
        "finished": lambda a: a.finished,
    }
    actions = sort_items(actions, ctx.query.get("sort"), getters)
    return paginate(ctx, "actions", actions, Action.to_json)


def _scoped_actions(rtype: str) -> Handler:
    """GET /{kind}/actions and GET /{kind}/{id}/actions."""

    def handler(ctx: Ctx) -> Reply:
        rid = ctx.path.get("id")
        wanted = set(ctx.query.get("id") or [])
        out = [
            a
            for a in ctx.store.actions.values()
            if any(r["type"] == rtype and (rid is None or r["id"] == rid) for r in a.resources)
            and (not wanted or a.id in wanted)
        ]
        if rid is not None:
            _lookup(ctx.store, rtype, rid)
        return _actions_reply(out, ctx)

    return handler


def _scoped_action(rtype: str) -> Handler:
    """GET /{kind}/actions/{id} and GET /{kind}/{id}/actions/{action_id}."""

    def handler(ctx: Ctx) -> Reply:
        if "action_id" in ctx.path:
            action = ctx.store.action(ctx.path["action_id"])
            rid: int | None = ctx.path["id"]
        else:
            action = ctx.store.action(ctx.path["id"])
            rid = None
        if not any(r["type"] == rtype and (rid is None or r["id"] == rid) for r in action.resources):
            raise not_found("action")
        return Reply(200, {"action": action.to_json()})

    return handler


def _lookup(store: Store, rtype: str, rid: int) -> Any:
    getter = {
        "server": store.server,
        "network": store.network,
        "firewall": store.firewall,
        "image": store.image,
    }[rtype]
    return getter(rid)


def h_deprecated(ctx: Ctx) -> Reply:
    raise ApiError(
        410,
        "deprecated_api_endpoint",
        "API functionality was removed",
        {"announcement": "https://docs.hetzner.cloud/changelog#2026-06-02-datacenters-deprecated"},
    )


# actions
def h_get_actions(ctx: Ctx) -> Reply:
    ids = ctx.query.get("id")
    if not ids:
        raise ApiError(
            410,
            "deprecated_api_endpoint",
            "listing all actions was removed; filter by id",
            {"announcement": "https://docs.hetzner.cloud/changelog#2023-07-20-actions-list-endpoint-is-deprecated"},
        )
    found = [ctx.store.actions[i] for i in dict.fromkeys(ids) if i in ctx.store.actions]
    return Reply(200, {"actions": [a.to_json() for a in found]})


def h_get_action(ctx: Ctx) -> Reply:
    return Reply(200, {"action": ctx.store.action(ctx.path["id"]).to_json()})


# catalog
def h_server_types(ctx: Ctx) -> Reply:
    from .catalog import SERVER_TYPES
    from .store import _server_type_json

    items = _name_filter(list(SERVER_TYPES), ctx)
    items = sorted(items, key=lambda st: st.id)
    return paginate(ctx, "server_types", items, _server_type_json)


def h_server_type(ctx: Ctx) -> Reply:
    from .catalog import SERVER_TYPES_BY_ID
    from .store import _server_type_json

    st = SERVER_TYPES_BY_ID.get(ctx.path["id"])
    if st is None:
        raise not_found("server type")
    return Reply(200, {"server_type": _server_type_json(st)})


def h_locations(ctx: Ctx) -> Reply:
    from .catalog import LOCATIONS

    items = sort_items(_name_filter(list(LOCATIONS), ctx), ctx.query.get("sort"), _BASIC_SORT)
    return paginate(ctx, "locations", items, lambda loc: loc.to_json())


def h_location(ctx: Ctx) -> Reply:
    from .catalog import LOCATIONS_BY_ID

    loc = LOCATIONS_BY_ID.get(ctx.path["id"])
    if loc is None:
        raise not_found("location")
    return Reply(200, {"location": loc.to_json()})


# images
def h_images(ctx: Ctx) -> Reply:
    q = ctx.query
    items = _name_filter(ctx.store.all_images(), ctx)
    if q.get("type"):
        items = [i for i in items if i.type in q["type"]]
    if q.get("status"):
        items = [i for i in items if i.status in q["status"]]
    if q.get("architecture"):
        items = [i for i in items if i.architecture == q["architecture"]]
    if q.get("bound_to"):
        items = []  # no backups in the simulator: nothing is bound to a server
    items = selector_filter(items, ctx, lambda i: i.labels)
    items = sort_items(items, q.get("sort"), _BASIC_SORT)
    return paginate(ctx, "images", items, lambda i: i.to_json())


def h_image(ctx: Ctx) -> Reply:
    return Reply(200, {"image": ctx.store.image(ctx.path["id"]).to_json()})


def h_update_image(ctx: Ctx) -> Reply:
    return Reply(200, {"image": ctx.store.update_image(ctx.path["id"], ctx.body).to_json()})


def h_delete_image(ctx: Ctx) -> Reply:
    ctx.store.delete_image(ctx.path["id"])
    return Reply(204)


# ssh keys
def h_ssh_keys(ctx: Ctx) -> Reply:
    items = _name_filter(list(ctx.store.ssh_keys.values()), ctx)
    if ctx.query.get("fingerprint") is not None:
        items = [k for k in items if k.fingerprint == ctx.query["fingerprint"]]
    items = selector_filter(items, ctx, lambda k: k.labels)
    items = sort_items(items, ctx.query.get("sort"), _BASIC_SORT)
    return paginate(ctx, "ssh_keys", items, lambda k: k.to_json())


def h_create_ssh_key(ctx: Ctx) -> Reply:
    return Reply(201, {"ssh_key": ctx.store.create_ssh_key(ctx.body).to_json()})


def h_ssh_key(ctx: Ctx) -> Reply:
    return Reply(200, {"ssh_key": ctx.store.ssh_key(ctx.path["id"]).to_json()})


def h_update_ssh_key(ctx: Ctx) -> Reply:
    key = ctx.store.ssh_key(ctx.path["id"])
    ctx.store.update_named("ssh_key", key, ctx.body)
    return Reply(200, {"ssh_key": key.to_json()})


def h_delete_ssh_key(ctx: Ctx) -> Reply:
    ctx.store.delete_ssh_key(ctx.path["id"])
    return Reply(204)


# networks
def h_networks(ctx: Ctx) -> Reply:
    items = selector_filter(_name_filter(list(ctx.store.networks.values()), ctx), ctx, lambda n: n.labels)
    items = sort_items(items, ctx.query.get("sort"), _BASIC_SORT)
    return paginate(ctx, "networks", items, lambda n: n.to_json())


def h_create_network(ctx: Ctx) -> Reply:
    return Reply(201, {"network": ctx.store.create_network(ctx.body).to_json()})


def h_network(ctx: Ctx) -> Reply:
    return Reply(200, {"network": ctx.store.network(ctx.path["id"]).to_json()})


def h_update_network(ctx: Ctx) -> Reply:
    net = ctx.store.network(ctx.path["id"])
    ctx.store.update_named("network", net, ctx.body)
    if ctx.body.get("expose_routes_to_vswitch") is not None:
        net.expose_routes_to_vswitch = bool(ctx.body["expose_routes_to_vswitch"])
    return Reply(200, {"network": net.to_json()})


def h_delete_network(ctx: Ctx) -> Reply:
    ctx.store.delete_network(ctx.path["id"])
    return Reply(204)


def h_add_subnet(ctx: Ctx) -> Reply:
    return Reply(201, {"action": ctx.store.add_subnet(ctx.path["id"], ctx.body).to_json()})


def h_delete_subnet(ctx: Ctx) -> Reply:
    return Reply(201, {"action": ctx.store.delete_subnet(ctx.path["id"], ctx.body).to_json()})


# firewalls
def h_firewalls(ctx: Ctx) -> Reply:
    items = selector_filter(_name_filter(list(ctx.store.firewalls.values()), ctx), ctx, lambda f: f.labels)
    items = sort_items(items, ctx.query.get("sort"), _BASIC_SORT)
    return paginate(ctx, "firewalls", items, ctx.store.firewall_json)


def h_create_firewall(ctx: Ctx) -> Reply:
    fw, actions = ctx.store.create_firewall(ctx.body)
    return Reply(201, {"firewall": ctx.store.firewall_json(fw), "actions": [a.to_json() for a in actions]})


def h_firewall(ctx: Ctx) -> Reply:
    return Reply(200, {"firewall": ctx.store.firewall_json(ctx.store.firewall(ctx.path["id"]))})


def h_update_firewall(ctx: Ctx) -> Reply:
    fw = ctx.store.firewall(ctx.path["id"])
    ctx.store.update_named("firewall", fw, ctx.body)
    return Reply(200, {"firewall": ctx.store.firewall_json(fw)})


def h_delete_firewall(ctx: Ctx) -> Reply:
    ctx.store.delete_firewall(ctx.path["id"])
    return Reply(204)


def _actions_list(actions: list[Action]) -> Reply:
    return Reply(201, {"actions": [a.to_json() for a in actions]})


def h_set_rules(ctx: Ctx) -> Reply:
    return _actions_list(ctx.store.set_rules(ctx.path["id"], ctx.body))


def h_apply_firewall(ctx: Ctx) -> Reply:
    return _actions_list(ctx.store.apply_firewall(ctx.path["id"], ctx.body))


def h_remove_firewall(ctx: Ctx) -> Reply:
    return _actions_list(ctx.store.remove_firewall(ctx.path["id"], ctx.body))


# placement groups
def h_placement_groups(ctx: Ctx) -> Reply:
    items = _name_filter(list(ctx.store.placement_groups.values()), ctx)
    if ctx.query.get("type"):
        items = [p for p in items if p.type in ctx.query["type"]]
    items = selector_filter(items, ctx, lambda p: p.labels)
    items = sort_items(items, ctx.query.get("sort"), _BASIC_SORT)
    return paginate(ctx, "placement_groups", items, lambda p: p.to_json())


def h_create_placement_group(ctx: Ctx) -> Reply:
    return Reply(201, {"placement_group": ctx.store.create_placement_group(ctx.body).to_json(), "action": None})


def h_placement_group(ctx: Ctx) -> Reply:
    return Reply(200, {"placement_group": ctx.store.placement_group(ctx.path["id"]).to_json()})


def h_update_placement_group(ctx: Ctx) -> Reply:
    pg = ctx.store.placement_group(ctx.path["id"])
    ctx.store.update_named("placement_group", pg, ctx.body)
    return Reply(200, {"placement_group": pg.to_json()})


def h_delete_placement_group(ctx: Ctx) -> Reply:
    ctx.store.delete_placement_group(ctx.path["id"])
    return Reply(204)


# servers
def h_servers(ctx: Ctx) -> Reply:
    store = ctx.store
    items = _name_filter(list(store.servers.values()), ctx)
    if ctx.query.get("status"):
        wanted = set(ctx.query["status"])
        items = [s for s in items if s.status in wanted]
    items = selector_filter(items, ctx, lambda s: s.labels)
    items = sort_items(items, ctx.query.get("sort"), _BASIC_SORT)
    return paginate(ctx, "servers", items, store.server_json)


def h_create_server(ctx: Ctx) -> Reply:
    out = ctx.store.create_server(ctx.body)
    return Reply(
        201,
        {
            "server": ctx.store.server_json(out["server"]),
            "action": out["action"].to_json(),
            "next_actions": [a.to_json() for a in out["next_actions"]],
            "root_password": out["root_password"],
        },
    )


def h_server(ctx: Ctx) -> Reply:
    return Reply(200, {"server": ctx.store.server_json(ctx.store.server(ctx.path["id"]))})


def h_update_server(ctx: Ctx) -> Reply:
    server = ctx.store.server(ctx.path["id"])
    ctx.store.update_named("server", server, ctx.body, hostname=True)
    return Reply(200, {"server": ctx.store.server_json(server)})


def h_delete_server(ctx: Ctx) -> Reply:
    return Reply(200, {"action": ctx.store.delete_server(ctx.path["id"]).to_json()})


def _power(command: str) -> Handler:
    def handler(ctx: Ctx) -> Reply:
        return Reply(201, {"action": ctx.store.power(ctx.path["id"], command).to_json()})

    return handler


def h_create_image(ctx: Ctx) -> Reply:
    img, action = ctx.store.create_image(ctx.path["id"], ctx.body or {})
    return Reply(201, {"image": img.to_json(), "action": action.to_json()})


def h_attach(ctx: Ctx) -> Reply:
    return Reply(201, {"action": ctx.store.attach_network(ctx.path["id"], ctx.body).to_json()})


def h_detach(ctx: Ctx) -> Reply:
    return Reply(201, {"action": ctx.store.detach_network(ctx.path["id"], ctx.body).to_json()})


def h_add_to_group(ctx: Ctx) -> Reply:
    return Reply(201, {"action": ctx.store.add_to_group(ctx.path["id"], ctx.body).to_json()})


def h_remove_from_group(ctx: Ctx) -> Reply:
    return Reply(201, {"action": ctx.store.remove_from_group(ctx.path["id"]).to_json()})


def _routes() -> list[Route]:
    r: list[Route] = []

    def add(method: str, template: str, op: str, handler: Handler) -> None:
        r.append(Route(method, template, op, handler))

    add("GET", "/actions", "get_actions", h_get_actions)
    add("GET", "/actions/{id}", "get_action", h_get_action)
    add("GET", "/datacenters", "list_datacenters", h_deprecated)
    add("GET", "/datacenters/{id}", "get_datacenter", h_deprecated)
    add("GET", "/server_types", "list_server_types", h_server_types)
    add("GET", "/server_types/{id}", "get_server_type", h_server_type)
    add("GET", "/locations", "list_locations", h_locations)
    add("GET", "/locations/{id}", "get_location", h_location)
    add("GET", "/images", "list_images", h_images)
    add("GET", "/images/{id}", "get_image", h_image)
    add("PUT", "/images/{id}", "update_image", h_update_image)
    add("DELETE", "/images/{id}", "delete_image", h_delete_image)
    add("GET", "/ssh_keys", "list_ssh_keys", h_ssh_keys)
    add("POST", "/ssh_keys", "create_ssh_key", h_create_ssh_key)
    add("GET", "/ssh_keys/{id}", "get_ssh_key", h_ssh_key)
    add("PUT", "/ssh_keys/{id}", "update_ssh_key", h_update_ssh_key)
    add("DELETE", "/ssh_keys/{id}", "delete_ssh_key", h_delete_ssh_key)
    add("GET", "/networks", "list_networks", h_networks)
    add("POST", "/networks", "create_network", h_create_network)
    add("GET", "/networks/{id}", "get_network", h_network)
    add("PUT", "/networks/{id}", "update_network", h_update_network)
    add("DELETE", "/networks/{id}", "delete_network", h_delete_network)
    add("POST", "/networks/{id}/actions/add_subnet", "add_network_subnet", h_add_subnet)
    add("POST", "/networks/{id}/actions/delete_subnet", "delete_network_subnet", h_delete_subnet)
    add("GET", "/firewalls", "list_firewalls", h_firewalls)
    add("POST", "/firewalls", "create_firewall", h_create_firewall)
    add("GET", "/firewalls/{id}", "get_firewall", h_firewall)
    add("PUT", "/firewalls/{id}", "update_firewall", h_update_firewall)
    add("DELETE", "/firewalls/{id}", "delete_firewall", h_delete_firewall)
    add("POST", "/firewalls/{id}/actions/set_rules", "set_firewall_rules", h_set_rules)
    add("POST", "/firewalls/{id}/actions/apply_to_resources", "apply_firewall_to_resources", h_apply_firewall)
    add("POST", "/firewalls/{id}/actions/remove_from_resources", "remove_firewall_from_resources", h_remove_firewall)
    add("GET", "/placement_groups", "list_placement_groups", h_placement_groups)
    add("POST", "/placement_groups", "create_placement_group", h_create_placement_group)
    add("GET", "/placement_groups/{id}", "get_placement_group", h_placement_group)
    add("PUT", "/placement_groups/{id}", "update_placement_group", h_update_placement_group)
    add("DELETE", "/placement_groups/{id}", "delete_placement_group", h_delete_placement_group)
    add("GET", "/servers", "list_servers", h_servers)
    add("POST", "/servers", "create_server", h_create_server)
    add("GET", "/servers/{id}", "get_server", h_server)
    add("PUT", "/servers/{id}", "update_server", h_update_server)
    add("DELETE", "/servers/{id}", "delete_server", h_delete_server)
    for verb, op in (
        ("poweroff", "poweroff_server"),
        ("poweron", "poweron_server"),
        ("shutdown", "shutdown_server"),
        ("reboot", "reboot_server"),
        ("reset", "reset_server"),
    ):
        add("POST", f"/servers/{{id}}/actions/{verb}", op, _power(verb))
    add("POST", "/servers/{id}/actions/create_image", "create_server_image", h_create_image)
    add("POST", "/servers/{id}/actions/attach_to_network", "attach_server_to_network", h_attach)
    add("POST", "/servers/{id}/actions/detach_from_network", "detach_server_from_network", h_detach)
    add("POST", "/servers/{id}/actions/add_to_placement_group", "add_server_to_placement_group", h_add_to_group)
    add(
        "POST",
        "/servers/{id}/actions/remove_from_placement_group",
        "remove_server_from_placement_group",
        h_remove_from_group,
    )
    for kind, rtype in (("servers", "server"), ("networks", "network"), ("firewalls", "firewall"), ("images", "image")):
        add("GET", f"/{kind}/actions", f"list_{kind}_actions", _scoped_actions(rtype))
        add("GET", f"/{kind}/actions/{{id}}", f"get_{kind}_action", _scoped_action(rtype))
        add("GET", f"/{kind}/{{id}}/actions", f"list_{rtype}_actions", _scoped_actions(rtype))
        add("GET", f"/{kind}/{{id}}/actions/{{action_id}}", f"get_{rtype}_action", _scoped_action(rtype))
    return r


ROUTES = _routes()


# --------------------------------------------------------------------------- application
class Api:
    """State shared by every request of one simulator."""

    def __init__(
        self,
        *,
        store: Store,
        spec: Spec,
        faults: FaultSet,
        ratelimiter: RateLimiter,
        timing: Timing,
        token: str,
        validate_responses: bool = False,
    ):
        self.store = store
        self.spec = spec
        self.faults = faults
        self.ratelimiter = ratelimiter
        self.timing = timing
        self.token = token
        self.validate_responses = validate_responses
        self.stats = Stats()
        self.violations: list[str] = []
        self._validated: OrderedDict[bytes, None] = OrderedDict()
        self._spec_paths = [
            (re.compile("^" + re.sub(r"\{\w+\}", "[^/]+", op.path) + "$"), op.method) for op in spec.operations()
        ]
        for route in ROUTES:  # a typo in an operation id would only show up at runtime
            spec.operation_by_id(route.operation_id)

    # -- helpers -------------------------------------------------------------
    def _match(self, method: str, path: str) -> tuple[Route | None, dict[str, int], set[str]]:
        allowed: set[str] = set()
        for route in ROUTES:
            m = route.regex.match(path)
            if m is None:
                continue
            if route.method == method:
                return route, {k: int(v) for k, v in m.groupdict().items()}, allowed
            allowed.add(route.method)
        return None, {}, allowed

    def _spec_methods(self, path: str) -> set[str]:
        return {method for regex, method in self._spec_paths if regex.match(path)}

    def _check(self, operation_id: str | None, reply: Reply, text: bytes | None) -> Reply:
        if not self.validate_responses or operation_id is None:
            return reply
        key = hashlib.blake2b(
            operation_id.encode() + str(reply.status).encode() + (text or b""), digest_size=16
        ).digest()
        if key in self._validated:  # identical answers (catalog pages, polls) validate once
            return reply
        errors = self._errors(operation_id, reply)
        if errors:
            self.violations.extend(errors)
            log.error("spec violation: %s", errors)
            return Reply(
                500,
                {"error": {"code": "server_error", "message": "simulator spec violation: " + errors[0], "details": None}},
                reply.headers,
            )
        self._remember(key)
        return reply

    def _errors(self, operation_id: str, reply: Reply) -> list[str]:
        """Spec errors of an answer; big lists are validated item by item, and an
        item already seen (same JSON) is not validated again, so polling stays cheap."""
        body = reply.body
        list_keys = [k for k, v in body.items() if isinstance(v, list)] if isinstance(body, dict) else []
        if len(list_keys) != 1 or "meta" not in body or len(body[list_keys[0]]) < 2:
            return self.spec.response_errors(operation_id, reply.status, body)
        key = list_keys[0]
        item_validator = self.spec.item_validator(operation_id, reply.status, key)
        if item_validator is None:
            return self.spec.response_errors(operation_id, reply.status, body)
        items = body[key]
        errors = self.spec.response_errors(operation_id, reply.status, {**body, key: items[:1]})
        for i, item in enumerate(items[1:], start=1):
            digest = hashlib.blake2b(
                operation_id.encode() + json.dumps(item, sort_keys=True).encode(), digest_size=16
            ).digest()
            if digest in self._validated:
                continue
            item_errors = [f"{operation_id} {reply.status} at /{key}/{i}: {e.message[:300]}" for e in item_validator.iter_errors(item)]
            if item_errors:
                errors += item_errors
            else:
                self._remember(digest)
        return errors

    def _remember(self, digest: bytes) -> None:
        self._validated[digest] = None
        if len(self._validated) > 50000:
            self._validated.popitem(last=False)

    @staticmethod
    def _error(exc: ApiError, headers: dict[str, str] | None = None) -> Reply:
        return Reply(exc.status, exc.body(), dict(headers or {}))

    def _fault_reply(self, rule: FaultRule, rl: RateLimitState) -> Reply:
        kind = API_FAULTS[rule.kind]
        assert kind.status is not None and kind.code is not None
        details: dict[str, Any] | None = None
        if rule.kind == "resource_limit_exceeded":
            details = {"limits": [{"name": "server_limit"}]}
        elif rule.kind == "uniqueness_error":
            details = {"fields": [{"name": str(rule.params.get("field") or "name")}]}
        headers = {}
        if rule.kind == "rate_limit":
            headers = {**rl.headers(), "RateLimit-Remaining": "0"}
        return Reply(kind.status, ApiError(kind.status, kind.code, kind.message, details).body(), headers)

    # -- the one handler -----------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        method = request.method.upper()
        full = request.path
        self.stats.total += 1
        rl = self.ratelimiter.consume()
        headers = {**rl.headers(), "X-Correlation-Id": secrets.token_hex(8)}
        info: dict[str, Any] = {"op": None, "template": "?"}
        try:
            reply = await self._dispatch(request, method, full, rl, info)
        except ApiError as exc:
            reply = self._error(exc)
        except Exception as exc:  # a simulator bug must still answer like Hetzner would
            log.exception("simulator error on %s %s", method, full)
            self.violations.append(f"unhandled {exc!r} on {method} {full}")
            reply = Reply(500, ApiError(500, "server_error", f"simulator error: {exc!r}").body())
        text = None if reply.body is None else json.dumps(reply.body).encode()
        checked = self._check(info["op"], reply, text)
        if checked is not reply:
            reply, text = checked, json.dumps(checked.body).encode()
        key = f"{method} {info['template']}"
        self.stats.requests[key] += 1
        self.stats.statuses[reply.status] += 1
        if 200 <= reply.status < 300:
            self.stats.ok[key] += 1
        if reply.status == 429:
            self.stats.rate_limited += 1
        headers.update(reply.headers)
        if reply.body is None:
            return web.Response(status=reply.status, headers=headers)
        return web.Response(status=reply.status, body=text, headers=headers, content_type="application/json")

    async def _dispatch(
        self, request: web.Request, method: str, full: str, rl: RateLimitState, info: dict[str, Any]
    ) -> Reply:
        if not (full == "/v1" or full.startswith("/v1/")):
            raise not_found()
        path = full[3:] or "/"
        auth = request.headers.get("Authorization", "")
        if auth != f"Bearer {self.token}":
            raise ApiError(401, "unauthorized", "unable to authenticate")
        route, path_params, allowed = self._match(method, path)
        if route is not None:
            info["op"], info["template"] = route.operation_id, route.template
        if not rl.allowed:
            return Reply(
                429, ApiError(429, "rate_limit_exceeded", f"limit of {rl.limit} requests per hour reached").body()
            )
        latency = self.timing.api_latency(
            create_server=route is not None and route.operation_id == "create_server"
        )
        if latency > 0:
            await asyncio.sleep(latency)
        if route is None:
            spec_methods = self._spec_methods(path)
            if allowed or (spec_methods and method not in spec_methods):
                raise ApiError(405, "method_not_allowed", "the request method is not allowed")
            if spec_methods:
                raise ApiError(404, "not_found", "not implemented by the dask_hetzner simulator")
            raise not_found()
        op = self.spec.operation_by_id(route.operation_id)

        body: Any = None
        if method in ("POST", "PUT"):
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise ApiError(413, "request_entity_too_large", "request body too large") from None
            if raw.strip():
                try:
                    body = json.loads(raw)
                except (ValueError, UnicodeDecodeError):
                    raise ApiError(400, "json_error", "invalid JSON in request body") from None
            elif op.has_body:
                body = {}

        # Fault rules: errors answer at once (or after applying), effects shape actions.
        effects = Effects()
        delay = 0.0
        after_error: FaultRule | None = None
        for rule in self.faults.api_rules():
            if not rule.matches_request(method, path, body, self.store.server_count()):
                continue
            if rule.kind == "slow_action":
                effects.slow.append(rule)
            elif rule.kind == "action_error":
                effects.errors.append(rule)
            elif rule.kind == "slow_response" or (rule.kind == "uniqueness_error" and "delay" in rule.params):
                delay = max(delay, self.timing.scale(float(rule.params.get("delay") or 0.0)))
            elif rule.params.get("after_effect"):
                after_error = after_error or rule
            else:
                return self._fault_reply(rule, rl)

        query_multi: dict[str, list[str]] = {}
        for k, v in request.query.items():
            query_multi.setdefault(k, []).append(v)
        query, qerrors = self.spec.parse_query(op.operation_id, query_multi)
        if qerrors:
            raise invalid_input(qerrors, status=QUERY_ERROR_STATUS)
        if op.has_body:
            errors = self.spec.request_errors(op.operation_id, body)
            if errors:
                raise invalid_input(errors)
        ctx = Ctx(
            store=self.store,
            path=path_params,
            query=query,
            body=body,
            url=f"{request.scheme}://{request.host}{full}",
            raw_query=list(request.query.items()),
        )
        self.store.effects = effects
        try:
            reply = route.handler(ctx)
        except ApiError as exc:
            reply = self._error(exc)
        finally:
            self.store.effects = None
        if delay > 0:
            await asyncio.sleep(delay)
        if after_error is not None:
            reply = self._fault_reply(after_error, rl)
        return reply

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


def check_routes_against_spec(spec: Spec) -> None:
    """Every route must be an operation of the spec (used by tests)."""
    for route in ROUTES:
        op = spec.operation_by_id(route.operation_id)
        if (op.method, op.path) != (route.method, route.template):
            raise SpecViolation(f"route {route.method} {route.template} is not {op.operation_id}")
