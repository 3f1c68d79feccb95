"""What users look at: the cluster's text repr and the servers section of its HTML repr."""

from __future__ import annotations

import html
import time
from collections import Counter
from collections.abc import Iterable, Mapping

from . import cost
from .cloud import LABEL_KEPT_UNTIL, ServerInfo, ServerTypeInfo
from .settings import ClusterSettings

COLUMNS = ["name", "role", "type", "location", "status", "ip", "private ip", "EUR/h"]


def text(
    name: str, workers: int, location: str, hourly: float, limit: float | None, status: str,
    mix: str = "", billed: float = 0.0, kept: str = "",
) -> str:  # fmt: skip
    maximum = f" (max {limit:.4f})" if limit is not None else ""
    kinds = f" ({mix})" if mix else ""
    kinds += f", {kept}" if kept else ""
    return (
        f"HetznerCluster({name!r}, workers={workers}{kinds}, location={location!r}, "
        f"{hourly:.4f} EUR/h{maximum}, cost {billed:.4f} EUR, status={status})"
    )


def kept_text(server: ServerInfo) -> str:
    """A kept server's status: ``"paid, idle until 17:05"`` (local time)."""
    until = server.labels.get(LABEL_KEPT_UNTIL, "")
    when = time.strftime("%H:%M", time.localtime(int(until))) if until.isdigit() else "?"
    return f"paid, idle until {when}"


def kept_summary(servers: Iterable[ServerInfo]) -> str:
    """``"1 kept (paid, idle until 17:05)"``, the earliest time; "" without kept servers."""
    kept = sorted((s for s in servers if s.role == "kept"), key=lambda s: s.labels.get(LABEL_KEPT_UNTIL, ""))
    return f"{len(kept)} kept ({kept_text(kept[0])})" if kept else ""


def type_mix(servers: Iterable[ServerInfo], role: str = "worker") -> str:
    """``"2 cx33, 1 cpx32"``: how many servers of ``role`` got each type, most first."""
    counts = Counter(s.server_type for s in servers if s.role == role)
    return ", ".join(f"{n} {t}" for t, n in sorted(counts.items(), key=lambda x: (-x[1], x[0])))


def server_rows(
    servers: Iterable[ServerInfo], latest: Mapping[int, ServerInfo], types: Mapping[str, ServerTypeInfo] | None
) -> list[dict[str, str]]:
    """One row a server, the scheduler first; ``latest``: fresher statuses by server id."""
    rows = []
    for known in sorted(servers, key=lambda s: (s.role != "scheduler", s.name)):
        s = latest.get(known.id, known)
        price = cost.server_price(s, types)
        rows.append(
            {
                "name": s.name,
                "role": known.role or "",  # labels as this process last set them
                "type": s.server_type,
                "location": s.location,
                "status": kept_text(known) if known.role == "kept" else s.status,
                "ip": s.public_ip or "",
                "private ip": s.private_ip or "",
                "EUR/h": f"{price:.4f}" if price is not None else "?",
            }
        )
    return rows


def _kinds(used: list[str], types: Mapping[str, ServerTypeInfo], location: str) -> str:
    e = html.escape
    return "; ".join(
        f"{e(t)}: {types[t].cores} vCPU, {types[t].memory_gb:g} GB, "
        f"{types[t].hourly.get(location, 0.0):.4f} EUR/h + IPv4 {types[t].ipv4.get(location, 0.0):.4f} in {e(location)}"
        if t in types
        else e(t)
        for t in used
    )


def html_section(
    s: ClusterSettings,
    rows: list[dict[str, str]],
    types: Mapping[str, ServerTypeInfo] | None,
    hourly: float,
    billed: tuple[float, int] = (0.0, 0),
) -> str:
    """Rows for dask's cluster widget: cost, location, idle timeout, server types, servers."""
    e = html.escape
    cost_text = f"{hourly:.4f} EUR/h"
    if s.max_hourly_cost is not None:
        cost_text += f" (max {s.max_hourly_cost:.4f} EUR/h)"
    cost_text += f"; billed so far {billed[0]:.4f} EUR for {billed[1]} server-hours"
    used = sorted({r["type"] for r in rows} | {s.scheduler_server_type[0], s.worker_server_type[0]})
    head = "".join(f'<th style="text-align: left;">{e(c)}</th>' for c in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f'<td style="text-align: left;">{e(r[c])}</td>' for c in COLUMNS) + "</tr>"
        for r in rows
    )
    idle_text = f"{s.idle_timeout:g} s" if s.idle_timeout is not None else "off"
    return (
        f'<tr><td style="text-align: left;"><strong>Hourly cost:</strong> {e(cost_text)}</td>'
        f'<td style="text-align: left;"><strong>Location:</strong> {e(s.location)}'
        f" &middot; <strong>Idle timeout:</strong> {e(idle_text)}</td></tr>"
        f'<tr><td colspan="2" style="text-align: left;"><strong>Server types:</strong> '
        f"{_kinds(used, types or {}, s.location)}</td></tr>"
        f'<tr><td colspan="2" style="text-align: left;"><strong>Preference:</strong> '
        f"scheduler {e(' > '.join(s.scheduler_server_type))}; workers {e(' > '.join(s.worker_server_type))}"
        f" in {e(', '.join(s.locations))}</td></tr>"
        f'<tr><td colspan="2"><table class="dask-hetzner-servers" style="width: 100%;">'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></td></tr>"
    )
