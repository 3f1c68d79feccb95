"""How long things take: profiles ``instant`` and ``realistic``, scaled by ``time_scale``.

Every duration is drawn from one seeded RNG so a run can be replayed; what was
drawn for a server, and when each of its phases ended, is kept in
:class:`ServerTimings` so benchmarks can compute the floor a client could reach.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

PROFILES = ("instant", "realistic")


@dataclass
class ServerTimings:
    server_id: int
    name: str
    drawn: dict[str, float] = field(default_factory=dict)  # seconds actually waited
    phases: dict[str, float] = field(default_factory=dict)  # phase -> time.time() it ended

    def mark(self, phase: str) -> None:
        self.phases[phase] = time.time()

    def as_dict(self) -> dict[str, Any]:
        floor = sum(self.drawn.get(k, 0.0) for k in ("create", "start", "ssh_delay"))
        return {
            "server_id": self.server_id,
            "name": self.name,
            "drawn": dict(self.drawn),
            "phases": dict(self.phases),
            "floor": floor,  # request -> SSH reachable, had nothing else slowed it down
        }


# Seconds per GB of image copied (snapshot or server from a snapshot): an assumption.
IMAGE_SECONDS_PER_GB = 20.0

class Timing:
    """Draws durations (seconds, already multiplied by ``time_scale``)."""

    def __init__(self, profile: str = "instant", time_scale: float = 1.0, seed: int | None = None):
        if profile not in PROFILES:
            raise ValueError(f"unknown timing profile {profile!r}, expected one of {PROFILES}")
        if time_scale < 0:
            raise ValueError("time_scale must be >= 0")
        self.profile = profile
        self.time_scale = time_scale
        self.rng = random.Random(seed)

    @property
    def instant(self) -> bool:
        return self.profile == "instant"

    def _scaled(self, seconds: float) -> float:
        return 0.0 if self.instant else seconds * self.time_scale

    def scale(self, seconds: float) -> float:
        """Scale an explicit duration (fault parameters) like everything else."""
        return seconds * self.time_scale

    def api_latency(self, create_server: bool = False) -> float:
        if create_server:  # POST /servers takes about 2 s to answer
            return self._scaled(min(6.0, max(0.8, self.rng.lognormvariate(math.log(1.8), 0.3))))
        # Tens of ms, lognormal around 30 ms.
        return self._scaled(min(0.25, self.rng.lognormvariate(math.log(0.03), 0.35)))

    def create_server(self, image_gb: float = 0.0) -> float:
        # 5 s minimum, median ~13 s, heavy-ish tail capped at 90 s; from a snapshot, plus the
        # time to copy the image onto the new disk.
        if self.instant:
            return 0.0
        return self._scaled(min(90.0, 5.0 + self.rng.lognormvariate(math.log(8.0), 0.75))) + self.image_copy(image_gb)

    def image_copy(self, image_gb: float) -> float:
        """Copying an image of this size (a snapshot taken, a server made from one): the bigger
        the image, the longer (docs/simulator.md: an assumed rate, not a measured one)."""
        return self._scaled(image_gb * IMAGE_SECONDS_PER_GB)

    def start_server(self) -> float:
        return self._scaled(self.rng.uniform(2.0, 5.0)) if not self.instant else 0.0

    def private_nic_delay(self) -> float:
        # The private NIC is configured (hc-utils, cloud-init) a few seconds after boot.
        return self._scaled(self.rng.uniform(1.0, 8.0)) if not self.instant else 0.0

    def ssh_delay(self) -> float:
        # Seconds usually; sometimes (networkd waiting) up to two minutes.
        if self.instant:
            return 0.0
        if self.rng.random() < 0.05:
            return self._scaled(self.rng.uniform(30.0, 120.0))
        return self._scaled(self.rng.uniform(2.0, 10.0))

    def action(self, command: str) -> float:
        """Duration of any other action."""
        if self.instant:
            return 0.0
        spans = {
            "delete_server": (2.0, 6.0),
            "create_image": (10.0, 30.0),
            "stop_server": (1.0, 3.0),
            "shutdown_server": (3.0, 10.0),
            "reboot_server": (3.0, 8.0),
            "start_server": (2.0, 5.0),
        }
        lo, hi = spans.get(command, (0.5, 2.0))
        return self._scaled(self.rng.uniform(lo, hi))
