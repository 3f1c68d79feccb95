"""JSON views: catalog parts (built once, frozen) and the server as the API shows it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..catalog import Image, Location, ServerType
from ..schema import freeze
from .base import iso

if TYPE_CHECKING:
    from .firewalls import Firewall
    from .placement_groups import PlacementGroup
    from .server_model import Server

# Static parts of a server's JSON, built once.
_ST_CACHE: dict[int, dict[str, Any]] = {}
_LOC_CACHE: dict[int, dict[str, Any]] = {}
_IMG_CACHE: dict[int, dict[str, Any]] = {}


def server_type_json(st: ServerType) -> dict[str, Any]:
    if st.id not in _ST_CACHE:
        _ST_CACHE[st.id] = freeze(deep_freeze(st.to_json()))
    return _ST_CACHE[st.id]


def location_json(loc: Location) -> dict[str, Any]:
    if loc.id not in _LOC_CACHE:
        _LOC_CACHE[loc.id] = freeze(loc.to_json())
    return _LOC_CACHE[loc.id]


def included_traffic(st: ServerType, loc: Location) -> int:
    for price in server_type_json(st)["prices"]:
        if price["location"] == loc.name:
            return int(price["included_traffic"])
    return 0


def image_json(img: Image) -> dict[str, Any]:
    if img.type != "system":  # snapshots change (status, labels)
        return img.to_json()
    if img.id not in _IMG_CACHE:
        _IMG_CACHE[img.id] = freeze(deep_freeze(img.to_json()))
    return _IMG_CACHE[img.id]


def deep_freeze(obj: Any) -> Any:
    """Mark every nested object of a shared, never-mutated JSON value as frozen."""
    if isinstance(obj, dict):
        for v in obj.values():
            deep_freeze(v)
        freeze(obj)
    elif isinstance(obj, list):
        for v in obj:
            deep_freeze(v)
    return obj


def _public_net(server: Server, firewalls: list[Firewall]) -> dict[str, Any]:
    return {
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
        "firewalls": [{"id": fw.id, "status": "applied"} for fw in firewalls],
    }


def server_json(server: Server, firewalls: list[Firewall], pg: PlacementGroup | None) -> dict[str, Any]:
    return {
        "id": server.id,
        "name": server.name,
        "status": server.status,
        "created": iso(server.created),
        "public_net": _public_net(server, firewalls),
        "private_net": [
            {"network": nid, "ip": nic.ip, "alias_ips": list(nic.alias_ips), "mac_address": nic.mac}
            for nid, nic in server.private.items()
            if nic.attached
        ],
        "server_type": server_type_json(server.server_type),
        "location": location_json(server.location),
        "image": image_json(server.image),
        "iso": None,
        "rescue_enabled": False,
        "locked": False,
        "backup_window": None,
        "outgoing_traffic": 0,
        "ingoing_traffic": 0,
        "included_traffic": included_traffic(server.server_type, server.location),
        "protection": {"delete": False, "rebuild": False},
        "labels": dict(server.labels),
        "volumes": [],
        "load_balancers": [],
        "primary_disk_size": server.server_type.disk,
        "placement_group": pg.to_json() if pg else None,
    }
