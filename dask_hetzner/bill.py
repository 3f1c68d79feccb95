"""What a cluster has cost so far, as Hetzner bills it.

Hetzner bills a server from its creation until it is deleted, whatever it does, for every
started hour (a few minutes cost a full hour), its Primary IPv4 on top
(docs.hetzner.com/cloud/billing/faq). ``Bill`` keeps one line per server this cluster
created, deleted ones included, at the gross hourly price the API showed when it was made.
Times are this process's clock; ``hetzner.billing-hour`` is the length of a billed hour
(one hour on Hetzner; a time-scaled simulator bills shorter ones).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass


@dataclass
class Line:
    server_id: int
    name: str
    hourly: float  # gross EUR/h, the Primary IPv4 included
    created: float  # time.time() when the API answered the create
    deleted: float | None = None


class Bill:
    def __init__(self, hour: float = 3600.0) -> None:
        self.hour = hour
        self.lines: dict[int, Line] = {}

    def opened(self, server_id: int, name: str, hourly: float | None) -> None:
        """A server this cluster created (once per server id; an adopted retry is the same)."""
        if server_id not in self.lines:
            self.lines[server_id] = Line(server_id, name, hourly or 0.0, time.time())

    def closed(self, server_id: int) -> None:
        """Its delete was accepted: billing ends (the started hour is paid)."""
        line = self.lines.get(server_id)
        if line is not None and line.deleted is None:
            line.deleted = time.time()

    def close_all(self) -> None:
        for server_id in list(self.lines):
            self.closed(server_id)

    def started_hours(self, line: Line, now: float | None = None) -> int:
        end = line.deleted if line.deleted is not None else (now if now is not None else time.time())
        # A server that existed at all costs one hour; the epsilon keeps 3600.0 s at one.
        return max(1, math.ceil((end - line.created) / self.hour - 1e-9))

    def paid_until(self, server_id: int) -> float | None:
        """``time.time()`` when the server's current started hour ends (None: not ours)."""
        line = self.lines.get(server_id)
        if line is None:
            return None
        return line.created + self.started_hours(line) * self.hour

    @property
    def server_hours(self) -> int:
        now = time.time()
        return sum(self.started_hours(x, now) for x in self.lines.values())

    @property
    def total(self) -> float:
        """EUR gross billed so far."""
        now = time.time()
        return sum(x.hourly * self.started_hours(x, now) for x in self.lines.values())
