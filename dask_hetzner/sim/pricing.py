"""``GET /pricing`` and the bill: what Hetzner charges, and for how many started hours.

Hetzner bills a server from its creation until it is deleted, whatever its power state,
at its hourly price for every started hour (a few minutes cost a full hour), never above
the monthly price; its Primary IPv4 is billed on top, per hour as well
(docs.hetzner.com/cloud/billing/faq). The ledger keeps that bill for every server, deleted
ones included, so tests and benchmarks read what a run would cost. With the realistic
profile an hour is time-scaled like every other duration.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .catalog import _REGION, LOCATIONS, SERVER_TYPES, ServerType, _gross, _money
from .labels import parse_selector

# Net EUR per month of a Primary IP (IPv6 is free), before the location's factor.
PRIMARY_IP_MONTHLY = {"ipv4": Decimal("0.50"), "ipv6": Decimal("0")}
_VAT_RATE = "19.00"
_HOURS_PER_MONTH = Decimal(730)


def primary_ip_hourly_net(kind: str, location: str) -> Decimal:
    monthly = PRIMARY_IP_MONTHLY[kind] * _REGION[location][0]
    return (monthly / _HOURS_PER_MONTH).quantize(Decimal("0.0001"))


def server_hourly_net(st: ServerType, location: str) -> Decimal:
    """As ``GET /server_types`` prices it (catalog.ServerType._prices)."""
    return (st.monthly_eur * _REGION[location][0] / _HOURS_PER_MONTH).quantize(Decimal("0.0001"))


def _ip_prices(kind: str) -> list[dict[str, Any]]:
    out = []
    for loc in LOCATIONS:
        hourly, monthly = primary_ip_hourly_net(kind, loc.name), PRIMARY_IP_MONTHLY[kind] * _REGION[loc.name][0]
        out.append(
            {
                "location": loc.name,
                "price_hourly": {"net": _money(hourly), "gross": _gross(hourly)},
                "price_monthly": {"net": _money(monthly), "gross": _gross(monthly)},
            }
        )
    return out


def pricing_json() -> dict[str, Any]:
    """The body of ``GET /pricing`` (spec operation ``get_pricing``)."""
    per_gb = {"net": _money(Decimal("0.0440")), "gross": _gross(Decimal("0.0440"))}
    floating = [
        {"type": kind, "prices": [{"location": p["location"], "price_monthly": p["price_monthly"]} for p in _ip_prices(kind)]}
        for kind in ("ipv4", "ipv6")
    ]
    return {
        "pricing": {
            "currency": "EUR",
            "vat_rate": _VAT_RATE,
            "primary_ips": [{"type": kind, "prices": _ip_prices(kind)} for kind in ("ipv4", "ipv6")],
            "floating_ips": floating,
            "floating_ip": {"price_monthly": floating[0]["prices"][0]["price_monthly"]},
            "image": {"price_per_gb_month": per_gb},
            "volume": {"price_per_gb_month": per_gb},
            "server_backup": {"percentage": "20.00"},
            "server_types": [
                {"id": st.id, "name": st.name, "prices": st.to_json()["prices"]} for st in SERVER_TYPES
            ],
            "load_balancer_types": [],
        }
    }


@dataclass
class Line:
    """One server's line on the bill."""

    server_id: int
    name: str
    labels: dict[str, str]
    hourly_gross: Decimal  # the server and its Primary IPv4
    created: float  # time.time()
    deleted: float | None = None


class Ledger:
    """Every server the project ever had, with what it costs per started hour."""

    def __init__(self, hour: float) -> None:
        self.hour = hour  # seconds of one billed hour (time-scaled with the realistic profile)
        self.lines: dict[int, Line] = {}

    def opened(self, server_id: int, name: str, labels: dict[str, str], st: ServerType, location: str, ipv4: bool) -> None:
        net = server_hourly_net(st, location) + (primary_ip_hourly_net("ipv4", location) if ipv4 else Decimal(0))
        self.lines[server_id] = Line(server_id, name, dict(labels), Decimal(_gross(net)), time.time())

    def closed(self, server_id: int) -> None:
        line = self.lines.get(server_id)
        if line is not None and line.deleted is None:
            line.deleted = time.time()

    def hours(self, line: Line, now: float | None = None) -> int:
        """Started hours: a server that existed at all costs at least one."""
        end = line.deleted if line.deleted is not None else (now or time.time())
        return max(1, math.ceil((end - line.created) / self.hour - 1e-9))

    def bill(self, label_selector: str | None = None) -> dict[str, Any]:
        """EUR gross so far and server-hours, of every server matching ``label_selector``."""
        selector = parse_selector(label_selector) if label_selector else None
        now = time.time()
        lines = [x for x in self.lines.values() if selector is None or selector.matches(x.labels)]
        total = sum((x.hourly_gross * self.hours(x, now) for x in lines), Decimal(0))
        return {
            "eur": float(total),
            "server_hours": sum(self.hours(x, now) for x in lines),
            "servers": {x.name if x.deleted is None else f"{x.name}#{x.server_id}": self.hours(x, now) for x in lines},
        }
