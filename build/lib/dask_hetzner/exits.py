"""Process-exit hooks: what is still open when Python exits, or on SIGTERM, is deleted."""

from __future__ import annotations

import atexit
import logging
import signal
import threading
import weakref
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
    def asynchronous(self) -> bool: ...
    @property
    def detached(self) -> bool: ...
    @property
    def close_timeout(self) -> float: ...

    def close(self, timeout: float | None = None) -> Any: ...


_open: weakref.WeakSet[Any] = weakref.WeakSet()


def register(cluster: _Closable) -> None:
    _open.add(cluster)


@atexit.register
def _close_at_exit() -> None:
    """Delete what is still open when Python exits.

    Registered after distributed's own handler, so it runs first: that one gives each
    cluster only 10 s, which a graceful close of many servers may not fit in.
    """
    for cluster in list(_open):
        if cluster.status in (Status.closed, Status.closing) or cluster.detached:
            continue
        if cluster.asynchronous:
            logger.warning("cluster %s: still open at exit; close it or run dask-hetzner nuke", cluster.name)
            continue
        try:
            cluster.close(timeout=cluster.close_timeout)
        except Exception as e:
            logger.error("cluster %s: closing at exit failed: %s (run dask-hetzner nuke %s)", cluster.name, e, cluster.name)


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
