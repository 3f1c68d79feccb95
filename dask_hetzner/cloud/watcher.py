"""One poller per cluster that confirms servers: running (with a private IP), gone, or failed.

Waiting for N servers costs one list request per interval, whoever waits. See
docs/design.md, "Faults", for the failed creates it catches.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ActionFailed, CloudError
from .model import LABEL_WORKER, ServerInfo

if TYPE_CHECKING:
    from .client import Cloud


@dataclass(eq=False)
class _Waiter:
    statuses: set[str]
    registered: float
    future: asyncio.Future[ServerInfo]
    what: str
    action_id: int | None
    worker: str | None  # its dask-hetzner/worker label: lets a poll list only awaited servers
    lazy: bool  # nobody waits for the answer yet: polled every LAZY_POLLS intervals
    private_ip: bool  # the answer must carry the private IP (attach_to_network finished)
    without_ip: int = 0  # polls that found it running without its private IP

    def check_attach(self, info: ServerInfo) -> bool:
        """Running without a private IP for a third poll: has its attach_to_network failed?"""
        if not (self.private_ip and info.status in self.statuses and info.private_ip is None):
            return False
        self.without_ip += 1
        return self.without_ip % ATTACH_CHECK_POLLS == 0

    def answered_by(self, info: ServerInfo) -> bool:
        return info.status in self.statuses and (not self.private_ip or info.private_ip is not None)


# A server running without its private IP this many polls: its attach action is read.
ATTACH_CHECK_POLLS = 3
START_COMMANDS = ("create_server", "start_server")
ATTACH_COMMANDS = ("attach_to_network",)

# A lazy waiter's server is reached by other means (SSH) and the poll only confirms it, or
# catches a failed create: one list every LAZY_POLLS intervals is enough.
LAZY_POLLS = 5


class ServerWatcher:
    """One poller for a whole cluster: waiting for N servers costs one list request per interval.

    Waiters register a server id and the statuses they want; the poll loop runs only while
    someone waits, so an idle cluster makes no requests. When only workers are awaited, the
    list is narrowed to them by their labels: one page, however large the cluster.
    A *lazy* waiter (``lazy=True``) is polled every ``LAZY_POLLS`` intervals until
    :meth:`hurry` says its answer is needed now. A server waited for as running that shows
    ``off`` gets its create action read once a poll: an action that ended in error
    (docs/simulator.md, fault ``action_error``) fails the wait at once, not at its timeout.
    """

    def __init__(self, cloud: Cloud, label_selector: str, interval: float) -> None:
        self.cloud = cloud
        self.label_selector = label_selector
        self.interval = interval
        self._waiters: dict[int, list[_Waiter]] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._polled_at = 0.0  # time.monotonic() of the last list's start
        self.last: dict[int, ServerInfo] = {}

    async def wait(
        self,
        server_id: int,
        statuses: set[str],
        *,
        timeout: float,
        what: str,
        action_id: int | None = None,
        worker: str | None = None,
        lazy: bool = False,
        private_ip: bool = False,
    ) -> ServerInfo:
        loop = asyncio.get_running_loop()
        waiter = _Waiter(
            statuses,
            time.monotonic(),
            loop.create_future(),
            what,
            action_id,
            worker,
            lazy,
            private_ip,
        )
        self._waiters.setdefault(server_id, []).append(waiter)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        elif statuses and not lazy:
            self._nudge()
        try:
            return await asyncio.wait_for(waiter.future, timeout)
        except asyncio.TimeoutError:
            last = self.last.get(server_id)
            state = last.status if last else "unknown"
            if last is not None and last.status in statuses and private_ip and last.private_ip is None:
                state += ", no private IP yet"
            raise TimeoutError(
                f"{what}: server {server_id} not {'/'.join(sorted(statuses))} after {timeout:.0f} s "
                f"(last status: {state})"
            ) from None
        finally:
            waiters = self._waiters.get(server_id, [])
            waiters[:] = [w for w in waiters if w is not waiter]
            if not waiters:
                self._waiters.pop(server_id, None)

    def hurry(self, server_id: int) -> None:
        """The answer for ``server_id`` is needed now: poll within an interval, not LAZY_POLLS."""
        for w in self._waiters.get(server_id, []):
            w.lazy = False
        self._nudge()

    def _nudge(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def wait_gone(
        self, server_id: int, *, timeout: float, worker: str | None = None, lazy: bool = False
    ) -> None:
        """Wait until the server no longer appears in the cluster's list."""
        try:
            await self.wait(
                server_id,
                set(),
                timeout=timeout,
                what=f"deleting server {server_id}",
                worker=worker,
                lazy=lazy,
            )
        except CloudError as e:
            if e.code == "not_found":
                return
            raise

    def _pending(self) -> list[_Waiter]:
        return [w for ws in self._waiters.values() for w in ws if not w.future.done()]

    async def _run(self) -> None:
        self._wake = asyncio.Event()
        deletion_interval = self.interval
        while True:
            waiting = self._pending()
            if not waiting:
                return
            started = self._polled_at = time.monotonic()
            label_selector = self._selector(waiting)
            try:
                servers = await self.cloud.servers(label_selector)
            except CloudError as e:
                for w in self._pending():  # also those that came during the request
                    w.future.set_exception(e)
                return
            listed = {s.id: s for s in servers}
            if label_selector == self.label_selector:
                self.last = listed
            else:
                self.last.update(listed)
            off = self._answer(listed, started)
            if off:
                await self._check_actions(off)
            # Answered waiters leave once their tasks resume; they need no further poll.
            pending = self._pending()
            if not pending:
                return
            if any(w.statuses and not w.lazy for w in pending):
                interval = deletion_interval = self.interval
            elif any(not w.lazy for w in pending):
                # Only deletions awaited: they take seconds whatever we do, so poll less often.
                deletion_interval = min(deletion_interval * 1.5, LAZY_POLLS * self.interval)
                interval = deletion_interval
            else:
                interval = LAZY_POLLS * self.interval
            await self._pause(interval)

    def _selector(self, waiting: list[_Waiter]) -> str:
        names = {w.worker for w in waiting}
        if None in names:
            return self.label_selector
        # Only workers awaited: list just them (a full list of 100 servers is 2 pages).
        return f"{self.label_selector},{LABEL_WORKER} in ({','.join(sorted(n for n in names if n))})"

    def _answer(self, listed: dict[int, ServerInfo], started: float) -> list[tuple[int, _Waiter]]:
        """Settle the waiters a list begun at ``started`` answers; returns those (with their
        server's id) whose server is ``off`` while they wait for it to run: its create may
        have failed."""
        off: list[tuple[int, _Waiter]] = []
        for server_id, waiters in list(self._waiters.items()):
            info = listed.get(server_id)
            if info is None:
                self.last.pop(server_id, None)
            for w in waiters:
                if w.future.done():
                    continue
                # Only a list that began after the wait began can prove the server is gone.
                if info is None and w.registered < started:
                    w.future.set_exception(
                        CloudError(f"waiting for server {server_id}", "not_found", "server vanished")
                    )
                elif info is not None and w.answered_by(info):
                    w.future.set_result(info)
                elif info is not None and info.status == "off" and "running" in w.statuses:
                    off.append((server_id, w))
                elif info is not None and w.check_attach(info):
                    off.append((server_id, w))
        return off

    async def _pause(self, interval: float) -> None:
        """Sleep ``interval``; a waiter that needs its answer now shortens it to one interval
        after the last poll (new waiters do not poll at once: the next poll serves them all)."""
        assert self._wake is not None
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), interval)
        except asyncio.TimeoutError:
            return
        rest = self.interval - (time.monotonic() - self._polled_at)
        if rest > 0:
            await asyncio.sleep(rest)

    async def _check_actions(self, waiters: list[tuple[int, _Waiter]]) -> None:
        # Off: its create action (a server adopted after a 409 has no known action: its own
        # actions are read instead). Running without its private IP: its attach action.
        def check(sid: int, w: _Waiter) -> Awaitable[tuple[str, str] | None]:
            last = self.last.get(sid)
            if last is not None and last.status != "off":
                return self.cloud.failed_action(sid, ATTACH_COMMANDS)
            if w.action_id is not None:
                return self.cloud.action_error(w.action_id)
            return self.cloud.failed_action(sid, START_COMMANDS)

        results = await asyncio.gather(*(check(sid, w) for sid, w in waiters), return_exceptions=True)
        for (_, w), result in zip(waiters, results, strict=True):
            if isinstance(result, tuple) and not w.future.done():
                code, message = result
                w.future.set_exception(ActionFailed(w.what, code, message))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
