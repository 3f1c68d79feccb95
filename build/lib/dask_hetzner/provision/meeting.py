"""Where workers find their scheduler: its private address, once known."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable


class SchedulerAddress:
    """The scheduler's ``tls://private-ip:port``, set once by whoever learns it first.

    With a fixed scheduler port that is as soon as the API shows its server's private IP
    (before the scheduler runs); else once the scheduler wrote its scheduler file.
    """

    def __init__(self, bound: float) -> None:
        self.address: str | None = None
        self._bound = bound
        self._known: asyncio.Event | None = None
        # Asks for the scheduler's private IP now (set while its server is provisioned).
        self.hurry: Callable[[], None] | None = None

    def _event(self) -> asyncio.Event:
        if self._known is None:  # made in the loop: the record is made outside it
            self._known = asyncio.Event()
        return self._known

    def expect(self, hurry: Callable[[], None]) -> None:
        """The scheduler's server is being provisioned: ``hurry`` asks for its private IP now."""
        self.hurry = hurry

    def set(self, address: str) -> None:
        self.address = address
        self._event().set()

    async def wait(self, waiter: str) -> str:
        """The address; bounded by the scheduler's own start."""
        task = asyncio.current_task()
        # Python 3.11's wait_for can swallow a cancellation that raced its inner future;
        # a provision cancelled so must not go on to wait for a scheduler that never comes.
        # (Task.cancelling() is new in 3.11: 3.10 cannot tell, and goes on.)
        if sys.version_info >= (3, 11) and task is not None and task.cancelling():
            raise asyncio.CancelledError(f"{waiter}: cancelled")
        if not self._event().is_set() and self.hurry is not None:
            self.hurry()  # a worker is ready for it: the scheduler's private IP is needed now
        try:
            await asyncio.wait_for(self._event().wait(), self._bound)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"{waiter}: the scheduler's address was not known within {self._bound:.0f} s"
            ) from None
        assert self.address is not None
        return self.address
