"""The verbs that need only the API and the local state: ls, ssh, logs, nuke, types.

None of them imports distributed, so each answers in a fraction of a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
from typing import Any

import click

from .cli_common import api_options, as_expected, make_console, run

# ls ---------------------------------------------------------------------------------------------


@click.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@api_options
def ls(as_json: bool, token: str | None, endpoint: str | None) -> None:
    """List every cluster of the project (by label), with status, age and hourly cost."""
    from .manage import alist_clusters

    clusters = run(alist_clusters(token=token, api_endpoint=endpoint))
    if as_json:
        click.echo(json.dumps([c.to_dict() for c in clusters], indent=2))
        return
    if not clusters:
        click.echo("No clusters in this project.")
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("name", "scheduler", "workers", "types", "status", "age", "EUR/h", "billed EUR", "local state"):
        table.add_column(column, justify="right" if column in ("workers", "EUR/h", "age", "billed EUR") else "left")
    for c in clusters:
        table.add_row(
            c.name,
            str(c.schedulers),
            f"{c.workers} (+{c.not_joined} not joined)" if c.not_joined else str(c.workers),
            c.types,
            c.status,
            _age_text(c.age_seconds),
            f"{c.hourly_cost:.4f}",
            f"{c.billed:.4f}",
            "yes" if c.local_state else "no",
        )
    make_console().print(table)


def _age_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d{(s % 86400) // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


# ssh --------------------------------------------------------------------------------------------


class _DashDashCommand(click.Command):
    """``NAME [NODE] [-- COMMAND...]``: what follows ``--`` is the remote command, verbatim."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            i = args.index("--")
            ctx.meta["remote_command"] = args[i + 1 :]
            args = args[:i]
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return [*super().collect_usage_pieces(ctx), "[-- COMMAND...]"]


@click.command(cls=_DashDashCommand)
@click.argument("name")
@click.argument("node", required=False, default="scheduler")
@click.option("-t", "--tty", "force_tty", is_flag=True, help="Request a pty even with a command.")
@api_options
@click.pass_context
def ssh(
    ctx: click.Context,
    name: str,
    node: str,
    force_tty: bool,
    token: str | None,
    endpoint: str | None,
) -> None:
    """Log in to the scheduler (or worker NODE, e.g. worker-0): `ssh NAME [NODE] [-- COMMAND]`.

    Uses the cluster's own key and the server's pinned host key from the local state; never
    reads or writes ~/.ssh. Without COMMAND: an interactive shell. The exit status is the
    command's.
    """
    words = ctx.meta.get("remote_command") or []
    command = " ".join(words) if words else None  # joined like OpenSSH does
    status = run(_ssh(name, node, command, force_tty, token, endpoint))
    ctx.exit(status)


async def _ssh(
    name: str, node: str, command: str | None, force_tty: bool, token: str | None, endpoint: str | None
) -> int:
    from .manage import access, pick_node
    from .state import StateError

    acc = await access(name, token=token, api_endpoint=endpoint)
    server = pick_node(acc.servers, name, node)
    key = acc.host_keys.get(server.name)
    if not key:
        raise StateError(f"no pinned host key for {server.name} in {acc.state.path}: refusing to log in")
    if not server.public_ip or server.status != "running":
        raise StateError(f"server {server.name} is {server.status}: nothing to log in to")
    conn = await acc.connect(server.public_ip, key)
    local_tty = sys.stdin.isatty()
    pty = force_tty or (command is None and local_tty)
    loop = asyncio.get_running_loop()
    saved = None
    try:
        if pty and local_tty:
            import termios
            import tty

            saved = termios.tcgetattr(0)
            tty.setraw(0)
            loop.add_signal_handler(
                signal.SIGWINCH, lambda: conn.resize_session(*shutil.get_terminal_size())
            )
        size = tuple(shutil.get_terminal_size()) if pty else None
        return await conn.session(
            command,
            # Duplicates: asyncssh closes what it is given when the session ends.
            stdin=os.dup(0),
            stdout=os.dup(1),
            stderr=os.dup(2),
            term_type=os.environ.get("TERM", "xterm-256color") if pty else None,
            term_size=size,  # type: ignore[arg-type]
        )
    finally:
        if saved is not None:
            import termios

            loop.remove_signal_handler(signal.SIGWINCH)
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        for fd in (0, 1, 2):
            # Pipes and ttys were made non-blocking for asyncio; the shell shares them.
            with contextlib.suppress(OSError):
                os.set_blocking(fd, True)
        await conn.close()


# logs -------------------------------------------------------------------------------------------


@click.command()
@click.argument("name")
@click.argument("node", required=False)
@click.option("--lines", "-n", type=click.IntRange(min=1), default=1000, show_default=True, help="Last lines of each log.")
@api_options
def logs(name: str, node: str | None, lines: int, token: str | None, endpoint: str | None) -> None:
    """Print the dask and bootstrap logs of every node of NAME (or of NODE: scheduler, worker-0, ...)."""
    text = run(_logs(name, node, lines, token, endpoint))
    click.echo(text, nl=False)


async def _logs(name: str, node: str | None, lines: int, token: str | None, endpoint: str | None) -> str:
    from .manage import access, node_logs, pick_node

    acc = await access(name, token=token, api_endpoint=endpoint)
    if node:
        servers = [pick_node(acc.servers, name, node)]
    else:
        servers = sorted(acc.servers, key=lambda s: (s.role != "scheduler", s.name))
    found = await node_logs(acc.connect, servers, acc.host_keys, lines=lines)
    out = []
    for key, text in found.items():
        out.append(f"==> {key} <==\n{text}" + ("" if text.endswith("\n") else "\n"))
    return "\n".join(out)


# nuke -------------------------------------------------------------------------------------------


@click.command()
@click.argument("name", required=False)
@click.option("--all", "everything", is_flag=True, help="Every cluster of the project.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask.")
@api_options
def nuke(name: str | None, everything: bool, yes: bool, token: str | None, endpoint: str | None) -> None:
    """Delete everything labelled with cluster NAME (or --all), and the local state.

    By label equality: servers, network, firewall, placement groups, SSH key, snapshots.
    Works on half-created and broken clusters; no dask shutdown, no questions with --yes.
    """
    from .manage import alist_clusters, anuke, state_of

    if bool(name) == everything:
        raise click.UsageError("give a cluster NAME or --all (not both)")
    clusters = {c.name: c for c in run(alist_clusters(token=token, api_endpoint=endpoint))}
    if everything:
        names = sorted(clusters)
        if not names:
            click.echo("No clusters in this project.")
            return
    else:
        assert name is not None
        from .manage import check_name

        check_name(name)
        if name not in clusters and not state_of(name).path.exists():
            from .manage import unknown_cluster

            raise unknown_cluster(name)
        names = [name]
    for n in names:
        c = clusters.get(n)
        if c is None:
            click.echo(f"  {n}: local state only")
        else:
            extra = ", ".join(f"{v} {k}" for k, v in c.other_resources.items() if v)
            click.echo(
                f"  {n}: {len(c.servers)} servers ({c.status}), {extra or 'nothing else'}, "
                f"{c.hourly_cost:.4f} EUR/h"
            )
    if not yes:
        click.confirm(f"Delete {'these clusters' if len(names) > 1 else names[0]} for good?", abort=True)

    async def all_of_them() -> list[Any]:
        return await asyncio.gather(
            *(anuke(n, token=token, api_endpoint=endpoint) for n in names), return_exceptions=True
        )

    failures = []
    for n, result in zip(names, run(all_of_them()), strict=True):
        if isinstance(result, BaseException):
            if as_expected(result) is None:
                raise result
            failures.append(f"{n}: {result}")
        else:
            click.echo(f"Deleted {n} ({len(result)} resources).")
    if failures:
        raise click.ClickException("; ".join(failures))


# types ------------------------------------------------------------------------------------------


@click.command()
@click.option("--location", default=None, help="Availability and prices in this location.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@api_options
def types(location: str | None, as_json: bool, token: str | None, endpoint: str | None) -> None:
    """Server types with cores, memory, architecture, availability and prices (from the API)."""
    rows = run(_types(location, token, endpoint))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    # Short headers, no wrapping but in the last column: one line a type at 80 columns.
    table = Table(box=None, pad_edge=False, caption_justify="left")
    table.caption = f"prices in {location}; recommended: Hetzner recommends it there" if location else "prices: the cheapest location; where: orderable in (*: recommended there)"
    columns = ("name", "vCPU", "GB", "disk", "arch", "cpu", "EUR/h", "EUR/mo", "available" if location else "where")
    for column in columns:
        left = column in ("name", "arch", "cpu", "available", "where")
        table.add_column(column, justify="left" if left else "right", no_wrap=column not in ("available", "where"))
    for r in rows:
        table.add_row(
            r["name"],
            str(r["cores"]),
            f"{r['memory_gb']:g}",
            str(r["disk_gb"]),
            r["architecture"],
            r["cpu_type"],
            "-" if r["hourly"] is None else f"{r['hourly']:.4f}",
            "-" if r["monthly"] is None else f"{r['monthly']:.2f}",
            _where(r, location),
        )
    make_console().print(table, soft_wrap=False)


def _where(row: dict[str, Any], location: str | None) -> str:
    """Where a type can be ordered: yes/recommended/no in one location, else the locations."""
    if location:
        return "recommended" if row["recommended"] else ("yes" if row["available"] else "no")
    marked = [x + ("*" if x in row["recommended"] else "") for x in row["available"]]
    return ", ".join(marked) or "nowhere"


async def _types(location: str | None, token: str | None, endpoint: str | None) -> list[dict[str, Any]]:
    from .cloud import ConfigError
    from .manage import project_cloud

    async with project_cloud(token, endpoint) as cloud:
        catalog, locations = await asyncio.gather(cloud.server_types(), cloud.locations())
    if location is not None and location not in locations:
        raise ConfigError(f"unknown location {location!r}; valid locations: {', '.join(sorted(locations))}")
    rows = []
    for t in catalog.values():
        if location:
            hourly, monthly = t.hourly.get(location), t.monthly.get(location)
            available: Any = location in t.available
            recommended: Any = location in t.recommended
        else:
            cheapest = min(t.hourly, key=lambda loc: t.hourly[loc], default=None)
            hourly = t.hourly.get(cheapest) if cheapest else None
            monthly = t.monthly.get(cheapest) if cheapest else None
            available = sorted(t.available)
            recommended = sorted(t.recommended)
        rows.append(
            {
                "name": t.name,
                "cores": t.cores,
                "memory_gb": t.memory_gb,
                "disk_gb": t.disk_gb,
                "architecture": t.architecture,
                "cpu_type": t.cpu_type,
                "deprecated": t.deprecated,
                "available": available,
                "recommended": recommended,
                "hourly": hourly,
                "monthly": monthly,
            }
        )
    rows.sort(key=lambda r: (r["architecture"], r["cpu_type"], r["hourly"] or 0.0, r["name"]))
    return rows
