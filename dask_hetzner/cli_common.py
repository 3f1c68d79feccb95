"""What every ``dask-hetzner`` verb shares: API options, expected errors, running, waiting."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from rich.console import Console

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


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
        ("dask_hetzner.provision.node", "BootstrapError"),
        ("dask_hetzner.environment", "VersionMismatch"),
    ):
        if module in sys.modules:
            classes.append(getattr(sys.modules[module], name))
    return tuple(classes)


def as_expected(e: BaseException) -> BaseException | None:
    expected = _expected()
    # SpecCluster wraps a failed start in RuntimeError("Cluster failed to start: ...").
    for candidate in (e, e.__cause__):
        if isinstance(candidate, expected):
            return candidate
    return None


def api_options(f: F) -> F:
    f = click.option(
        "--endpoint",
        default=None,
        metavar="URL",
        help="API endpoint (default: $HCLOUD_ENDPOINT, else Hetzner's).",
    )(f)
    f = click.option(
        "--token",
        default=None,
        metavar="TOKEN",
        callback=_token_option,
        help="API token, or - to read it from stdin (default: $HCLOUD_TOKEN; on the command "
        "line other users can read it in the process list).",
    )(f)
    return f


def _token_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value == "-":
        return sys.stdin.readline().strip() or None
    if value:
        click.echo(
            "Warning: a token given with --token is visible to other users of this machine "
            "(/proc/PID/cmdline): prefer HCLOUD_TOKEN or --token -",
            err=True,
        )
    return value


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def make_console(stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f} s")
        time.sleep(0.2)  # polling a value another thread updates


def start_timeout() -> float:
    from . import config

    return sum(config.seconds(f"timeouts.{k}") for k in config.START_TIMEOUTS)
