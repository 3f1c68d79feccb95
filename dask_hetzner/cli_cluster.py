"""The verbs that run a ``HetznerCluster`` in this process: create, scale, destroy.

They import distributed (seconds); the verbs of ``cli_manage`` do not.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click

from .cli_common import api_options, make_console, start_timeout, wait
from .progress import TerminalProgress

if TYPE_CHECKING:
    from rich.console import Console

    from .cluster import HetznerCluster


# Signals during create ---------------------------------------------------------------------------


@contextlib.contextmanager
def _roll_back_on_signals() -> Iterator[dict[str, int | None]]:
    """SIGTERM takes Ctrl-C's path (KeyboardInterrupt: HetznerCluster rolls back what exists);
    further SIGINT/SIGTERM are ignored so they cannot cut the rollback short."""
    caught: dict[str, int | None] = {"signal": None}

    def during_rollback(signum: int, frame: Any) -> None:
        print("still deleting what was created; please wait", file=sys.stderr, flush=True)

    def first(signum: int, frame: Any) -> None:
        caught["signal"] = signum
        signal.signal(signal.SIGINT, during_rollback)
        signal.signal(signal.SIGTERM, during_rollback)
        raise KeyboardInterrupt

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, first)
    signal.signal(signal.SIGTERM, first)
    try:
        yield caught
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


# create -----------------------------------------------------------------------------------------


@click.command()
@click.option("-n", "--workers", type=click.IntRange(min=0), default=None, help="Workers to start with.")
@click.option("--name", default=None, help="Cluster name (default: made up).")
@click.option(
    "--worker-type", default=None, help="Server type of the workers, or a preference list: cx33,cpx32 (see `types`)."
)
@click.option("--scheduler-type", default=None, help="Server type (or list, like --worker-type) of the scheduler.")
@click.option("--location", default=None, help="Hetzner location (fsn1, nbg1, hel1, ash, hil, sin).")
@click.option(
    "--fallback-location",
    "fallback_locations",
    multiple=True,
    help="Location of the same network zone to try when a type is sold out. Repeatable.",
)
@click.option("--image", default=None, help="Server image (default ubuntu-24.04).")
@click.option("--package", "packages", multiple=True, help="Extra pip requirement for the servers. Repeatable.")
@click.option("--connect", type=click.Choice(["tunnel", "public"]), default=None, help="How clients reach the scheduler.")
@click.option("--max-hourly-cost", type=float, default=None, help="Refuse sizes above this many EUR/h.")
@click.option("--idle-timeout", default=None, help="Delete the cluster after this long idle (e.g. 1h).")
@api_options
def create(
    workers: int | None,
    name: str | None,
    worker_type: str | None,
    scheduler_type: str | None,
    location: str | None,
    fallback_locations: tuple[str, ...],
    image: str | None,
    packages: tuple[str, ...],
    connect: str | None,
    max_hourly_cost: float | None,
    idle_timeout: str | None,
    token: str | None,
    endpoint: str | None,
) -> None:
    """Create a cluster and leave it running after this command exits.

    Ctrl-C or SIGTERM while it starts deletes everything created so far.
    """
    from .cluster import HetznerCluster

    console = make_console()
    progress = TerminalProgress(console)
    try:
        with _roll_back_on_signals() as caught, progress:
            cluster = HetznerCluster(
                workers=workers,
                name=name,
                worker_server_type=worker_type,
                scheduler_server_type=scheduler_type,
                location=location,
                fallback_locations=list(fallback_locations) or None,
                image=image,
                packages=list(packages) or None,
                connect=connect,
                max_hourly_cost=max_hourly_cost,
                idle_timeout=idle_timeout,
                token=token,
                api_endpoint=endpoint,
                progress=progress,
            )
            summary = _wait_then_detach(cluster)
    except KeyboardInterrupt:
        signum = caught["signal"] or signal.SIGINT
        click.echo(
            f"Interrupted ({signal.Signals(signum).name}): everything created was deleted.", err=True
        )
        sys.exit(128 + int(signum))
    _print_summary(console, summary)


def _wait_then_detach(cluster: HetznerCluster) -> dict[str, Any]:
    """Until every worker is connected; then leave the cluster running (else roll it back)."""
    try:
        n = len(cluster.worker_spec)
        wait(
            lambda: len(cluster.scheduler_info.get("workers", {})) >= n,
            start_timeout(),
            f"{n} workers connected to the scheduler",
        )
        summary = _summary(cluster)
    except BaseException:
        cluster.close()  # a start that did not complete is rolled back
        raise
    cluster.detach()
    return summary


def _mix(cluster: HetznerCluster, role: str) -> str:
    from .display import type_mix

    return type_mix(cluster.context.servers.values(), role)


def _summary(cluster: HetznerCluster) -> dict[str, Any]:
    s, address = cluster.settings, cluster.context.scheduler.address
    scheduler = cluster.scheduler
    dashboard_port = getattr(scheduler, "dashboard_port", None)
    private = (address or "").removeprefix("tls://").rsplit(":", 1)[0]
    return {
        "name": cluster.name,
        "workers": len(cluster.worker_spec),
        # The types the servers got (from the preference lists).
        "scheduler_type": _mix(cluster, "scheduler") or "/".join(s.scheduler_server_type),
        "worker_type": _mix(cluster, "worker") or "/".join(s.worker_server_type),
        "location": s.location,
        "connect": s.connect,
        "scheduler": address,
        "public_scheduler": cluster.scheduler_comm.address if s.connect == "public" and cluster.scheduler_comm else None,
        "dashboard": f"http://{private}:{dashboard_port}/status" if dashboard_port else None,
        "hourly_cost": cluster.hourly_cost,
        "state_dir": cluster.state_dir,
    }


def _print_summary(console: Console, s: dict[str, Any]) -> None:
    say = console.print
    name = s["name"]
    say(
        f"[bold]Cluster {name} is running[/bold]: scheduler ({s['scheduler_type']}) and "
        f"{s['workers']} worker{'' if s['workers'] == 1 else 's'} ({s['worker_type']}) in {s['location']}."
    )
    say(f"Hourly cost: {s['hourly_cost']:.4f} EUR/h (gross, billed until deleted)")
    say(f"Scheduler address: {s['scheduler']} (private network)")
    if s["public_scheduler"]:
        say(f"Public scheduler address: {s['public_scheduler']} (TLS, this cluster's CA)")
    if s["dashboard"]:
        say(f"Dashboard: {s['dashboard']} (private network; through SSH from from_name)")
    say("Use it from Python:")
    say(f'    cluster = HetznerCluster.from_name("{name}"); client = cluster.get_client()')
    say("    print(cluster.dashboard_link)   # the dashboard through an SSH tunnel")
    say(f"Delete it: dask-hetzner destroy {name}")
    say(f"Local state: {s['state_dir']}")


# scale ------------------------------------------------------------------------------------------


@click.command()
@click.argument("name")
@click.argument("n", type=click.IntRange(min=0))
@api_options
def scale(name: str, n: int, token: str | None, endpoint: str | None) -> None:
    """Scale cluster NAME to N workers and wait until they are there (or gone)."""
    from .cluster import HetznerCluster

    click.echo(f"Cluster {name}: reattaching")
    progress = TerminalProgress(make_console())
    cluster = HetznerCluster.from_name(name, token=token, api_endpoint=endpoint, progress=progress)
    try:
        before = len(cluster.worker_spec)
        if n < before:
            click.echo(f"Cluster {name}: retiring {before - n} worker(s) and deleting their servers")
        with progress:  # new servers' phases as they come
            cluster.scale(n)
            cluster.sync(cluster._correct_state)
            wait(
                lambda: len(cluster.scheduler_info.get("workers", {})) == n
                and len(cluster.workers) == n,
                start_timeout(),
                f"{n} workers",
            )
        cost = cluster.hourly_cost
    finally:
        cluster.detach()
    click.echo(f"Cluster {name}: {before} -> {n} workers, {cost:.4f} EUR/h")


# destroy ----------------------------------------------------------------------------------------


@click.command()
@click.argument("name")
@api_options
def destroy(name: str, token: str | None, endpoint: str | None) -> None:
    """Reattach to NAME and close it: stop dask, delete every server and resource, and its state.

    For a broken cluster or one without local state, use `nuke`.
    """
    from .cluster import HetznerCluster

    click.echo(f"Cluster {name}: reattaching")
    cluster = HetznerCluster.from_name(name, token=token, api_endpoint=endpoint)
    servers = len(cluster.context.servers)
    plural = "s" if servers != 1 else ""
    click.echo(f"Cluster {name}: deleting {servers} server{plural}, then its network, firewall and SSH key")
    cluster.close()
    click.echo(f"Cluster {name} deleted.")
