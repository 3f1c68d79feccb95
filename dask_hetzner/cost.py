"""What a cluster costs per hour, by the API's prices, and the ``max_hourly_cost`` policy.

Prices are gross EUR per hour. A server may get any type of its role's preference list, in
the location or a fallback: a planned server is priced at the dearest of those pairs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from .cloud import ConfigError, ServerInfo, ServerTypeInfo, preferences
from .settings import ClusterSettings

Types = Mapping[str, ServerTypeInfo]


class CostLimitError(ConfigError):
    """A size whose hourly price is above ``max_hourly_cost``; raised before anything is created."""


def price(types: Types, server_type: str, locations: list[str]) -> float:
    """Gross EUR/h of one server of ``server_type``: the dearest of ``locations``; 0 if unknown."""
    info = types.get(server_type)
    return 0.0 if info is None else info.price(locations)


def role_prices(s: ClusterSettings, types: Types | None) -> tuple[float, float] | None:
    """Gross EUR/h of the scheduler's server and of one worker's; None before the catalog is read."""
    if types is None:
        return None
    return (
        preferences.dearest(types, s.scheduler_server_type, s.locations),
        preferences.dearest(types, s.worker_server_type, s.locations),
    )


def planned(s: ClusterSettings, types: Types | None, n_workers: int) -> float | None:
    prices = role_prices(s, types)
    return None if prices is None else prices[0] + n_workers * prices[1]


def max_workers(s: ClusterSettings, types: Types | None) -> int | None:
    """The most workers ``max_hourly_cost`` allows (None: no limit, or prices not read yet)."""
    prices = role_prices(s, types)
    if s.max_hourly_cost is None or prices is None:
        return None
    scheduler, worker = prices
    if worker <= 0:
        return None
    # The epsilon keeps 0.3/0.1 from flooring to 2.
    return max(0, math.floor((s.max_hourly_cost - scheduler) / worker + 1e-9))


def check(s: ClusterSettings, types: Types | None, n: int, what: str, extra: float = 0.0) -> None:
    """Refuse (``CostLimitError``) a size whose price is above ``max_hourly_cost``;
    ``extra``: EUR/h of servers that stay besides (kept servers no new worker takes)."""
    limit, prices = s.max_hourly_cost, role_prices(s, types)
    if limit is None or prices is None:
        return
    cost = prices[0] + n * prices[1] + extra
    if cost <= limit + 1e-9:
        return
    fit = max_workers(s, types)
    raise CostLimitError(
        f"{what} with {n} workers would cost {cost:.4f} EUR/h gross (scheduler "
        f"{'/'.join(s.scheduler_server_type)} {prices[0]:.4f} + {n} x {'/'.join(s.worker_server_type)} "
        f"{prices[1]:.4f} EUR/h at most in {', '.join([s.location, *s.fallback_locations])}"
        + (f", kept servers {extra:.4f}" if extra else "")
        + "), above "
        f"max_hourly_cost {limit:.4f} EUR/h"
        + (f"; at most {fit} workers fit" if prices[0] <= limit else "; not even the scheduler fits")
    )


def server_price(server: ServerInfo, types: Types | None) -> float | None:
    """Gross EUR/h of a server that exists, at its own location's price, its Primary IPv4
    included (none without a public IPv4); None if unknown."""
    info = (types or {}).get(server.server_type)
    if info is None or server.location not in info.hourly:
        return None
    return info.hourly[server.location] + (info.ipv4.get(server.location, 0.0) if server.public_ip else 0.0)


def hourly(servers: Iterable[ServerInfo], types: Types | None) -> float:
    """Gross EUR/h of servers that exist (those of unknown price count 0)."""
    return sum(server_price(s, types) or 0.0 for s in servers)
