"""Networks and their subnets: ``/networks``, and servers' attachments to them."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .. import catalog
from ..schema import FieldError
from .actions import Action, Core
from .addresses import AddressPool
from .base import (
    ApiError,
    get_or_404,
    invalid_input,
    iso,
    labels_field_errors,
    name_errors,
    not_found,
    parse_cidr,
)
from .server_model import PrivateNic, Server

SERVERS_PER_NETWORK_MAX = 100
_PRIVATE_RANGES = [ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")]


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


def _subnet(net_range: ipaddress.IPv4Network, sub: dict[str, Any], taken: list[Subnet], where: str) -> Subnet:
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
        rng = parse_cidr(sub["ip_range"])
        if rng is None or rng.prefixlen > 30:
            raise invalid_input([(f"{where}.ip_range", "invalid ip range")])
        if not rng.subnet_of(net_range):
            raise invalid_input([(f"{where}.ip_range", "subnet must be within the network's ip_range")])
        if any(rng.overlaps(t.ip_range) for t in taken):
            raise invalid_input([(f"{where}.ip_range", "subnet overlaps with another subnet")])
    return Subnet(sub["type"], rng, sub["network_zone"], str(net_range.network_address + 1))


def _routes(net_range: ipaddress.IPv4Network, routes: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for i, route in enumerate(routes):
        dest, gw = parse_cidr(route["destination"]), route["gateway"]
        try:
            gw_ip = ipaddress.IPv4Address(gw)
        except ValueError:
            gw_ip = None
        if dest is None or gw_ip is None or gw_ip not in net_range:
            raise invalid_input([(f"routes.{i}", "invalid route")])
        out.append({"destination": str(dest), "gateway": str(gw_ip)})
    return out


class NetworkStore:
    def __init__(self, core: Core, pool: AddressPool, servers: dict[int, Server]) -> None:
        self.core = core
        self.pool = pool  # private addresses
        self.servers = servers
        self.items: dict[int, Network] = {}
        self._mac = 0

    def get(self, network_id: int) -> Network:
        return get_or_404(self.items, network_id, "network")

    def create(self, body: dict[str, Any]) -> Network:
        errors = name_errors(body["name"]) + labels_field_errors(body.get("labels"))
        net_range = parse_cidr(body["ip_range"])
        if net_range is None or net_range.prefixlen > 24:
            errors.append(FieldError("ip_range", "ip_range must be a network of at least /24"))
        elif not any(net_range.subnet_of(p) for p in _PRIVATE_RANGES):
            errors.append(FieldError("ip_range", "ip_range must be within a private (RFC 1918) range"))
        if errors:
            raise invalid_input(errors)
        assert net_range is not None
        self.core.claim_name("network", body["name"], -1)
        subnets: list[Subnet] = []
        for i, sub in enumerate(body.get("subnets") or []):
            subnets.append(_subnet(net_range, sub, subnets, f"subnets.{i}"))
        routes = _routes(net_range, body.get("routes") or [])
        net = Network(
            id=self.core.next_id("network"),
            name=body["name"],
            ip_range=net_range,
            subnets=subnets,
            routes=routes,
            labels=dict(body.get("labels") or {}),
            created=time.time(),
            expose_routes_to_vswitch=bool(body.get("expose_routes_to_vswitch", False)),
        )
        self.items[net.id] = net
        self.core.names["network"][net.name] = net.id
        return net

    def add_subnet(self, network_id: int, body: dict[str, Any]) -> Action:
        net = self.get(network_id)
        net.subnets.append(_subnet(net.ip_range, body, net.subnets, "ip_range"))
        return self.core.finish_now(self.core.new_action("add_subnet", [(net.id, "network")]))

    def delete_subnet(self, network_id: int, body: dict[str, Any]) -> Action:
        net = self.get(network_id)
        rng = parse_cidr(body["ip_range"])
        sub = next((s for s in net.subnets if s.ip_range == rng), None)
        if sub is None:
            raise not_found("subnet")
        net.subnets.remove(sub)
        return self.core.finish_now(self.core.new_action("delete_subnet", [(net.id, "network")]))

    def delete(self, network_id: int) -> None:
        net = self.get(network_id)
        # "Attached resources will be detached automatically."
        for sid in list(net.servers):
            server = self.servers.get(sid)
            if server is not None:
                self.detach(server, net)
        del self.items[net.id]
        self.core.names["network"].pop(net.name, None)

    # -- servers' attachments ------------------------------------------------
    def attach(self, server: Server, net: Network, ip: Any = None, alias_ips: Iterable[Any] = ()) -> None:
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
            ip = str(wanted)
            if self._taken(net, ip):
                raise ApiError(422, "ip_not_available", "the requested IP is already in use in the network")
        addr, _ = self.pool.allocate()
        self._mac += 1
        mac = "86:00:00:" + ":".join(f"{b:02x}" for b in self._mac.to_bytes(3, "big"))
        server.private[net.id] = PrivateNic(
            ip=addr, mac=mac, alias_ips=[str(a) for a in alias_ips], requested_ip=ip
        )
        net.servers.add(server.id)

    def _taken(self, net: Network, ip: str) -> bool:
        """Whether a server of the network holds that explicit address (docs/simulator.md,
        "Private IPs": the address handed out is a loopback one, the requested one is
        still unique in its network, as on Hetzner)."""
        for sid in net.servers:
            server = self.servers.get(sid)
            nic = server.private.get(net.id) if server is not None else None
            if nic is not None and nic.requested_ip == ip:
                return True
        return False

    async def run_attach(self, server: Server, action: Action) -> None:
        """Run a create's next action; an attach_to_network shows its NIC once it succeeds."""
        if await self.core.run_action(action) and action.command == "attach_to_network":
            for res in action.resources:
                nic = server.private.get(res["id"]) if res["type"] == "network" else None
                if nic is not None:
                    nic.attached = True

    def detach(self, server: Server, net: Network) -> None:
        nic = server.private.pop(net.id, None)
        if nic is not None:
            self.pool.release(nic.ip)
        net.servers.discard(server.id)

    def detach_all(self, server: Server) -> None:
        """A server goes away: its addresses return to the pool."""
        for nid in list(server.private):
            net = self.items.get(nid)
            if net is not None:
                self.detach(server, net)
            else:
                self.pool.release(server.private.pop(nid).ip)
