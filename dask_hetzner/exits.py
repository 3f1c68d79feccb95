"""Process-exit hooks: what is still open when Python exits, or on SIGTERM, is deleted (or named)."""

from __future__ import annotations

import asyncio
import atexit
import logging
import signal
import sys
import threading
import weakref
from collections.abc import Coroutine
from contextlib import suppress
from typing import Any, Protocol

from distributed.core import Status

logger = logging.getLogger(__name__)


class _Closable(Protocol):
    # Read-only: the cluster's are properties.
    @property
    def name(self) -> str: ...
    @property
    def status(self) -> Status: ...
    @property
    def owns_resources(self) -> bool: ...
    @property
    def close_timeout(self) -> float: ...
    @property
    def loop(self) -> Any: ...

    shutdown_on_close: bool

    def close(self, timeout: float | None = None) -> Any: ...
    def delete_by_label(self, timeout: float) -> Coroutine[Any, Any, None]: ...


_open: weakref.WeakSet[Any] = weakref.WeakSet()


def register(cluster: _Closable) -> None:
    _open.add(cluster)


def _loop_alive(cluster: _Closable) -> bool:
    """A sync cluster's loop runs on in its own (daemon) thread at exit; an asynchronous
    one's host (Jupyter, ``asyncio.run``) has stopped it: nothing scheduled there runs."""
    try:
        return bool(cluster.loop.asyncio_loop.is_running())
    except Exception:
        return False


def _close_at_exit() -> None:
    """Delete what is still open when Python exits; never hang, never stay silent.

    Runs before distributed's own handler, which waits forever on an asynchronous cluster
    whose loop has stopped (a Jupyter server's panel clusters).
    A sync cluster is closed on its loop; the others are deleted by label from a fresh loop
    in a thread. Each is bounded by its close timeout; what is not confirmed deleted then
    (or on a second Ctrl-C) is named on stderr with the command that deletes it.
    """
    pending = [
        c for c in list(_open)
        if c.status not in (Status.closed, Status.closing) and c.owns_resources
    ]  # fmt: skip
    for cluster in pending:
        cluster.shutdown_on_close = False  # distributed's handler would wait on it again
        logger.warning("cluster %s: still open at exit: deleting it", cluster.name)
    left = {c.name for c in pending}
    try:
        for cluster in [c for c in pending if _loop_alive(c)]:
            try:
                cluster.close(timeout=cluster.close_timeout)
                left.discard(cluster.name)
            except Exception as e:
                logger.error("cluster %s: closing at exit failed: %s", cluster.name, e)
        left -= _delete_in_thread([c for c in pending if c.name in left])
    except KeyboardInterrupt:
        pass  # a second Ctrl-C: stop waiting, but say what is left
    for name in sorted(left):
        print(f"still running: dask-hetzner nuke {name}", file=sys.stderr, flush=True)


def _delete_in_thread(clusters: list[_Closable]) -> set[str]:
    """Delete the clusters by label in parallel on a new loop; the names confirmed gone."""
    done: set[str] = set()
    if not clusters:
        return done

    async def one(cluster: _Closable) -> None:
        try:
            await asyncio.wait_for(cluster.delete_by_label(cluster.close_timeout), cluster.close_timeout + 5)
            done.add(cluster.name)
        except Exception as e:
            logger.error("cluster %s: deleting at exit failed: %r", cluster.name, e)

    async def every() -> None:
        await asyncio.gather(*(one(c) for c in clusters))

    # A daemon thread: a second Ctrl-C here ends the wait, and the process does not wait for it.
    thread = threading.Thread(target=asyncio.run, args=(every(),), name="dask-hetzner-exit", daemon=True)
    thread.start()
    thread.join(max(c.close_timeout for c in clusters) + 10)
    return set(done)


# Run while Python starts shutting down, before thread pools refuse new work (the SDK's calls
# and asyncio.to_thread need one) and before atexit: threading's own exit hook, which runs the
# last registered first, so ahead of concurrent.futures' (imported with asyncio, before us).
_register = getattr(threading, "_register_atexit", atexit.register)
_register(_close_at_exit)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def sigterm_cleans_up() -> None:
    """Make SIGTERM (docker stop, systemd, a batch scheduler) clean up like Ctrl-C does.

    Python's default SIGTERM ends the process at once, without atexit handlers: every paid
    server would be left behind. Only the default is replaced, never someone else's handler.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    with suppress(ValueError, OSError):
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
