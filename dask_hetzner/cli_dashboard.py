"""``dask-hetzner dashboard NAME``: the scheduler's dashboard through an SSH tunnel, from anywhere
the cluster's local state is (no distributed imported)."""

from __future__ import annotations

import asyncio
import json
import webbrowser

import click

from .cli_common import api_options, run


@click.command()
@click.argument("name")
@click.option("--open", "open_browser", is_flag=True, help="Open the link in a web browser too.")
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="Local port (default: any free one).")
@api_options
def dashboard(name: str, open_browser: bool, port: int, token: str | None, endpoint: str | None) -> None:
    """Open a tunnel to cluster NAME's dashboard, print its link, keep it open until Ctrl-C.

    The dashboard is never opened to the internet: it goes through SSH to the scheduler's
    server with the cluster's own key and pinned host key from the local state.
    """
    try:
        run(_dashboard(name, open_browser, port, token, endpoint))
    except KeyboardInterrupt:
        click.echo("tunnel closed", err=True)


async def _dashboard(name: str, open_browser: bool, port: int, token: str | None, endpoint: str | None) -> None:
    from . import layout
    from .manage import access, pick_node
    from .state import StateError

    acc = await access(name, token=token, api_endpoint=endpoint)
    server = pick_node(acc.servers, name, "scheduler")
    key = acc.host_keys.get(server.name)
    if not key or not server.public_ip or not server.private_ip:
        raise StateError(f"server {server.name} is {server.status} or has no pinned host key: no dashboard to reach")
    conn = await acc.connect(server.public_ip, key)
    try:
        info = json.loads((await conn.run(f"cat {layout.SCHEDULER_FILE}", timeout=30)).stdout)
        remote_port = (info.get("services") or {}).get("dashboard")
        if not remote_port:
            raise StateError(f"cluster {name!r}: its scheduler runs without a dashboard")
        _, local = await conn.forward_local(server.private_ip, int(remote_port), local_port=port)
        link = f"http://127.0.0.1:{local}/status"
        click.echo(f"Dashboard: {link}  (Ctrl-C closes the tunnel)")
        if open_browser:
            await asyncio.to_thread(webbrowser.open, link)
        await conn.wait_closed()  # until Ctrl-C, or the server went away
        raise StateError(f"cluster {name!r}: the connection to {server.name} was closed")
    finally:
        await conn.close()
