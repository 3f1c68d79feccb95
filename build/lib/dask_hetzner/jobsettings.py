"""The settings of the user's job on the servers, checked: ``ClusterSettings.build``'s share.

``environment``, ``upload``, ``env``, ``object_storage``, ``apt_packages`` and
``setup_commands``, each from its argument or ``hetzner.*`` and refused (one line naming the
input) before anything exists. Secrets are not settings: ``secret_env`` never enters the
record, so it never reaches ``cluster.json``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from . import envsync, jobenv, localcode
from .cloud import ConfigError

# Debian package names (Debian policy 5.6.7), optionally with =version or :arch.
_APT_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?(=[A-Za-z0-9.+~:-]+)?\Z")


def build(pick: Callable[[str, Any], Any], a: Callable[[str], Any]) -> dict[str, Any]:
    """The job's fields of ``ClusterSettings`` (``pick``: argument or ``hetzner.<key>``)."""
    storage = pick("object-storage", a("object_storage"))
    if storage not in (None, False, True) and not (
        isinstance(storage, str) and storage.startswith(("https://", "http://"))
    ):
        raise ConfigError(f"object_storage must be True or an endpoint URL, got {storage!r}")
    return {
        "environment": envsync.check_mode(pick("environment", a("environment") or None)),
        "upload": localcode.check_uploads(pick("upload", a("upload")) or ()),
        "env": jobenv.check_env(pick("env", a("env")) or {}, "env"),
        "object_storage": storage or False,
        "apt_packages": _apt(pick("apt-packages", a("apt_packages")) or ()),
        "setup_commands": _strings(pick("setup-commands", a("setup_commands")) or (), "setup_commands"),
    }


def _strings(values: Any, what: str) -> tuple[str, ...]:
    if isinstance(values, str):
        raise ConfigError(f"{what} must be a list of strings, not a string")
    out = tuple(values)
    for v in out:
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(f"{what}: {v!r} is not a non-empty string")
    return out


def _apt(values: Any) -> tuple[str, ...]:
    names = _strings(values, "apt_packages")
    for n in names:
        if not _APT_NAME.match(n):
            raise ConfigError(f"apt_packages: {n!r} is not a Debian package name")
    return names
