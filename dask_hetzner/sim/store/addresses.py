"""Loopback address pools: public IPv4 and private network addresses of simulated servers."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections import deque
from pathlib import Path
from typing import IO

from .base import ApiError

_LOCK_DIR = Path(tempfile.gettempdir()) / "dask-hetzner-sim-addresses"


class AddressPool:
    """Loopback addresses from one /16 block claimed for this simulator.

    Blocks are claimed with an exclusive ``flock`` so several simulators (test
    processes, a CLI one) on one machine never hand out the same address; the
    lock goes away with the process.  ``127.x.y.0`` and ``127.x.y.255`` are skipped.
    """

    PER_BLOCK = 256 * 254

    def __init__(self, kind: str, blocks: range):
        _LOCK_DIR.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(_LOCK_DIR, 0o1777)  # shared between users, like /tmp
        self._fh: IO[str] | None = None
        for block in blocks:
            fh = _try_lock(kind, block)
            if fh is not None:
                self._fh = fh
                self.block = block
                break
        else:
            raise RuntimeError(f"no free {kind} loopback block in 127.{blocks.start}-{blocks.stop - 1}.0.0")
        self._next = 0
        self._free: deque[int] = deque()
        self._used: set[int] = set()

    @property
    def cidr(self) -> str:
        """The whole block this pool hands addresses out of."""
        return f"127.{self.block}.0.0/16"

    def _ip(self, n: int) -> str:
        return f"127.{self.block}.{n // 254}.{n % 254 + 1}"

    def allocate(self) -> tuple[str, int]:
        """An unused address and its index (for derived values like IPv6)."""
        if self._next < self.PER_BLOCK:
            n = self._next
            self._next += 1
        elif self._free:
            n = self._free.popleft()  # reuse only once fresh ones ran out
        else:
            raise ApiError(422, "ip_not_available", "simulator address pool exhausted")
        self._used.add(n)
        return self._ip(n), n

    def release(self, ip: str) -> None:
        parts = ip.split(".")
        n = int(parts[2]) * 254 + int(parts[3]) - 1
        if n in self._used:
            self._used.discard(n)
            self._free.append(n)

    @staticmethod
    def claimed(kind: str, block: int) -> bool:
        """Whether a live simulator (any process) holds this block (or another user's file)."""
        fh = _try_lock(kind, block)
        if fh is None:
            return True
        with fh:
            fcntl.flock(fh, fcntl.LOCK_UN)
        return False

    def close(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def _try_lock(kind: str, block: int) -> IO[str] | None:
    """The block's lock file, locked for this process; None if another process holds it, or
    the file is another user's and not writable for us (their block)."""
    try:
        fh = open(_LOCK_DIR / f"{kind}-127.{block}.lock", "a+")  # noqa: SIM115 - held by the caller
    except OSError:
        return None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        return None
    return fh
