"""``dask-hetzner demo``: a user's first minute, with no token and no network.

Starts the simulator, creates a cluster of two workers on it, computes something, scales
to three and back to one, closes, and sums up what happened and what it would have cost.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import dask
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from .cluster import HetznerCluster


def run(workers: int = 2, console: Console | None = None) -> dict[str, Any]:
    from .cluster import HetznerCluster
    from .sim import Simulator

    console = console or Console()
    say = console.print
    say("[bold]dask-hetzner demo[/bold]: a real Dask cluster on a simulated Hetzner Cloud.")
    say(
        "The simulator answers the Hetzner Cloud API on this machine; each 'server' is a real "
        "SSH endpoint on its own loopback address, running real dask processes."
    )
    summary: dict[str, Any] = {"workers": workers}
    phases: dict[str, str] = {}

    def progress(node: str, phase: str) -> None:
        if phases.get(node) != phase:
            phases[node] = phase
            say(f"  {node:<12} {phase}")

    with Simulator() as sim, dask.config.set(sim.dask_config()):
        say(f"Simulator at {sim.endpoint}")
        say(f"\n[bold]1.[/bold] Creating a cluster: a scheduler and {workers} workers, in parallel.")
        t0 = time.monotonic()
        # Its tasks need only the dask stack: syncing the whole local environment would only
        # slow a user's first minute (docs/your-code-and-data.md).
        with HetznerCluster(workers=workers, name="demo", progress=progress, environment="minimal") as cluster:
            per_hour = _use(cluster, workers, t0, summary, say)
            say("\n[bold]5.[/bold] Closing: every server, the network, firewall and key are deleted.")
        elapsed = time.monotonic() - t0
        summary["total_s"] = round(elapsed, 1)
        summary["leftovers"] = sim.leaks()
        summary["api_requests"] = sim.stats["total"]
        summary["servers_created"] = sim.stats.ok.get("POST /servers", 0)
        summary["cost_eur"] = round(
            per_hour["scheduler"] + (summary["servers_created"] - 1) * per_hour["worker"], 4
        )
    console.print(_table(summary))
    return summary


def _use(
    cluster: HetznerCluster, workers: int, t0: float, summary: dict[str, Any], say: Any
) -> dict[str, float]:
    """Steps 2 to 4: compute, scale up, scale down. Returns the hourly prices by role."""
    import dask.array as da
    from distributed import Client, get_task_stream

    with Client(cluster) as client:
        client.wait_for_workers(workers, timeout=300)
        summary["time_to_ready_s"] = round(time.monotonic() - t0, 1)
        say(f"Ready in {summary['time_to_ready_s']} s. Dashboard: {cluster.dashboard_link}")
        say(f"Hourly price of these servers on Hetzner: {cluster.hourly_cost:.4f} EUR")

        say("\n[bold]2.[/bold] Computing the mean of a 4000x4000 random matrix plus its transpose.")
        with get_task_stream(client) as stream:
            x = da.random.random((4000, 4000), chunks=(1000, 1000))
            value = float((x + x.T).mean().compute())
        summary["tasks_computed"] = len(stream.data)
        say(f"Result {value:.4f}, {len(stream.data)} tasks on the workers.")

        say("\n[bold]3.[/bold] Scaling to 3 workers.")
        cluster.scale(3)
        client.wait_for_workers(3, timeout=300)
        say(f"3 workers: {sorted(w['name'] for w in client.scheduler_info()['workers'].values())}")

        say("\n[bold]4.[/bold] Scaling back to 1 worker (graceful: data moves first).")
        cluster.scale(1)
        deadline = time.monotonic() + 300
        while len(client.scheduler_info()["workers"]) > 1:
            if time.monotonic() > deadline:
                raise TimeoutError("scaling down to 1 worker took over 300 s")
            time.sleep(0.2)
        say("1 worker left.")
        # Each server Hetzner bills is charged at least one started hour.
        types = cluster.context.cloud.cached_server_types() or {}
        got = {s.role: s for s in cluster.context.servers.values()}  # the types the servers got
        return {role or "": types[s.server_type].hourly[s.location] for role, s in got.items()}


def _table(summary: dict[str, Any]) -> Table:
    table = Table(title="dask-hetzner demo summary")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("workers at start", str(summary["workers"]))
    table.add_row("time to ready", f"{summary['time_to_ready_s']} s")
    table.add_row("tasks computed", str(summary["tasks_computed"]))
    table.add_row("total run time", f"{summary['total_s']} s")
    table.add_row("API requests", str(summary["api_requests"]))
    table.add_row("servers created", str(summary["servers_created"]))
    table.add_row(
        "what it would have cost on Hetzner (each server billed one started hour)",
        f"{summary['cost_eur']:.4f} EUR",
    )
    table.add_row("resources left behind", str(sum(map(len, summary["leftovers"].values()))))
    return table


if __name__ == "__main__":
    run()
