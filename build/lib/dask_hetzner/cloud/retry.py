"""How every request is sent: paced by the ``RateLimit-*`` headers, retried on transient faults.

Retries are ours, not the SDK's: every transient fault (429, 423, 409 conflict, 5xx,
timeouts, connection errors) is asked again after an exponential, jittered backoff, up to
``hetzner.api.max-retries`` times; once the headers say the bucket is empty, requests queue
for a token instead of running into 429s. See docs/design.md, "Faults".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import ParamSpec, TypeVar

from .errors import CloudError, Unreachable
from .sdk import Sdk

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

# Faults that go away when asked again later (docs/design.md, "Faults").
TRANSIENT_CODES = {
    "rate_limit_exceeded",
    "locked",
    "conflict",
    "server_error",
    "unavailable",
    "bad_gateway",
    "timeout",
    "unknown_error",
    "maintenance",
}
TRANSIENT_STATUSES = {500, 502, 503, 504}


class RateLimit:
    """What the API's ``RateLimit-*`` headers last said, shared by all threads.

    Hetzner refills the bucket linearly until ``RateLimit-Reset`` (unix time of a full
    bucket). Once the headers say it is empty, requests queue here one refill period apart
    instead of running into 429s.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.limit: int | None = None
        self.remaining: int | None = None
        self.reset: float | None = None
        self._at = 0.0  # time.time() of the last headers
        self._sent = 0  # requests started since the last headers

    def update(self, headers: Mapping[str, str]) -> None:
        try:
            limit = int(headers["RateLimit-Limit"])
            remaining = int(headers["RateLimit-Remaining"])
            reset = float(headers["RateLimit-Reset"])
        except (KeyError, ValueError, TypeError):
            return
        with self._lock:
            self.limit, self.remaining, self.reset = limit, remaining, reset
            self._at = time.time()
            self._sent = 0

    def exhausted(self) -> None:
        """A 429 arrived (perhaps without headers): the bucket is empty now."""
        with self._lock:
            if self.limit is not None:
                self.remaining = 0
                self._at = time.time()
                self._sent = 0

    def _per_token(self) -> float:
        assert self.limit is not None and self.remaining is not None and self.reset is not None
        missing = self.limit - self.remaining
        span = self.reset - self._at
        if missing > 0 and span > 0:
            return span / missing
        return 3600.0 / self.limit  # the documented refill: the whole limit in an hour

    def delay(self) -> float:
        """Seconds the next request should wait so that it finds a token in the bucket."""
        with self._lock:
            if self.limit is None or self.remaining is None or self.reset is None:
                return 0.0
            per = self._per_token()
            available = self.remaining + (time.time() - self._at) / per - self._sent
            self._sent += 1
            if available >= 1:
                return 0.0
            # Each queued request finds `available` one lower: they leave one period apart.
            return min(60.0, (1.0 - available) * per)


def transient(error: CloudError) -> bool:
    """Would asking again later help?"""
    if isinstance(error, Unreachable):
        return True
    return error.code in TRANSIENT_CODES or error.code in TRANSIENT_STATUSES


class Retry:
    """Sends the SDK adapter's requests with pacing and retries; counts what it sent."""

    def __init__(
        self, sdk: Sdk, *, max_retries: int, backoff_base: float, backoff_max: float
    ) -> None:
        self.sdk = sdk
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.rate = RateLimit()
        self.requests = 0
        self.rate_limited = 0
        self.retries = 0
        self._count_lock = threading.Lock()
        sdk.on_response(self._on_response)

    def _on_response(self, status: int, headers: Mapping[str, str]) -> None:
        self.rate.update(headers)
        with self._count_lock:
            self.requests += 1
            if status == 429:
                self.rate_limited += 1

    def backoff(self, attempt: int) -> float:
        """Seconds before retry number ``attempt`` (0-based): exponential, jittered, capped."""
        return min(self.backoff_max, self.backoff_base * 2.0**attempt) * random.uniform(0.5, 1.0)

    async def call(self, what: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run one SDK adapter request in a thread, retrying transient faults; errors name ``what``."""
        return await self.send(what, functools.partial(fn, *args, **kwargs), None)

    async def send(
        self, what: str, fn: Callable[[], T], undo: Callable[[T], Awaitable[None]] | None
    ) -> T:
        """``call``; with ``undo``, a result that arrives after a cancellation is undone."""
        attempt = 0
        while True:
            wait = self.rate.delay()
            if wait > 0:
                # The bucket is empty (RateLimit-Reset says when it refills): queue for a token.
                await asyncio.sleep(wait)
            try:
                return await self._once(what, fn, undo)
            except CloudError as e:
                if not transient(e) or attempt >= self.max_retries:
                    raise
                if e.code == "rate_limit_exceeded" or e.code == 429:
                    # Also without headers (a proxy's 429): the next request queues for a token.
                    self.rate.exhausted()
                delay = self.backoff(attempt)
                logger.info("%s: %s, retrying in %.2f s", what, e.code, delay)
            attempt += 1
            with self._count_lock:
                self.retries += 1
            await asyncio.sleep(delay)

    async def _once(
        self, what: str, fn: Callable[[], T], undo: Callable[[T], Awaitable[None]] | None
    ) -> T:
        cf = self.sdk.start(what, fn)
        try:
            return await asyncio.wrap_future(cf)
        except asyncio.CancelledError:
            # A request already sent goes on in its thread; what it creates is undone.
            if undo is not None and not cf.cancelled():
                await self._undo_late(what, cf, undo)
            raise

    async def _undo_late(
        self, what: str, cf: concurrent.futures.Future[T], undo: Callable[[T], Awaitable[None]]
    ) -> None:
        try:
            # Bounded by the request timeout the SDK was given.
            result = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(cf)), self.sdk.request_timeout + 5
            )
        except Exception:
            return  # it failed: nothing was created
        try:
            await undo(result)
        except Exception as e:
            logger.warning("%s: undoing after cancellation failed: %s", what, e)
