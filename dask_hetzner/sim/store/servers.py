"""Servers: the model, ``POST /servers`` validation and creation, and forgetting a server.

What happens to a server after it is created (lifecycle, power, deletion, its
actions) is in ``lifecycle.py`` and ``server_actions.py``.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from .. import catalog
from ..catalog import Image, Location, ServerType
from ..pricing import Ledger
from ..schema import FieldError
from ..timing import ServerTimings
from .actions import Action, Core
from .addresses import AddressPool
from .base import (
    ApiError,
    get_or_404,
    hostname_errors,
    id_or_name,
    invalid_input,
    labels_field_errors,
    limit_exceeded,
)
from .firewalls import FIREWALLS_PER_SERVER_MAX, Firewall, FirewallStore
from .images import ImageStore
from .networks import Network, NetworkStore
from .placement_groups import SPREAD_GROUP_MAX, PlacementGroup, PlacementGroupStore, group_full
from .server_model import Server
from .ssh_keys import SSHKey, SSHKeyStore
from .views import server_json

USER_DATA_MAX = 32 * 1024


@dataclass
class Refs:
    """What a create request refers to, resolved."""

    server_type: ServerType
    location: Location
    image: Image
    keys: list[SSHKey]
    networks: list[Network]
    firewalls: list[Firewall]
    placement_group: PlacementGroup | None


@dataclass
class Created:
    """A new server, its actions and the root password (None with SSH keys)."""

    server: Server
    action: Action
    start: Action | None
    extra: list[Action]
    root_password: str | None

    @property
    def next_actions(self) -> list[Action]:
        return [a for a in (self.start, *self.extra) if a is not None]


def _body_errors(body: dict[str, Any]) -> list[FieldError]:
    errors = hostname_errors(body["name"]) + labels_field_errors(body.get("labels"))
    user_data = body.get("user_data")
    if user_data is not None and len(user_data.encode()) > USER_DATA_MAX:
        errors.append(FieldError("user_data", "user_data is limited to 32 KiB"))
    if body.get("volumes"):
        errors.append(FieldError("volumes", "volumes are not supported by the simulator"))
    pn = body.get("public_net") or {}
    if pn.get("ipv4") is not None or pn.get("ipv6") is not None:
        errors.append(FieldError("public_net", "primary IPs are not supported by the simulator"))
    return errors


def _server_type(value: Any) -> ServerType:
    sid, name = id_or_name(value)
    st = catalog.SERVER_TYPES_BY_ID.get(sid) if sid is not None else None
    st = st or (catalog.SERVER_TYPES_BY_NAME.get(name) if name else None)
    if st is None:
        raise invalid_input([("server_type", "server type not found")])
    return st


def _location(value: Any) -> Location:
    lid, name = id_or_name(value)
    loc = catalog.LOCATIONS_BY_ID.get(lid) if lid is not None else None
    loc = loc or (catalog.LOCATIONS_BY_NAME.get(name) if name else None)
    if loc is None:
        raise invalid_input([("location", "location not found")])
    return loc


def _check_orderable(st: ServerType, loc: Location) -> None:
    if st.deprecated:
        raise ApiError(
            412,
            "resource_unavailable",
            f'Server Type "{st.name}" is unavailable in "{loc.name}" and can no longer be ordered',
        )
    if loc.name not in st.locations:
        # Not a sold-out type but one never offered here: Hetzner answers 422, not 412
        # (docs/simulator.md, "Deliberate behaviours").
        raise ApiError(422, "invalid_input", "unsupported location for server type", {})
    if not st.orderable_in(loc.name):
        raise ApiError(
            412,
            "resource_unavailable",
            "unable to provision servers for this location, try with a different location or try later",
        )


class ServerStore:
    def __init__(
        self,
        core: Core,
        *,
        table: dict[int, Server],
        pool: AddressPool,
        ssh_keys: SSHKeyStore,
        images: ImageStore,
        networks: NetworkStore,
        firewalls: FirewallStore,
        groups: PlacementGroupStore,
        server_limit: int | None,
    ) -> None:
        self.core = core
        self.pool = pool  # public addresses
        self.ssh_keys = ssh_keys
        self.images = images
        self.networks = networks
        self.firewalls = firewalls
        self.groups = groups
        self.server_limit = server_limit
        self.items = table  # shared with the kinds that look servers up
        self.timings: dict[int, ServerTimings] = {}
        # The bill: an hour is time-scaled like every other duration (0: real hours).
        self.ledger = Ledger(3600.0 * (core.timing.time_scale or 1.0))

    def get(self, server_id: int) -> Server:
        return get_or_404(self.items, server_id, "server")

    def to_json(self, server: Server) -> dict[str, Any]:
        return server_json(server, self.firewalls.of(server), self.groups.of(server))

    # -- creation ------------------------------------------------------------
    def create(self, body: dict[str, Any]) -> Created:
        """Validate, then create the server with its actions (the caller starts its lifecycle)."""
        errors = _body_errors(body)
        if errors:
            raise invalid_input(errors)
        refs = self._resolve(body)
        self.core.claim_name("server", body["name"], -1)
        if self.server_limit is not None and len(self.items) >= self.server_limit:
            raise limit_exceeded("server limit exceeded", "server_limit")
        _check_orderable(refs.server_type, refs.location)
        if refs.placement_group is not None and len(refs.placement_group.servers) >= SPREAD_GROUP_MAX:
            raise group_full(refs.placement_group.id)
        server = self._build(body, refs)
        self._link(server, refs)
        return self._actions(server, body, refs)

    def _resolve(self, body: dict[str, Any]) -> Refs:
        st = _server_type(body["server_type"])
        loc = _location(body.get("location") or "fsn1")
        image = self.images.resolve(body["image"], st.architecture)
        keys = self.ssh_keys.resolve(body.get("ssh_keys") or [])
        networks = []
        for i, nid in enumerate(body.get("networks") or []):
            net = self.networks.items.get(nid)
            if net is None:
                raise invalid_input([(f"networks.{i}", f"network {nid} not found")])
            if not any(s.network_zone == loc.network_zone for s in net.subnets):
                raise ApiError(422, "no_subnet_available", f"network {nid} has no subnet in {loc.network_zone}")
            networks.append(net)
        firewalls = []
        for i, ref in enumerate(body.get("firewalls") or []):
            fw = self.firewalls.items.get(ref["firewall"])
            if fw is None:
                raise invalid_input([(f"firewalls.{i}.firewall", f"firewall {ref['firewall']} not found")])
            firewalls.append(fw)
        if len(firewalls) > FIREWALLS_PER_SERVER_MAX:
            raise invalid_input([("firewalls", "a server can have at most 5 firewalls")])
        pg = None
        if body.get("placement_group") is not None:
            pg = self.groups.items.get(body["placement_group"])
            if pg is None:
                raise invalid_input([("placement_group", "placement group not found")])
        return Refs(st, loc, image, keys, networks, firewalls, pg)

    def _build(self, body: dict[str, Any], refs: Refs) -> Server:
        sid = self.core.next_id("server")
        pn = body.get("public_net") or {}
        enable_v4 = pn.get("enable_ipv4", True) is not False
        enable_v6 = pn.get("enable_ipv6", True) is not False
        host_ip, n = self.pool.allocate()
        timings = ServerTimings(server_id=sid, name=body["name"])
        timings.mark("requested")
        return Server(
            id=sid,
            name=body["name"],
            server_type=refs.server_type,
            location=refs.location,
            image=refs.image,
            labels=dict(body.get("labels") or {}),
            created=time.time(),
            host_ip=host_ip,
            ipv4=host_ip if enable_v4 else None,
            ipv4_id=self.core.next_id("primary_ip") if enable_v4 else None,
            ipv6=f"2001:db8:{self.pool.block:x}:{n:x}::/64" if enable_v6 else None,
            ipv6_id=self.core.next_id("primary_ip") if enable_v6 else None,
            user_data=body.get("user_data"),
            authorized_keys=[k.public_key for k in refs.keys],
            timings=timings,
        )

    def _link(self, server: Server, refs: Refs) -> None:
        """Register the server and join it to its networks, firewalls and group."""
        self.items[server.id] = server
        self.timings[server.id] = server.timings
        self.core.names["server"][server.name] = server.id
        self.ledger.opened(
            server.id, server.name, server.labels, server.server_type, server.location.name, server.ipv4 is not None
        )
        for net in refs.networks:
            self.networks.attach(server, net)
        for fw in refs.firewalls:
            if server.id not in fw.servers:
                fw.servers.append(server.id)
        if refs.placement_group is not None:
            self.groups.join(server, refs.placement_group)

    def _actions(self, server: Server, body: dict[str, Any], refs: Refs) -> Created:
        sid, timing, drawn = server.id, self.core.timing, server.timings.drawn
        snapshot_gb = (server.image.image_size or 0.0) if server.image.type != "system" else 0.0
        drawn["create"] = timing.create_server(snapshot_gb)  # from a snapshot: its copy too
        create = self.core.new_action("create_server", [(sid, "server")], duration=drawn["create"])
        drawn["create"] = create.duration if create.duration is not None else float("inf")
        start_after = body.get("start_after_create")
        start = None
        if start_after is None or start_after:
            drawn["start"] = timing.start_server()
            start = self.core.new_action("start_server", [(sid, "server")], duration=drawn["start"])
            drawn["start"] = start.duration if start.duration is not None else float("inf")
        extra = [self.core.new_action("attach_to_network", [(sid, "server"), (n.id, "network")]) for n in refs.networks]
        extra += [self.core.new_action("apply_firewall", [(f.id, "firewall"), (sid, "server")]) for f in refs.firewalls]
        password = None if refs.keys else secrets.token_urlsafe(15)
        return Created(server, create, start, extra, password)

    # -- removal -------------------------------------------------------------
    def remove(self, server: Server) -> None:
        """Forget a server and everything that pointed at it."""
        self.items.pop(server.id, None)
        self.ledger.closed(server.id)
        if self.core.names["server"].get(server.name) == server.id:
            del self.core.names["server"][server.name]
        self.networks.detach_all(server)
        self.firewalls.forget_server(server.id)
        self.groups.leave(server)
        self.pool.release(server.host_ip)
        for action in self.core.actions.values():
            if action.status == "running" and any(
                r["type"] == "server" and r["id"] == server.id for r in action.resources
            ) and action is not server.delete_action:
                action.finish({"code": "server_deleted", "message": "the server was deleted"})
