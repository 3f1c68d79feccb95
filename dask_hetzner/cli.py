"""``dask-hetzner`` (also ``dask hetzner``): create, find, reach, scale, inspect and delete clusters.

Every verb has ``--help``. Exit status 0 on success; an expected failure (unknown cluster,
refused token, unknown server type, ...) prints one ``Error: ...`` line and exits 1, without
a traceback. The token and endpoint come from ``--token``/``--endpoint``, else
``HCLOUD_TOKEN``/``HCLOUD_ENDPOINT`` (or ``hetzner.token``/``hetzner.api-endpoint``).

This module is the group and its wiring; the verbs live in ``cli_cluster`` (create, scale,
destroy: they run a cluster here) and ``cli_manage`` (ls, ssh, logs, nuke, types: API and
local state only, no distributed), what they share in ``cli_common``.
"""

from __future__ import annotations

from typing import Any

import click

from .cli_access import access
from .cli_cluster import create, destroy, scale
from .cli_common import as_expected
from .cli_dashboard import dashboard
from .cli_manage import logs, ls, nuke, ssh, types


class _Group(click.Group):
    """Expected errors become ``Error: <message>`` and exit status 1; ``sim`` loads lazily."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except Exception as e:
            cause = as_expected(e)
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


for verb in (create, scale, destroy, ls, ssh, logs, nuke, types, dashboard, access):
    cli.add_command(verb)


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
