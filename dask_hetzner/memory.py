"""How much memory a worker may use: what the server really has, less what others need.

A server's nominal memory (4 GB for cx23) is not what Linux sees: ``MemTotal`` is a few
percent less (the kernel keeps its part), and the OS, sshd, the nanny and the fork server
live beside the worker. A limit of 0.9 x nominal is above what is left, so the kernel's
OOM killer ends the worker before dask spills or pauses. The limit is ``MemTotal`` read on
the server, less ``OVERHEAD`` (at least half of ``MemTotal`` is kept for tiny servers).
Before a server exists (``scale(memory=...)``) it is estimated from the nominal size.
"""

from __future__ import annotations

from . import remote

MiB = 1024**2
GiB = 1024**3
# The OS, sshd, the nanny and the fork server: about 1 GiB on Ubuntu 24.04 with dask.
OVERHEAD = 1 * GiB
# MemTotal / nominal memory on a cloud server (the kernel's own reservation): an estimate.
VISIBLE = 0.93


def limit_for(mem_total: int) -> str:
    """``--memory-limit`` for a server whose ``MemTotal`` is ``mem_total`` bytes."""
    return f"{max(mem_total // 2, mem_total - OVERHEAD) // MiB}MiB"


def estimated_limit(memory_gb: float) -> str:
    """The limit a server of ``memory_gb`` nominal GB will get (no server to ask yet)."""
    return limit_for(int(memory_gb * GiB * VISIBLE))


async def measured_limit(conn: remote.Remote) -> str:
    """The limit from the server's own ``/proc/meminfo``."""
    result = await conn.run("grep -m1 '^MemTotal:' /proc/meminfo", timeout=30)
    fields = result.stdout.split()
    if len(fields) < 2 or not fields[1].isdigit():
        raise RuntimeError(f"cannot read MemTotal from /proc/meminfo: {result.stdout.strip()!r}")
    return limit_for(int(fields[1]) * 1024)  # kB
