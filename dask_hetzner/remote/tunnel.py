"""Local port forwards that survive a dropped SSH connection (the client's way to the scheduler)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from .connection import Remote
from .errors import HostKeyMismatch, RemoteError

logger = logging.getLogger(__name__)


class Tunnel:
    """Local port forwards through one server that outlive a dropped SSH connection.

    When the connection is lost, it logs in again (same pinned host key, via ``reconnect``)
    and listens again on the same local ports, so the client's scheduler address and the
    dashboard link stay valid.
    """

    def __init__(self, conn: Remote, reconnect: Callable[[], Awaitable[Remote]]) -> None:
        self.conn = conn
        self._reconnect = reconnect
        self._forwards: list[tuple[str, int, int]] = []  # remote host, remote port, local port
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.reconnects = 0
        # Set when the server answered with another host key: never retried (it is not ours).
        self.failure: HostKeyMismatch | None = None

    @property
    def up(self) -> bool:
        """Whether the forwards work now (False while reconnecting)."""
        return not self._closing and not self.conn.is_closed()

    async def forward(self, remote_host: str, remote_port: int, *, same_port: bool = False) -> int:
        """Forward a free local port (``same_port``: ``remote_port`` itself if it is free)."""
        local = 0
        if same_port:
            try:
                _, local = await self.conn.forward_local(remote_host, remote_port, local_port=remote_port)
            except RemoteError:
                local = 0  # taken here: any port
        if not local:
            _, local = await self.conn.forward_local(remote_host, remote_port)
        self._forwards.append((remote_host, remote_port, local))
        if self._task is None:
            self._task = asyncio.create_task(self._supervise())
        return local

    async def _supervise(self) -> None:
        while not self._closing:
            await self.conn.wait_closed()
            if self._closing:
                return
            logger.warning("SSH tunnel to %s lost; reconnecting", self.conn.host)
            delay = 0.5
            while not self._closing:
                conn = None
                try:
                    conn = await self._reconnect()
                    for host, port, local in self._forwards:
                        await conn.forward_local(host, port, local_port=local)
                except HostKeyMismatch as e:
                    logger.error("SSH tunnel to %s: the host key changed, not reconnecting: %s", self.conn.host, e)
                    self.failure = e
                    return
                except (RemoteError, OSError) as e:
                    if conn is not None:
                        await conn.close()
                    logger.warning("SSH tunnel to %s: %s; retrying", self.conn.host, e)
                    await asyncio.sleep(delay)  # backoff between reconnection attempts
                    delay = min(delay * 2, 10.0)
                    continue
                self.conn = conn
                self.reconnects += 1
                logger.info("SSH tunnel to %s restored", conn.host)
                break

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.conn.close()
