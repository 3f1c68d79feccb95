"""Hetzner's rate limit: a token bucket of ``limit`` requests refilled gradually.

3600 an hour by default, refilled at one a second (``limit / 3600`` per second
in general).  The clock is injectable so tests can move time instead of sleeping.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class RateLimitState:
    allowed: bool
    limit: int
    remaining: int
    reset: int  # unix time at which the bucket is full again

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset),
        }


class RateLimiter:
    def __init__(
        self,
        limit: int = 3600,
        refill_per_second: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ):
        if limit < 1:
            raise ValueError("rate limit must be >= 1")
        self.limit = limit
        self.refill_per_second = refill_per_second if refill_per_second is not None else limit / 3600.0
        self.clock = clock
        self.wall_clock = wall_clock
        self._tokens = float(limit)
        self._last = clock()

    def _refill(self) -> None:
        now = self.clock()
        elapsed = max(0.0, now - self._last)
        self._last = now
        self._tokens = min(float(self.limit), self._tokens + elapsed * self.refill_per_second)

    def _state(self, allowed: bool) -> RateLimitState:
        missing = self.limit - self._tokens
        seconds = missing / self.refill_per_second if self.refill_per_second > 0 else 0.0
        return RateLimitState(
            allowed=allowed,
            limit=self.limit,
            remaining=max(0, math.floor(self._tokens)),
            reset=math.ceil(self.wall_clock() + seconds),
        )

    def consume(self) -> RateLimitState:
        """Take one request from the bucket; ``allowed`` is False past the limit."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return self._state(True)
        return self._state(False)

    def peek(self) -> RateLimitState:
        self._refill()
        return self._state(True)

    def exhaust(self) -> None:
        """Empty the bucket (used by the ``rate_limit`` fault)."""
        self._refill()
        self._tokens = 0.0
