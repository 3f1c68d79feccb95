"""Two small asyncio helpers for cleanup paths."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

logger = logging.getLogger(__name__)


async def quietly(aw: Awaitable[Any]) -> None:
    """Await a cleanup step; its failure is logged at debug level, never raised."""
    try:
        await aw
    except Exception as e:  # cleanup must go on
        logger.debug("ignored during cleanup: %r", e)


async def cancelled(fut: asyncio.Future[Any]) -> None:
    """Cancel ``fut`` and wait for it, whatever it ends with."""
    fut.cancel()
    try:
        await fut
    except BaseException as e:
        if isinstance(e, asyncio.CancelledError) and not fut.cancelled():
            raise  # not its cancellation: ours
        # Its own failure or cancellation: nobody waits for it any more.
