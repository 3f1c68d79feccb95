"""The simulated catalog: locations, server types with prices, system images.

Names, sizes and availability follow Hetzner's late-2026 line-up; prices are
plausible values (real ones change often, so clients must read them, never
hard-code them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

CATALOG_CREATED = "2024-01-01T00:00:00Z"


@dataclass(frozen=True)
class Location:
    id: int
    name: str
    description: str
    country: str
    city: str
    latitude: float
    longitude: float
    network_zone: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "country": self.country,
            "city": self.city,
            "latitude": self.latitude,
            "longitude": self.longitude,
            "network_zone": self.network_zone,
        }


LOCATIONS: list[Location] = [
    Location(1, "fsn1", "Falkenstein DC Park 1", "DE", "Falkenstein", 50.47612, 12.370071, "eu-central"),
    Location(2, "nbg1", "Nuremberg DC Park 1", "DE", "Nuremberg", 49.452102, 11.076665, "eu-central"),
    Location(3, "hel1", "Helsinki DC Park 1", "FI", "Helsinki", 60.169855, 24.938379, "eu-central"),
    Location(4, "ash", "Ashburn, VA", "US", "Ashburn, VA", 39.045821, -77.487073, "us-east"),
    Location(5, "hil", "Hillsboro, OR", "US", "Hillsboro, OR", 45.54222, -122.95194, "us-west"),
    Location(6, "sin", "Singapore", "SG", "Singapore", 1.283333, 103.833333, "ap-southeast"),
]
LOCATIONS_BY_NAME = {loc.name: loc for loc in LOCATIONS}
LOCATIONS_BY_ID = {loc.id: loc for loc in LOCATIONS}
NETWORK_ZONES = sorted({loc.network_zone for loc in LOCATIONS})
EU = ("fsn1", "nbg1", "hel1")
ALL = tuple(loc.name for loc in LOCATIONS)

# Per-location factor on the EU net price, included traffic (TB) and traffic price.
_REGION = {
    "fsn1": (Decimal("1"), 20, Decimal("1.00")),
    "nbg1": (Decimal("1"), 20, Decimal("1.00")),
    "hel1": (Decimal("1"), 20, Decimal("1.00")),
    "ash": (Decimal("1.2"), 1, Decimal("1.20")),
    "hil": (Decimal("1.2"), 1, Decimal("1.20")),
    "sin": (Decimal("1.35"), 0.5, Decimal("7.40")),
}
_VAT = Decimal("1.19")
_TB = 1024**4
_DEPRECATION = {"announced": "2025-10-16T00:00:00Z", "unavailable_after": "2026-01-01T00:00:00Z"}


def _money(value: Decimal) -> str:
    return f"{value.quantize(Decimal('1.0000000000'))}"


def _gross(value: Decimal) -> str:
    return f"{(value * _VAT).quantize(Decimal('1.0000000000000000'))}"


@dataclass(frozen=True)
class ServerType:
    id: int
    name: str
    cores: int
    memory: float
    disk: int
    architecture: str
    cpu_type: str
    category: str
    monthly_eur: Decimal
    locations: tuple[str, ...]
    sold_out: frozenset[str] = frozenset()
    deprecated: bool = False

    def orderable_in(self, location: str) -> bool:
        return not self.deprecated and location in self.locations and location not in self.sold_out

    def _prices(self) -> list[dict[str, Any]]:
        out = []
        for name in self.locations:
            factor, traffic_tb, per_tb = _REGION[name]
            monthly = self.monthly_eur * factor
            hourly = (monthly / Decimal(730)).quantize(Decimal("0.0001"))
            out.append(
                {
                    "location": name,
                    "price_hourly": {"net": _money(hourly), "gross": _gross(hourly)},
                    "price_monthly": {"net": _money(monthly), "gross": _gross(monthly)},
                    "included_traffic": int(traffic_tb * _TB),
                    "price_per_tb_traffic": {"net": _money(per_tb), "gross": _gross(per_tb)},
                }
            )
        return out

    def to_json(self) -> dict[str, Any]:
        deprecation = dict(_DEPRECATION) if self.deprecated else None
        return {
            "id": self.id,
            "name": self.name,
            "description": self.name.upper(),
            "cores": self.cores,
            "memory": self.memory,
            "disk": self.disk,
            "deprecated": self.deprecated,
            "deprecation": deprecation,
            "prices": self._prices(),
            "storage_type": "local",
            "cpu_type": self.cpu_type,
            "category": self.category,
            "architecture": self.architecture,
            "locations": [
                {
                    "id": LOCATIONS_BY_NAME[name].id,
                    "name": name,
                    "deprecation": dict(_DEPRECATION) if self.deprecated else None,
                    "available": self.orderable_in(name),
                    "recommended": self.orderable_in(name) and self.category != "dedicated",
                }
                for name in self.locations
            ],
        }


def _t(id_: int, name: str, cores: int, memory: float, disk: int, price: str, **kw: Any) -> ServerType:
    defaults: dict[str, Any] = {
        "architecture": "x86",
        "cpu_type": "shared",
        "category": "regular_purpose",
        "locations": ALL,
    }
    defaults.update(kw)
    return ServerType(id_, name, cores, memory, disk, monthly_eur=Decimal(price), **defaults)


_COST = {"category": "cost_optimized", "locations": EU}
_ARM = {"architecture": "arm", "category": "cost_optimized", "locations": EU}
_DED = {"cpu_type": "dedicated", "category": "general_purpose"}
_RETIRED = {"deprecated": True, "locations": ALL}

SERVER_TYPES: list[ServerType] = [
    # Retired: still listed, no longer orderable anywhere.
    _t(22, "cpx11", 2, 2.0, 40, "4.35", **_RETIRED),
    _t(23, "cpx21", 3, 4.0, 80, "7.55", **_RETIRED),
    _t(24, "cpx31", 4, 8.0, 160, "13.60", **_RETIRED),
    _t(25, "cpx41", 8, 16.0, 240, "25.20", **_RETIRED),
    _t(26, "cpx51", 16, 32.0, 360, "54.90", **_RETIRED),
    _t(104, "cx22", 2, 4.0, 40, "3.79", category="cost_optimized", deprecated=True, locations=EU),
    _t(105, "cx32", 4, 8.0, 80, "6.80", category="cost_optimized", deprecated=True, locations=EU),
    _t(106, "cx42", 8, 16.0, 160, "16.40", category="cost_optimized", deprecated=True, locations=EU),
    _t(107, "cx52", 16, 32.0, 320, "32.40", category="cost_optimized", deprecated=True, locations=EU),
    # Shared x86, cost-optimised (EU only).
    _t(114, "cx23", 2, 4.0, 40, "3.49", **_COST),
    _t(115, "cx33", 4, 8.0, 80, "5.49", **_COST),
    _t(116, "cx43", 8, 16.0, 160, "9.49", **_COST),
    _t(117, "cx53", 16, 32.0, 320, "17.49", **_COST),
    # Shared AMD, everywhere.
    _t(108, "cpx12", 1, 2.0, 40, "4.49"),
    _t(109, "cpx22", 2, 4.0, 80, "7.99"),
    _t(110, "cpx32", 4, 8.0, 160, "13.99", sold_out=frozenset({"sin"})),
    _t(111, "cpx42", 8, 16.0, 320, "25.49"),
    _t(112, "cpx52", 12, 24.0, 480, "36.49", sold_out=frozenset({"hil"})),
    _t(113, "cpx62", 16, 32.0, 640, "49.49"),
    # Arm (EU only).
    _t(45, "cax11", 2, 4.0, 40, "3.99", **_ARM),
    _t(93, "cax21", 4, 8.0, 80, "6.99", **_ARM),
    _t(94, "cax31", 8, 16.0, 160, "13.49", **_ARM),
    _t(95, "cax41", 16, 32.0, 320, "26.49", sold_out=frozenset({"hel1"}), **_ARM),
    # Dedicated vCPU, everywhere.
    _t(96, "ccx13", 2, 8.0, 80, "12.99", **_DED),
    _t(97, "ccx23", 4, 16.0, 160, "25.99", **_DED),
    _t(98, "ccx33", 8, 32.0, 240, "51.49", **_DED),
    _t(99, "ccx43", 16, 64.0, 360, "102.49", **_DED),
    _t(100, "ccx53", 32, 128.0, 600, "204.49", **_DED),
    _t(101, "ccx63", 48, 192.0, 960, "306.49", sold_out=frozenset({"sin"}), **_DED),
]
SERVER_TYPES_BY_NAME = {st.name: st for st in SERVER_TYPES}
SERVER_TYPES_BY_ID = {st.id: st for st in SERVER_TYPES}


@dataclass
class Image:
    """A system image or a snapshot."""

    id: int
    type: str  # system | snapshot
    name: str | None
    description: str
    os_flavor: str
    os_version: str | None
    architecture: str
    disk_size: float
    created: str
    image_size: float | None = None
    status: str = "available"
    created_from: dict[str, Any] | None = None
    labels: dict[str, str] = field(default_factory=dict)
    rapid_deploy: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "status": self.status,
            "name": self.name,
            "description": self.description,
            "image_size": self.image_size,
            "disk_size": self.disk_size,
            "created": self.created,
            "created_from": dict(self.created_from) if self.created_from else None,
            "bound_to": None,
            "os_flavor": self.os_flavor,
            "os_version": self.os_version,
            "rapid_deploy": self.rapid_deploy,
            "protection": {"delete": False},
            "deprecated": None,
            "deleted": None,
            "labels": dict(self.labels),
            "architecture": self.architecture,
        }


def system_images() -> list[Image]:
    """Fresh system image objects (one per name and architecture)."""
    out = []
    base = 161547260
    for i, (name, flavor, version, desc) in enumerate(
        [
            ("ubuntu-22.04", "ubuntu", "22.04", "Ubuntu 22.04"),
            ("debian-12", "debian", "12", "Debian 12"),
            ("ubuntu-24.04", "ubuntu", "24.04", "Ubuntu 24.04"),
            ("debian-13", "debian", "13", "Debian 13"),
        ]
    ):
        for j, arch in enumerate(("x86", "arm")):
            out.append(
                Image(
                    id=base + 2 * i + j,
                    type="system",
                    name=name,
                    description=desc,
                    os_flavor=flavor,
                    os_version=version,
                    architecture=arch,
                    disk_size=5,
                    created=CATALOG_CREATED,
                )
            )
    return out
