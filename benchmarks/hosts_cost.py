"""What a simulated server costs this machine, with and without its network namespace.

    .venv/bin/python benchmarks/hosts_cost.py --servers 200

Boots N hosts with ``HostManager`` directly (no API), all at once, then reports the wall
time, the machine's memory taken (MemAvailable before/after, so kernel memory such as
namespaces and links counts) and the processes' PSS per server, for network=False and True.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from dask_hetzner.sim.hosts import HostManager, HostSpec
from dask_hetzner.sim.store.addresses import AddressPool


def mem_available_kb() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            found.append(child)
            todo.append(child)
    return found


async def measure(servers: int, network: bool) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="hosts-cost-"))
    manager = HostManager(root / "hosts", network=network)
    # Addresses from the simulator's own pools: no clash with other simulators here.
    public, private = AddressPool("public", range(64, 128)), AddressPool("private", range(128, 256))
    specs = [
        HostSpec(i, f"s{i}", public.allocate()[0], [private.allocate()[0]]) for i in range(1, servers + 1)
    ]
    await manager.boot(HostSpec(10_000, "warm", public.allocate()[0]))  # probes, hub
    await manager.destroy(10_000)
    await manager.removed()
    before = mem_available_kb()
    start = time.monotonic()
    await asyncio.gather(*(manager.boot(spec) for spec in specs))
    boot = time.monotonic() - start
    await asyncio.sleep(1)
    taken = before - mem_available_kb()
    pss = sum(pss_kb(pid) for pid in descendants(os.getpid()))
    start = time.monotonic()
    await manager.close()
    close = time.monotonic() - start
    public.close()
    private.close()
    return {
        "servers": servers,
        "network": network and manager.networked,
        "boot_all_s": round(boot, 2),
        "boot_per_server_ms": round(boot / servers * 1000, 1),
        "memory_per_server_kb": round(taken / servers),
        "pss_per_server_kb": round(pss / servers),
        "close_all_s": round(close, 2),
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--servers", type=int, default=50)
    args = parser.parse_args()
    for network in (False, True):
        print(json.dumps(await measure(args.servers, network)), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
