"""``hetzner.*`` defaults in ``dask.config``, loaded from the YAML file beside this module."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dask.config
import yaml

DEFAULT_ENDPOINT = "https://api.hetzner.cloud/v1"
_defaults_file = Path(__file__).with_name("hetzner.yaml")

with _defaults_file.open() as f:
    defaults: dict[str, Any] = yaml.safe_load(f)

# Only registers defaults in memory: nothing is written into the user's config directory.
dask.config.update_defaults(defaults)


# The hetzner.timeouts.* whose sum bounds a node's whole start (create to dask running).
START_TIMEOUTS = ("server-create", "ssh", "bootstrap", "process-start")


def get(key: str, default: Any = None) -> Any:
    """``dask.config.get("hetzner." + key)``."""
    return dask.config.get(f"hetzner.{key}", default=default)


def token(explicit: str | None = None) -> str | None:
    """The API token; surrounding whitespace (a pasted line break) is not part of it."""
    value = explicit or get("token") or os.environ.get("HCLOUD_TOKEN") or None
    return value.strip() or None if isinstance(value, str) else value


def endpoint(explicit: str | None = None) -> str:
    return explicit or get("api-endpoint") or os.environ.get("HCLOUD_ENDPOINT") or DEFAULT_ENDPOINT


def seconds(key: str) -> float:
    """A ``hetzner.timeouts.*`` or other duration key, in seconds."""
    value = get(key)
    parsed = dask.utils.parse_timedelta(value)
    if parsed is None:
        raise ValueError(f"hetzner.{key} must be a duration, got {value!r}")
    return float(parsed)
