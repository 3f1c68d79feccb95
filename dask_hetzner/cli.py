"""``dask-hetzner`` (also ``dask hetzner``): create, find, reach, scale, inspect and delete clusters.

Every verb has ``--help``. Exit status 0 on success; an expected failure (unknown cluster,
refused token, unknown server type, ...) prints one ``Error: ...`` line and exits 1, without
a traceback. The token and endpoint come from ``--token``/``--endpoint``, else
``HCLOUD_TOKEN``/``HCLOUD_ENDPOINT`` (or ``hetzner.token``/``hetzner.api-endpoint``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from rich.console import Console

    from .cluster import HetznerCluster

F = TypeVar("F", bound=Callable[..., Any])


# Errors ----------------------------------------------------------------------------------------


def _expected() -> tuple[type[BaseException], ...]:
    """Failures that are the user's or the cloud's, not bugs: reported without a traceback."""
    from .cloud import CloudError, ConfigError
    from .remote import RemoteError
    from .state import StateError

    classes: list[type[BaseException]] = [ConfigError, CloudError, StateError, RemoteError, TimeoutError]
    # Only from modules already loaded: an error of a module never imported cannot have
    # been raised, and importing them (distributed) would cost seconds.
    for module, name in (
        ("dask_hetzner.attach", "AttachError"),
        ("dask_hetzner.nodes", "BootstrapError"),
        ("dask_hetzner.environment", "VersionMismatch"),
    ):
        if module in sys.modules:
            classes.append(getattr(sys.modules[module], name))
    return tuple(classes)


def _as_expected(e: BaseException) -> BaseException | None:
    expected = _expected()
    # SpecCluster wraps a failed start in RuntimeError("Cluster failed to start: ...").
    for candidate in (e, e.__cause__):
        if isinstance(candidate, expected):
            return candidate
    return None


class _Group(click.Group):
    """Expected errors become ``Error: <message>`` and exit status 1; ``sim`` loads lazily."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except Exception as e:
            cause = _as_expected(e)
            if cause is None:
                raise
            raise click.ClickException(str(cause).strip() or type(cause).__name__) from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), "sim"})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "sim":
            # The simulator is never imported by production code except for this verb.
            from .sim.cli import sim

            return sim
        return super().get_command(ctx, cmd_name)


@click.group(name="hetzner", cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Dask clusters on Hetzner Cloud servers.

    Token and endpoint: --token/--endpoint, else HCLOUD_TOKEN/HCLOUD_ENDPOINT.
    """


def main(argv: list[str] | None = None) -> None:
    """The ``dask-hetzner`` console script."""
    cli.main(args=argv, prog_name="dask-hetzner")


def api_options(f: F) -> F:
    f = click.option(
        "--endpoint",
        default=None,
        metavar="URL",
        help="API endpoint (default: $HCLOUD_ENDPOINT, else Hetzner's).",
    )(f)
    f = click.option(
        "--token", default=None, metavar="TOKEN", help="API token (default: $HCLOUD_TOKEN)."
    )(f)
    return f


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f} s")
        time.sleep(0.2)  # polling a value another thread updates


def _start_timeout() -> float:
    from . import config

    return sum(config.seconds(f"timeouts.{k}") for k in config.START_TIMEOUTS)


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


class _Progress:
    """Each server's phase: a live table on a terminal, one line per change otherwise."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.phases: dict[str, tuple[str, float]] = {}
        self.t0 = time.monotonic()
        self.live: Any = None

    def _table(self) -> Any:
        from rich.table import Table

        table = Table(box=None, pad_edge=False)
        table.add_column("node")
        table.add_column("phase")
        table.add_column("since", justify="right")
        for node, (phase, since) in sorted(
            self.phases.items(), key=lambda kv: (kv[0] != "scheduler", kv[0])
        ):
            style = "green" if phase == "running" else "yellow"
            table.add_row(node, f"[{style}]{phase}[/{style}]", f"{since - self.t0:5.1f} s")
        return table

    def __call__(self, node: str, phase: str) -> None:
        # Called on the cluster's event loop thread: only cheap, thread-safe work here.
        if self.phases.get(node, ("",))[0] == phase:
            return
        self.phases[node] = (phase, time.monotonic())
        if self.live is not None:
            self.live.update(self._table())
        else:
            print(f"{node}: {phase}", flush=True)

    def __enter__(self) -> _Progress:
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self._table(), console=self.console, refresh_per_second=4)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
            self.live = None


# create -----------------------------------------------------------------------------------------


@cli.command()
@click.option("-n", "--workers", type=click.IntRange(min=0), default=None, help="Workers to start with.")
@click.option("--name", default=None, help="Cluster name (default: made up).")
@click.option("--worker-type", default=None, help="Server type of the workers (see `types`).")
@click.option("--scheduler-type", default=None, help="Server type of the scheduler.")
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

    console = _console()
    progress = _Progress(console)
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
            try:
                n = len(cluster.worker_spec)
                _wait(
                    lambda: len(cluster.scheduler_info.get("workers", {})) >= n,
                    _start_timeout(),
                    f"{n} workers connected to the scheduler",
                )
                summary = _summary(cluster)
            except BaseException:
                cluster.close()  # a start that did not complete is rolled back
                raise
            cluster.detach()
    except KeyboardInterrupt:
        signum = caught["signal"] or signal.SIGINT
        click.echo(
            f"Interrupted ({signal.Signals(signum).name}): everything created was deleted.", err=True
        )
        sys.exit(128 + int(signum))
    _print_summary(console, summary)


def _summary(cluster: HetznerCluster) -> dict[str, Any]:
    ctx = cluster.context
    scheduler = cluster.scheduler
    dashboard_port = getattr(scheduler, "dashboard_port", None)
    private = (ctx.scheduler_private or "").removeprefix("tls://").rsplit(":", 1)[0]
    return {
        "name": cluster.name,
        "workers": len(cluster.worker_spec),
        "scheduler_type": ctx.scheduler_type,
        "worker_type": ctx.worker_type,
        "location": ctx.location,
        "connect": ctx.connect,
        "scheduler": ctx.scheduler_private,
        "public_scheduler": cluster.scheduler_address if ctx.connect == "public" else None,
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


# ls ---------------------------------------------------------------------------------------------


@cli.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@api_options
def ls(as_json: bool, token: str | None, endpoint: str | None) -> None:
    """List every cluster of the project (by label), with status, age and hourly cost."""
    from .manage import alist_clusters

    clusters = _run(alist_clusters(token=token, api_endpoint=endpoint))
    if as_json:
        click.echo(json.dumps([c.to_dict() for c in clusters], indent=2))
        return
    if not clusters:
        click.echo("No clusters in this project.")
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("name", "scheduler", "workers", "status", "age", "EUR/h", "local state"):
        table.add_column(column, justify="right" if column in ("workers", "EUR/h", "age") else "left")
    for c in clusters:
        table.add_row(
            c.name,
            str(c.schedulers),
            str(c.workers),
            c.status,
            _age_text(c.age_seconds),
            f"{c.hourly_cost:.4f}",
            "yes" if c.local_state else "no",
        )
    _console().print(table)


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


@cli.command(cls=_DashDashCommand)
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
    status = _run(_ssh(name, node, command, force_tty, token, endpoint))
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


# scale ------------------------------------------------------------------------------------------


@cli.command()
@click.argument("name")
@click.argument("n", type=click.IntRange(min=0))
@api_options
def scale(name: str, n: int, token: str | None, endpoint: str | None) -> None:
    """Scale cluster NAME to N workers and wait until they are there (or gone)."""
    from .cluster import HetznerCluster

    cluster = HetznerCluster.from_name(name, token=token, api_endpoint=endpoint)
    try:
        before = len(cluster.worker_spec)
        cluster.scale(n)
        cluster.sync(cluster._correct_state)
        _wait(
            lambda: len(cluster.scheduler_info.get("workers", {})) == n
            and len(cluster.workers) == n,
            _start_timeout(),
            f"{n} workers",
        )
        cost = cluster.hourly_cost
    finally:
        cluster.detach()
    click.echo(f"Cluster {name}: {before} -> {n} workers, {cost:.4f} EUR/h")


# logs -------------------------------------------------------------------------------------------


@cli.command()
@click.argument("name")
@click.argument("node", required=False)
@click.option("--lines", "-n", type=click.IntRange(min=1), default=1000, show_default=True, help="Last lines of each log.")
@api_options
def logs(name: str, node: str | None, lines: int, token: str | None, endpoint: str | None) -> None:
    """Print the dask and bootstrap logs of every node of NAME (or of NODE: scheduler, worker-0, ...)."""
    text = _run(_logs(name, node, lines, token, endpoint))
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


# destroy / nuke ---------------------------------------------------------------------------------


@cli.command()
@click.argument("name")
@api_options
def destroy(name: str, token: str | None, endpoint: str | None) -> None:
    """Reattach to NAME and close it: stop dask, delete every server and resource, and its state.

    For a broken cluster or one without local state, use `nuke`.
    """
    from .cluster import HetznerCluster

    cluster = HetznerCluster.from_name(name, token=token, api_endpoint=endpoint)
    cluster.close()
    click.echo(f"Cluster {name} deleted.")


@cli.command()
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
    clusters = {c.name: c for c in _run(alist_clusters(token=token, api_endpoint=endpoint))}
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
            from .manage import UnknownCluster

            raise UnknownCluster(f"no cluster named {name!r} in this project (nothing carries its label)")
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
    for n, result in zip(names, _run(all_of_them()), strict=True):
        if isinstance(result, BaseException):
            if _as_expected(result) is None:
                raise result
            failures.append(f"{n}: {result}")
        else:
            click.echo(f"Deleted {n} ({len(result)} resources).")
    if failures:
        raise click.ClickException("; ".join(failures))


# types ------------------------------------------------------------------------------------------


@cli.command()
@click.option("--location", default=None, help="Availability and prices in this location.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@api_options
def types(location: str | None, as_json: bool, token: str | None, endpoint: str | None) -> None:
    """Server types with cores, memory, architecture, availability and prices (from the API)."""
    rows = _run(_types(location, token, endpoint))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    where = f" in {location}" if location else " (cheapest location)"
    table = Table(box=None, pad_edge=False)
    for column in ("name", "vCPU", "memory GB", "disk GB", "arch", "cpu", "available", f"EUR/h{where}", "EUR/month"):
        table.add_column(column, justify="left" if column in ("name", "arch", "cpu", "available") else "right")
    for r in rows:
        table.add_row(
            r["name"],
            str(r["cores"]),
            f"{r['memory_gb']:g}",
            str(r["disk_gb"]),
            r["architecture"],
            r["cpu_type"],
            ("yes" if r["available"] else "no") if location else (", ".join(r["available"]) or "nowhere"),
            "-" if r["hourly"] is None else f"{r['hourly']:.4f}",
            "-" if r["monthly"] is None else f"{r['monthly']:.2f}",
        )
    _console().print(table)


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
        else:
            cheapest = min(t.hourly, key=lambda loc: t.hourly[loc], default=None)
            hourly = t.hourly.get(cheapest) if cheapest else None
            monthly = t.monthly.get(cheapest) if cheapest else None
            available = sorted(t.available)
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
                "hourly": hourly,
                "monthly": monthly,
            }
        )
    rows.sort(key=lambda r: (r["architecture"], r["cpu_type"], r["hourly"] or 0.0, r["name"]))
    return rows


# demo -------------------------------------------------------------------------------------------


@cli.command()
@click.option("-n", "--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Workers to start with.")
def demo(workers: int) -> None:
    """A real Dask cluster on the simulator: create, compute, scale, close (no token needed)."""
    from .demo import run

    summary = run(workers=workers)
    if summary.get("leftovers"):
        raise click.ClickException(f"resources left behind: {summary['leftovers']}")


if __name__ == "__main__":
    main()
