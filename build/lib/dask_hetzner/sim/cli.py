"""``sim``: run the simulator until SIGINT/SIGTERM (also ``python -m dask_hetzner.sim``).

The first two lines of stdout are ``HCLOUD_ENDPOINT=...`` and ``HCLOUD_TOKEN=...``
so a script can ``eval`` or parse them; logs go to stderr.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import click

from .timing import PROFILES


async def _serve(options: dict, faults: tuple[str, ...]) -> None:
    from . import Simulator, parse_fault

    # Handlers first: a signal right after the two lines must still stop cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    rules = [parse_fault(f) for f in faults]
    sim = Simulator(faults=rules, **options)
    await sim.start()
    try:
        print(f"HCLOUD_ENDPOINT={sim.endpoint}", flush=True)
        print(f"HCLOUD_TOKEN={sim.token}", flush=True)
        await stop.wait()
        logging.getLogger(__name__).info("stopping: deleting every server")
    finally:
        await sim.close()  # deletes every server and its processes


@click.command("sim")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the API listens on.")
@click.option("--port", default=0, type=int, show_default=True, help="API port (0: any free port).")
@click.option("--token", default=None, help="API token clients must send (random by default).")
@click.option("--profile", type=click.Choice(PROFILES), default="instant", show_default=True)
@click.option("--time-scale", default=1.0, type=float, show_default=True, help="Multiply every duration.")
@click.option("--seed", default=None, type=int, help="Seed of the timing RNG.")
@click.option("--rate-limit", default=3600, type=int, show_default=True, help="Requests an hour.")
@click.option("--server-limit", default=None, type=int, help="Servers the project may hold.")
@click.option("--ssh-port", default=22, type=int, show_default=True, help="SSH port of the simulated hosts.")
@click.option(
    "--fault",
    "faults",
    multiple=True,
    metavar="KIND:KEY=VALUE,...",
    help="Inject a fault rule, e.g. 'resource_unavailable:location=fsn1,count=2'. Repeatable.",
)
@click.option("--no-hosts", is_flag=True, help="API only: no SSH endpoints, no processes.")
@click.option("--verbose", "-v", is_flag=True, help="Log at INFO level to stderr.")
def sim(
    host: str,
    port: int,
    token: str | None,
    profile: str,
    time_scale: float,
    seed: int | None,
    rate_limit: int,
    server_limit: int | None,
    ssh_port: int,
    faults: tuple[str, ...],
    no_hosts: bool,
    verbose: bool,
) -> None:
    """Run a local Hetzner Cloud API (and simulated hosts) until interrupted."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr)
    from .faults import parse_fault

    for f in faults:  # fail fast on a bad --fault, before anything listens
        try:
            parse_fault(f)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--fault") from None
    options = {
        "host": host,
        "port": port,
        "token": token,
        "profile": profile,
        "time_scale": time_scale,
        "seed": seed,
        "rate_limit": rate_limit,
        "server_limit": server_limit,
        "ssh_port": ssh_port,
        "hosts": not no_hosts,
    }
    asyncio.run(_serve(options, faults))


main = sim
