"""Checks of single inputs that reach the API or a remote command: one clear line each.

The settings record (settings.py), the constructor, ``scale``/``adapt`` and the config's
token call these before anything exists; each refusal names the input and never echoes a
secret. Option keys become ``--flags`` of remote command lines, so they are checked here
(values are quoted by launch.py).
"""

from __future__ import annotations

import ipaddress
import math
import numbers
import re
from collections.abc import Iterable, Mapping
from typing import Any

from .cloud import ConfigError

# A dask CLI flag name: "memory_limit" -> "--memory-limit". Nothing a shell would read.
_OPTION_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


def option_keys(options: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``worker_options``/``scheduler_options``: a mapping whose keys are plain flag names."""
    if not isinstance(options, Mapping):
        raise ConfigError(f"{what} must be a mapping of option names to values, got {type(options).__name__}")
    for key in options:
        if not isinstance(key, str) or not _OPTION_KEY.fullmatch(key):
            raise ConfigError(
                f"{what}: invalid option name {key!r} (letters, digits, '_' and '-', starting with a letter)"
            )
    return dict(options)


def string_list(value: Any, what: str) -> tuple[str, ...]:
    """A list of strings; a lone string is refused (``list("numpy")`` is five packages)."""
    if value is None:
        return ()
    if isinstance(value, str | bytes) or not isinstance(value, Iterable) or isinstance(value, Mapping):
        raise ConfigError(f"{what} must be a list of strings, got {value!r}")
    items = tuple(value)
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"{what} must be a list of non-empty strings, got {item!r} in it")
    return items


def cidrs(value: Any) -> tuple[str, ...]:
    """``allowed_cidrs``: at least one network in CIDR notation; never widened when empty."""
    items = string_list(value, "allowed_cidrs")
    if not items:
        raise ConfigError(
            "allowed_cidrs is empty: give the networks that may reach SSH, e.g. ['203.0.113.7/32'] "
            "(['0.0.0.0/0', '::/0'] for everyone)"
        )
    for item in items:
        network(item, "allowed_cidrs")
    return items


def network(value: Any, what: str) -> str:
    """One IPv4 or IPv6 network in CIDR notation (``10.0.0.0/16``), host bits unset."""
    if not isinstance(value, str) or "/" not in value:
        raise ConfigError(f"{what}: {value!r} is not a network in CIDR notation (e.g. 10.0.0.0/16)")
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        raise ConfigError(f"{what}: {value!r} is not a network in CIDR notation ({e})") from None
    return value


def count(value: Any, what: str) -> int:
    """A number of workers: a non-negative integer (not a bool, not a float; numpy's are fine)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ConfigError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def optional_positive(value: Any, what: str) -> Any:
    """``cores=``/``memory=`` of ``scale``: None, or more than zero."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be positive, got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{what} must be positive, got {value!r}")
    elif isinstance(value, str):
        if value.strip().startswith("-"):
            raise ConfigError(f"{what} must be positive, got {value!r}")
    else:
        raise ConfigError(f"{what} must be a number or a size, got {value!r}")
    return value


def bounds(minimum: Any, maximum: Any) -> None:
    """``adapt``'s minimum and maximum: numbers, minimum >= 0, minimum <= maximum."""
    for what, v in (("minimum", minimum), ("maximum", maximum)):
        if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v) or v < 0:
            raise ConfigError(f"adapt: {what} must be a non-negative number, got {v!r}")
    if minimum > maximum:
        raise ConfigError(f"adapt: minimum {minimum!r} is larger than maximum {maximum!r}")



def port(value: Any, what: str, *, zero: bool = True) -> int:
    """A TCP port (0: let the process pick one, where ``zero``); digits in a string are fine
    (environment variables and the CLI give strings)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not (0 if zero else 1) <= value <= 65535:
        raise ConfigError(f"{what} must be a TCP port number, got {value!r}")
    return value
