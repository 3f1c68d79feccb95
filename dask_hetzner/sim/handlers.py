"""Route handlers: each turns one request into calls on the store and a reply.

Handlers are plain functions (no awaits), so a request's changes are atomic; the
route table is ``routes.py``; auth, validation and faults happen before, in ``app.py``.
"""

from __future__ import annotations

from typing import Any

from .catalog import LOCATIONS, LOCATIONS_BY_ID, SERVER_TYPES, SERVER_TYPES_BY_ID
from .listing import BASIC_SORT, labelled, name_filter, paginate, selector_filter, sort_items
from .pricing import pricing_json
from .replies import Ctx, Handler, Reply
from .store import Action, ApiError, not_found
from .store.views import server_type_json

_ACTION_SORT = {
    "id": lambda a: a.id,
    "command": lambda a: a.command,
    "status": lambda a: a.status,
    "started": lambda a: a.started,
    "finished": lambda a: a.finished,
}


def _action(action: Action, status: int = 201) -> Reply:
    return Reply(status, {"action": action.to_json()})


def _actions(actions: list[Action]) -> Reply:
    return Reply(201, {"actions": [a.to_json() for a in actions]})


# -- actions -------------------------------------------------------------------
def h_deprecated(ctx: Ctx) -> Reply:
    raise ApiError(
        410,
        "deprecated_api_endpoint",
        "API functionality was removed",
        {"announcement": "https://docs.hetzner.cloud/changelog#2026-06-02-datacenters-deprecated"},
    )


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
    return _action(ctx.store.core.action(ctx.path["id"]), 200)


def _touches(action: Action, rtype: str, rid: int | None) -> bool:
    return any(r["type"] == rtype and (rid is None or r["id"] == rid) for r in action.resources)


def scoped_actions(rtype: str) -> Handler:
    """GET /{kind}/actions and GET /{kind}/{id}/actions."""

    def handler(ctx: Ctx) -> Reply:
        rid = ctx.path.get("id")
        wanted = set(ctx.query.get("id") or [])
        out = [a for a in ctx.store.actions.values() if _touches(a, rtype, rid) and (not wanted or a.id in wanted)]
        if rid is not None:
            ctx.store.lookup(rtype, rid)
        if ctx.query.get("status"):
            out = [a for a in out if a.status in ctx.query["status"]]
        out = sort_items(out, ctx.query.get("sort"), _ACTION_SORT)
        return paginate(ctx, "actions", out, Action.to_json)

    return handler


def scoped_action(rtype: str) -> Handler:
    """GET /{kind}/actions/{id} and GET /{kind}/{id}/actions/{action_id}."""

    def handler(ctx: Ctx) -> Reply:
        if "action_id" in ctx.path:
            action = ctx.store.core.action(ctx.path["action_id"])
            rid: int | None = ctx.path["id"]
        else:
            action = ctx.store.core.action(ctx.path["id"])
            rid = None
        if not _touches(action, rtype, rid):
            raise not_found("action")
        return _action(action, 200)

    return handler


# -- catalog -------------------------------------------------------------------
def h_server_types(ctx: Ctx) -> Reply:
    items = sorted(name_filter(list(SERVER_TYPES), ctx), key=lambda st: st.id)
    return paginate(ctx, "server_types", items, server_type_json)


def h_server_type(ctx: Ctx) -> Reply:
    st = SERVER_TYPES_BY_ID.get(ctx.path["id"])
    if st is None:
        raise not_found("server type")
    return Reply(200, {"server_type": server_type_json(st)})


def h_pricing(ctx: Ctx) -> Reply:
    return Reply(200, pricing_json())


def h_locations(ctx: Ctx) -> Reply:
    items = sort_items(name_filter(list(LOCATIONS), ctx), ctx.query.get("sort"), BASIC_SORT)
    return paginate(ctx, "locations", items, lambda loc: loc.to_json())


def h_location(ctx: Ctx) -> Reply:
    loc = LOCATIONS_BY_ID.get(ctx.path["id"])
    if loc is None:
        raise not_found("location")
    return Reply(200, {"location": loc.to_json()})


# -- images --------------------------------------------------------------------
def h_images(ctx: Ctx) -> Reply:
    q = ctx.query
    items = name_filter(ctx.store.image_store.all(), ctx)
    if q.get("type"):
        items = [i for i in items if i.type in q["type"]]
    if q.get("status"):
        items = [i for i in items if i.status in q["status"]]
    if q.get("architecture"):
        items = [i for i in items if i.architecture == q["architecture"]]
    if q.get("bound_to"):
        items = []  # no backups in the simulator: nothing is bound to a server
    items = selector_filter(items, ctx, lambda i: i.labels)
    items = sort_items(items, q.get("sort"), BASIC_SORT)
    return paginate(ctx, "images", items, lambda i: i.to_json())


def h_image(ctx: Ctx) -> Reply:
    return Reply(200, {"image": ctx.store.image_store.get(ctx.path["id"]).to_json()})


def h_update_image(ctx: Ctx) -> Reply:
    return Reply(200, {"image": ctx.store.image_store.update(ctx.path["id"], ctx.body).to_json()})


def h_delete_image(ctx: Ctx) -> Reply:
    ctx.store.image_store.delete(ctx.path["id"])
    return Reply(204)


# -- ssh keys ------------------------------------------------------------------
def h_ssh_keys(ctx: Ctx) -> Reply:
    items = name_filter(list(ctx.store.ssh_keys.values()), ctx)
    if ctx.query.get("fingerprint") is not None:
        items = [k for k in items if k.fingerprint == ctx.query["fingerprint"]]
    items = selector_filter(items, ctx, lambda k: k.labels)
    items = sort_items(items, ctx.query.get("sort"), BASIC_SORT)
    return paginate(ctx, "ssh_keys", items, lambda k: k.to_json())


def h_create_ssh_key(ctx: Ctx) -> Reply:
    return Reply(201, {"ssh_key": ctx.store.ssh_key_store.create(ctx.body).to_json()})


def h_ssh_key(ctx: Ctx) -> Reply:
    return Reply(200, {"ssh_key": ctx.store.ssh_key_store.get(ctx.path["id"]).to_json()})


def h_update_ssh_key(ctx: Ctx) -> Reply:
    key = ctx.store.ssh_key_store.get(ctx.path["id"])
    ctx.store.core.update_named("ssh_key", key, ctx.body)
    return Reply(200, {"ssh_key": key.to_json()})


def h_delete_ssh_key(ctx: Ctx) -> Reply:
    ctx.store.ssh_key_store.delete(ctx.path["id"])
    return Reply(204)


# -- networks ------------------------------------------------------------------
def h_networks(ctx: Ctx) -> Reply:
    return paginate(ctx, "networks", labelled(list(ctx.store.networks.values()), ctx), lambda n: n.to_json())


def h_create_network(ctx: Ctx) -> Reply:
    return Reply(201, {"network": ctx.store.network_store.create(ctx.body).to_json()})


def h_network(ctx: Ctx) -> Reply:
    return Reply(200, {"network": ctx.store.network_store.get(ctx.path["id"]).to_json()})


def h_update_network(ctx: Ctx) -> Reply:
    net = ctx.store.network_store.get(ctx.path["id"])
    ctx.store.core.update_named("network", net, ctx.body)
    if ctx.body.get("expose_routes_to_vswitch") is not None:
        net.expose_routes_to_vswitch = bool(ctx.body["expose_routes_to_vswitch"])
    return Reply(200, {"network": net.to_json()})


def h_delete_network(ctx: Ctx) -> Reply:
    ctx.store.network_store.delete(ctx.path["id"])
    return Reply(204)


def h_add_subnet(ctx: Ctx) -> Reply:
    return _action(ctx.store.network_store.add_subnet(ctx.path["id"], ctx.body))


def h_delete_subnet(ctx: Ctx) -> Reply:
    return _action(ctx.store.network_store.delete_subnet(ctx.path["id"], ctx.body))


# -- firewalls -----------------------------------------------------------------
def h_firewalls(ctx: Ctx) -> Reply:
    items = labelled(list(ctx.store.firewalls.values()), ctx)
    return paginate(ctx, "firewalls", items, ctx.store.firewall_store.to_json)


def h_create_firewall(ctx: Ctx) -> Reply:
    fw, actions = ctx.store.firewall_store.create(ctx.body)
    return Reply(201, {"firewall": ctx.store.firewall_store.to_json(fw), "actions": [a.to_json() for a in actions]})


def h_firewall(ctx: Ctx) -> Reply:
    firewalls = ctx.store.firewall_store
    return Reply(200, {"firewall": firewalls.to_json(firewalls.get(ctx.path["id"]))})


def h_update_firewall(ctx: Ctx) -> Reply:
    fw = ctx.store.firewall_store.get(ctx.path["id"])
    ctx.store.core.update_named("firewall", fw, ctx.body)
    return Reply(200, {"firewall": ctx.store.firewall_store.to_json(fw)})


def h_delete_firewall(ctx: Ctx) -> Reply:
    ctx.store.firewall_store.delete(ctx.path["id"])
    return Reply(204)


def h_set_rules(ctx: Ctx) -> Reply:
    return _actions(ctx.store.firewall_store.set_rules(ctx.path["id"], ctx.body))


def h_apply_firewall(ctx: Ctx) -> Reply:
    return _actions(ctx.store.firewall_store.apply(ctx.path["id"], ctx.body))


def h_remove_firewall(ctx: Ctx) -> Reply:
    return _actions(ctx.store.firewall_store.remove(ctx.path["id"], ctx.body))


# -- placement groups ----------------------------------------------------------
def h_placement_groups(ctx: Ctx) -> Reply:
    items = name_filter(list(ctx.store.placement_groups.values()), ctx)
    if ctx.query.get("type"):
        items = [p for p in items if p.type in ctx.query["type"]]
    items = selector_filter(items, ctx, lambda p: p.labels)
    items = sort_items(items, ctx.query.get("sort"), BASIC_SORT)
    return paginate(ctx, "placement_groups", items, lambda p: p.to_json())


def h_create_placement_group(ctx: Ctx) -> Reply:
    return Reply(201, {"placement_group": ctx.store.group_store.create(ctx.body).to_json(), "action": None})


def h_placement_group(ctx: Ctx) -> Reply:
    return Reply(200, {"placement_group": ctx.store.group_store.get(ctx.path["id"]).to_json()})


def h_update_placement_group(ctx: Ctx) -> Reply:
    pg = ctx.store.group_store.get(ctx.path["id"])
    ctx.store.core.update_named("placement_group", pg, ctx.body)
    return Reply(200, {"placement_group": pg.to_json()})


def h_delete_placement_group(ctx: Ctx) -> Reply:
    ctx.store.group_store.delete(ctx.path["id"])
    return Reply(204)


# -- servers -------------------------------------------------------------------
def h_servers(ctx: Ctx) -> Reply:
    items = name_filter(list(ctx.store.servers.values()), ctx)
    if ctx.query.get("status"):
        wanted = set(ctx.query["status"])
        items = [s for s in items if s.status in wanted]
    items = selector_filter(items, ctx, lambda s: s.labels)
    items = sort_items(items, ctx.query.get("sort"), BASIC_SORT)
    return paginate(ctx, "servers", items, ctx.store.server_store.to_json)


def h_create_server(ctx: Ctx) -> Reply:
    created = ctx.store.create_server(ctx.body)
    body: dict[str, Any] = {
        "server": ctx.store.server_store.to_json(created.server),
        "action": created.action.to_json(),
        "next_actions": [a.to_json() for a in created.next_actions],
        "root_password": created.root_password,
    }
    return Reply(201, body)


def h_server(ctx: Ctx) -> Reply:
    servers = ctx.store.server_store
    return Reply(200, {"server": servers.to_json(servers.get(ctx.path["id"]))})


def h_update_server(ctx: Ctx) -> Reply:
    server = ctx.store.server_store.get(ctx.path["id"])
    ctx.store.core.update_named("server", server, ctx.body, hostname=True)
    return Reply(200, {"server": ctx.store.server_store.to_json(server)})


def h_delete_server(ctx: Ctx) -> Reply:
    return _action(ctx.store.server_actions.delete(ctx.path["id"]), 200)


def power(command: str) -> Handler:
    def handler(ctx: Ctx) -> Reply:
        return _action(ctx.store.server_actions.power(ctx.path["id"], command))

    return handler


def h_create_image(ctx: Ctx) -> Reply:
    img, action = ctx.store.server_actions.create_image(ctx.path["id"], ctx.body or {})
    return Reply(201, {"image": img.to_json(), "action": action.to_json()})


def h_attach(ctx: Ctx) -> Reply:
    return _action(ctx.store.server_actions.attach_network(ctx.path["id"], ctx.body))


def h_detach(ctx: Ctx) -> Reply:
    return _action(ctx.store.server_actions.detach_network(ctx.path["id"], ctx.body))


def h_add_to_group(ctx: Ctx) -> Reply:
    return _action(ctx.store.server_actions.add_to_group(ctx.path["id"], ctx.body))


def h_remove_from_group(ctx: Ctx) -> Reply:
    return _action(ctx.store.server_actions.remove_from_group(ctx.path["id"]))
