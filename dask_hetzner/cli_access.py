"""``dask-hetzner access export|import``: a cluster's access in one file, for another machine."""

from __future__ import annotations

import click


@click.group()
def access() -> None:
    """Move a cluster's access (keys, pinned host keys, settings; never the token) between machines."""


@access.command("export")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False, writable=True))
@click.option("--encrypt", is_flag=True, help="Protect the file with a passphrase (asked for).")
def export_cmd(name: str, file: str, encrypt: bool) -> None:
    """Write cluster NAME's access to FILE (0600; an existing FILE is never replaced)."""
    from .access import export_access

    passphrase = click.prompt("Passphrase", hide_input=True, confirmation_prompt=True) if encrypt else None
    path = export_access(name, file, passphrase)
    click.echo(f"Access of {name} written to {path}; on the other machine: dask-hetzner access import {path}")


@access.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
def import_cmd(file: str) -> None:
    """Add the access in FILE to this machine's local state (asks for a passphrase if needed)."""
    from .access import import_access, read_access
    from .state import StateError

    passphrase = None
    try:
        read_access(file)
    except StateError as e:
        if "passphrase" not in str(e):
            raise
        passphrase = click.prompt("Passphrase", hide_input=True)
    name = import_access(file, passphrase)
    click.echo(f"Cluster {name} can be reached from here: HetznerCluster.from_name({name!r}), dask-hetzner scale/destroy")
