#!/usr/bin/env python
"""Capacity benchmarks (issue 14) on the simulator's ``realistic`` profile, time-scaled.

    python benchmarks/capacity.py                       # both, time scale 0.1
    python benchmarks/capacity.py --only bursty --bursts 4
    python benchmarks/capacity.py --only first --workers 50

* bursty: bursts of work that each want 8 workers, 10 simulated minutes apart, under
  ``adapt(minimum=1, maximum=8)``; the bill (the simulator's, every started hour of every
  server) and each burst's time from work arriving to its 8 workers running, with
  ``keep-paid-servers`` on and off. An hour and the keep margin are time-scaled like every
  other duration (``hetzner.billing-hour`` = 3600 s x the scale).
* first: time to first result (constructor called to one task's result) with
  ``wait_for_workers=1`` at N workers, against the same with one worker (the floor: the
  scheduler plus its first worker).

Measurements, not assertions: ``benchmarks/results/capacity.json`` and a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from run import (
    RESULTS,
    SimProcess,
    floor_first,
    floor_with_scheduler,
    free_port,
    machine,
    server_chains,
    wait_for,
)

GOALS = {"bill_ratio": 0.5, "reuse_scale_up_s": 3.0, "first_result_ratio": 1.1}


def settings(sim: SimProcess, scale: float, keep: bool, environment: str) -> dict[str, Any]:
    return {
        "hetzner.token": sim.token,
        "hetzner.api-endpoint": sim.endpoint,
        "hetzner.ssh-port": 22,
        "hetzner.scheduler-port": free_port(),
        "hetzner.dashboard-port": 0,
        "hetzner.api.poll-interval": f"{max(0.05, 1.0 * scale)}s",
        "hetzner.api.backoff-base": f"{max(0.05, 1.0 * scale)}s",
        "hetzner.worker-server-type": "cx23",
        "hetzner.scheduler-server-type": "cx23",
        "hetzner.billing-hour": f"{3600 * scale}s",
        "hetzner.keep-margin": f"{300 * scale}s",
        "hetzner.keep-paid-servers": keep,
        # Here every server shares this machine's two cores (each an equal CPU share): at 50
        # workers a process's start takes minutes, not the seconds it takes on a server of its own.
        "hetzner.timeouts.process-start": "900s",
        # The dask stack (as benchmarks/run.py); benchmarks/env_sync.py measures syncing yours.
        "hetzner.environment": environment,
    }


async def _workers(client: Any) -> int:
    return len(await client.scheduler.ncores())  # every worker (scheduler_info shows only 5)


class Phases:
    """Each node's progress reports with their times: how long a restart onto a kept server
    took (its first report, "restarting kept server ...", to "running")."""

    def __init__(self) -> None:
        self.seen: dict[str, list[tuple[float, str]]] = {}

    def __call__(self, node: str, phase: str) -> None:
        self.seen.setdefault(node, []).append((time.monotonic(), phase))

    def restarts(self) -> list[float]:
        out = []
        for phases in self.seen.values():
            if phases[0][1].startswith("restarting kept server"):
                running = [t for t, p in phases if p == "running"]
                if running:
                    out.append(round(running[0] - phases[0][0], 2))
        return out


async def bursty(
    sim: SimProcess, scale: float, bursts: int, keep: bool, tasks: int, task_s: float, environment: str
) -> dict[str, Any]:
    import dask
    from distributed import Client

    from dask_hetzner import HetznerCluster

    name = f"burst{'keep' if keep else 'new'}"
    gap = 600 * scale  # 10 simulated minutes, start to start
    out: dict[str, Any] = {"keep": keep, "bursts": []}
    phases = Phases()
    with dask.config.set(settings(sim, scale, keep, environment)):
        cluster = await HetznerCluster(workers=1, name=name, asynchronous=True, progress=phases)
        client = await Client(cluster, asynchronous=True)
        try:
            cluster.adapt(minimum=1, maximum=8, interval="500ms", wait_count=2, target_duration="2s")
            start = time.time()
            for i in range(bursts):
                await asyncio.sleep(max(0.0, start + i * gap - time.time()))  # the trace's schedule
                posts = (await sim.ask("stats"))["ok"].get("POST /servers", 0)
                t0 = time.monotonic()
                # E.g. 200 one-second tasks: 12.5 s on 8 workers of 2 threads, 100 s on one.
                futures = client.map(time.sleep, [task_s] * tasks, pure=False)
                done = asyncio.ensure_future(client.gather(futures))
                scaled, most = None, 0
                while not done.done():
                    most = max(most, await _workers(client))
                    if scaled is None and most >= 8:
                        scaled = time.monotonic() - t0
                    await asyncio.wait([done], timeout=0.1)  # the measurement's polling interval
                await done
                created = (await sim.ask("stats"))["ok"].get("POST /servers", 0) - posts
                out["bursts"].append(
                    {
                        "to_8_workers_s": None if scaled is None else round(scaled, 2),
                        "most_workers": most,
                        "burst_s": round(time.monotonic() - t0, 1),
                        "servers_created": created,
                    }
                )
            bill = await sim.ask(f"bill {name}")
            out.update(
                eur=bill["eur"], server_hours=bill["server_hours"], client_cost=cluster.cost,
                kept_restarts_s=phases.restarts(),
            )  # fmt: skip
        finally:
            await client.close()
            await cluster.close()
    return out


async def restarts(sim: SimProcess, scale: float, rounds: int, environment: str) -> dict[str, Any]:
    """A scale-up onto a kept server, one at a time: ``scale(1)`` retires a worker (its server
    kept), ``scale(2)`` restarts dask there. Each round: from the ``scale`` call to the
    scheduler's new worker, and the restart's parts from its progress reports (kept server
    taken and renamed; SSH login, TLS, preload and memory probe; dask's own start)."""
    import dask
    from distributed import Client

    from dask_hetzner import HetznerCluster

    phases = Phases()
    out: dict[str, Any] = {"rounds": []}
    with dask.config.set(settings(sim, scale, True, environment)):
        cluster = await HetznerCluster(workers=2, name="restart", asynchronous=True, progress=phases)
        client = await Client(cluster, asynchronous=True)
        try:
            await client.wait_for_workers(2, timeout=600)
            for _ in range(rounds):
                cluster.scale(1)

                async def kept_one() -> bool:
                    return len(cluster.context.kept.kept) == 1 and await _workers(client) == 1

                await wait_for(kept_one, timeout=120, what="a retired worker's server kept")
                t0 = time.monotonic()
                cluster.scale(2)
                await client.wait_for_workers(2, timeout=120)
                took = time.monotonic() - t0
                (node,) = [n for n, p in phases.seen.items() if p[0][1].startswith("restarting") and p[0][0] > t0]
                at = {p: t for t, p in phases.seen[node]}
                out["rounds"].append({
                    "scale_to_worker_s": round(took, 2),
                    "to_restart_s": round(phases.seen[node][0][0] - t0, 2),
                    "login_and_prepare_s": round(at["waiting for the scheduler"] - phases.seen[node][0][0], 2),
                    "dask_start_s": round(at["running"] - at["waiting for the scheduler"], 2),
                })  # fmt: skip
            posts = (await sim.ask("stats"))["ok"].get("POST /servers", 0)
            out["servers_created"] = posts
        finally:
            await client.close()
            await cluster.close()
    return out


async def first_result(sim: SimProcess, scale: float, n: int, timeout: float, environment: str) -> dict[str, Any]:
    """Constructor called to one task's result, with ``wait_for_workers=1`` at ``n`` workers;
    and the floor of that run: the scheduler's own chain and the quickest worker's (each
    server's create, start, boot, SSH delay, bootstrap and dask start, as the simulator drew
    and the servers measured them; ``run.server_chains``), read once all have joined."""
    import dask
    from distributed import Client

    from dask_hetzner import HetznerCluster

    with dask.config.set(settings(sim, scale, False, environment)):
        await sim.ask("reset")
        t0 = time.monotonic()
        cluster = await HetznerCluster(workers=n, name=f"first{n}", wait_for_workers=1, asynchronous=True)
        constructed = time.monotonic() - t0
        client = await Client(cluster, asynchronous=True)
        try:
            assert await asyncio.wait_for(client.submit(sum, [20, 22]).result(), timeout) == 42
            took = time.monotonic() - t0
            await client.wait_for_workers(n, timeout=timeout)
            await wait_for(lambda: _joined(cluster, n), timeout=timeout, what=f"{n} workers in the plan")
            _, chains, _ = await server_chains(sim, cluster, client)
            floor = floor_first(chains)
            quickest = min((c["total"], k) for k, c in chains.items() if k != "scheduler")[1]
            return {
                "workers": n, "first_result_s": round(took, 2), "constructor_s": round(constructed, 2),
                "floor_s": round(floor, 2), "ratio_to_floor": round(took / floor, 3),
                # A worker that starts its dask only once the scheduler runs, for comparison.
                "floor_dask_after_scheduler_s": round(floor_with_scheduler(chains, first=True), 2),
                "scheduler_chain": chains["scheduler"], "quickest_worker_chain": chains[quickest],
            }  # fmt: skip
        finally:
            await client.close()
            await cluster.close()


async def _joined(cluster: Any, n: int) -> bool:
    return len(cluster.workers) >= n


def table(r: dict[str, Any]) -> str:
    lines = []
    if "bursty" in r:
        lines += [
            "| keep-paid-servers | bill (EUR) | server-hours | time to 8 workers per burst (s) | servers created per burst | burst length (s) |",
            "|---|---:|---:|---|---|---|",
        ]
        for mode in ("on", "off"):
            b = r["bursty"][mode]
            times = ", ".join("-" if x["to_8_workers_s"] is None else str(x["to_8_workers_s"]) for x in b["bursts"])
            made = ", ".join(str(x["servers_created"]) for x in b["bursts"])
            length = ", ".join(str(x["burst_s"]) for x in b["bursts"])
            lines.append(f"| {mode} | {b['eur']:.4f} | {b['server_hours']} | {times} | {made} | {length} |")
        lines.append(f"\nbill ratio on/off: {r['bursty']['bill_ratio']:.2f} (goal <= {GOALS['bill_ratio']})")
        restarts = r["bursty"]["on"].get("kept_restarts_s") or []
        if restarts:
            lines.append(
                f"\nscale-up onto a kept server (its node's start to running): {len(restarts)} restarts, "
                f"median {sorted(restarts)[len(restarts) // 2]} s, max {max(restarts)} s "
                f"(goal <= {GOALS['reuse_scale_up_s']} s)"
            )
    if "restart" in r:
        lines += [
            "\n| scale-up onto a kept server | scale() to the new worker (s) | to its restart (s) | SSH login, TLS, preload, memory (s) | dask's own start (s) |",
            "|---:|---:|---:|---:|---:|",
        ]
        for i, x in enumerate(r["restart"]["rounds"], 1):
            lines.append(
                f"| {i} | {x['scale_to_worker_s']} | {x['to_restart_s']} | {x['login_and_prepare_s']} | {x['dask_start_s']} |"
            )
        times = sorted(x["scale_to_worker_s"] for x in r["restart"]["rounds"])
        lines.append(f"\nscale-up onto a kept server, one at a time: median {times[len(times) // 2]} s (goal <= {GOALS['reuse_scale_up_s']} s)")
    if "first" in r:
        f = r["first"]
        lines += [
            "| workers (wait_for_workers=1) | first result (s) | constructor returned (s) | floor: scheduler + quickest worker (s) | ratio |",
            "|---:|---:|---:|---:|---:|",
        ]
        for x in (f["one"], f["n"]):
            lines.append(
                f"| {x['workers']} | {x['first_result_s']} | {x['constructor_s']} | {x['floor_s']} | {x['ratio_to_floor']:.2f} |"
            )
        lines.append(
            f"\nfirst result at {f['n']['workers']} workers: {f['n']['ratio_to_floor']:.2f} x its floor "
            f"(goal <= {GOALS['first_result_ratio']}); {f['ratio_to_one']:.2f} x the first result with one worker "
            "(on this machine the servers share its two cores)"
        )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "time_scale": args.time_scale, "seed": args.seed, "environment": args.environment, "machine": machine(),
    }  # fmt: skip
    sim = SimProcess(args.time_scale, args.seed)
    try:
        if args.only in (None, "bursty"):
            work = (args.tasks, args.task_seconds, args.environment)
            on = await bursty(sim, args.time_scale, args.bursts, True, *work)
            off = await bursty(sim, args.time_scale, args.bursts, False, *work)
            results["bursty"] = {"on": on, "off": off, "bill_ratio": on["eur"] / off["eur"]}
        if args.only in (None, "restart"):
            results["restart"] = await restarts(sim, args.time_scale, args.rounds, args.environment)
        if args.only in (None, "first"):
            one = await first_result(sim, args.time_scale, 1, args.timeout, args.environment)
            n = await first_result(sim, args.time_scale, args.workers, args.timeout, args.environment)
            results["first"] = {"one": one, "n": n, "ratio_to_one": n["first_result_s"] / one["first_result_s"]}
        results["leaks"] = await sim.ask("leaks")
    finally:
        sim.close()
    return results


def main() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("dask_hetzner").setLevel(logging.INFO)  # keeping, taking, deleting
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["bursty", "restart", "first"], default=None)
    parser.add_argument("--rounds", type=int, default=5, help="restarts of the restart run")
    parser.add_argument("--bursts", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=200, help="tasks a burst")
    parser.add_argument("--task-seconds", type=float, default=1.0, help="real seconds a task")
    parser.add_argument("--workers", type=int, default=50, help="workers of the time-to-first-result run")
    parser.add_argument("--time-scale", type=float, default=0.1)
    parser.add_argument("--environment", default="minimal", help="hetzner.environment of the clusters")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "capacity.json")
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
