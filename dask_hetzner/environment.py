"""The Python environment on the servers: which versions, how it is built, how it is checked.

The servers must run the client's versions of everything that crosses the wire (dask's protocol,
pickled functions, serialized arrays).  :func:`local_versions` records the client's,
:func:`requirements` turns them into pins, :func:`bootstrap_script` builds the environment on
a server with ``uv`` (fetched from the package index, not from a download site), and
:func:`check_versions` compares what the server reports with the client.

This module only builds text; running the script is the caller's business (``provision/node.py``).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata, resources
from typing import Any, Literal

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from . import layout

__all__ = [
    "REQUIRED_PACKAGES",
    "OPTIONAL_PACKAGES",
    "DASHBOARD_DEFAULT",
    "DEFAULT_UV_VERSION",
    "default_uv_version",
    "bootstrap_hash",
    "VersionMismatch",
    "local_versions",
    "requirements",
    "bootstrap_script",
    "check_versions",
    "script",
]

Role = Literal["scheduler", "worker"]

# Always pinned to the client's version (all are dependencies of distributed).
REQUIRED_PACKAGES: tuple[str, ...] = (
    "dask",  # graphs and task specs are built on the client and run on the servers
    "distributed",  # the client/scheduler/worker protocol and its handlers
    "cloudpickle",  # functions pickled by the client must unpickle on the workers
    "msgpack",  # framing of every message in distributed's protocol
    "toolz",  # used by dask graph code on both sides; distributed's version check requires it
    "tornado",  # distributed's own version check flags a mismatch as an error
)

# Pinned only if the client has them: their data crosses the wire in their own formats.
OPTIONAL_PACKAGES: tuple[str, ...] = (
    "numpy",  # arrays are serialized with numpy's own format and dtypes
    "pandas",  # dataframes (and their pickles) differ between versions
    "pyarrow",  # pandas' string dtype and Arrow serialization of dataframes
    "lz4",  # compression is negotiated: both ends must have it or neither
    "bokeh",  # the scheduler's dashboard (only installed on the scheduler)
)

# Installed on the scheduler for the dashboard when the client has no bokeh to pin.
DASHBOARD_DEFAULT = "bokeh>=3.1"

# Packages a worker does not get from the client's pins (only the scheduler serves a dashboard).
_SCHEDULER_ONLY = frozenset({"bokeh"})

# uv for the servers when the client has none installed to copy the version from (a version
# known to exist on PyPI with manylinux wheels for x86_64 and aarch64).
DEFAULT_UV_VERSION = "0.13.9"

# Bump when the script changes in a way that must redo existing environments.
_BOOTSTRAP_REVISION = 1


class VersionMismatch(RuntimeError):
    """A server's versions differ from the client's."""

    def __init__(self, differences: dict[str, tuple[str | None, str | None]], where: str = ""):
        self.differences = differences
        lines = [
            f"  {name}: client {client or 'missing'}, {where or 'remote'} {remote or 'missing'}"
            for name, (client, remote) in sorted(differences.items())
        ]
        super().__init__(
            f"version mismatch between the client and {where or 'the remote environment'}:\n"
            + "\n".join(lines)
        )


# --------------------------------------------------------------------------------------------
# versions


def local_versions() -> dict[str, str]:
    """``{"python": "3.11", "dask": "2026.8.0", ...}`` for this (the client's) interpreter.

    Keys are canonical package names; optional packages appear only if installed.
    """
    versions = {"python": f"{sys.version_info[0]}.{sys.version_info[1]}"}
    for name in REQUIRED_PACKAGES + OPTIONAL_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name in REQUIRED_PACKAGES:
                raise RuntimeError(f"{name} is not installed on the client") from None
    return versions


def default_uv_version() -> str:
    """The client's uv version if it has the ``uv`` package (known good), else the default."""
    try:
        return metadata.version("uv")
    except metadata.PackageNotFoundError:
        return DEFAULT_UV_VERSION


def _parse(spec: object) -> Requirement:
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"invalid package spec {spec!r}: expected a requirement string")
    try:
        return Requirement(spec.strip())
    except InvalidRequirement as e:
        # packaging's message ends in a drawing of the spec with a caret: one line is enough.
        raise ValueError(f"invalid package spec {spec!r}: {str(e).splitlines()[0]}") from None


def requirements(
    role: Role, versions: Mapping[str, str], packages: Iterable[str] = ()
) -> list[str]:
    """The requirement lines for a ``role`` server: the client's pins plus ``packages``.

    Every entry of ``packages`` is validated (``packaging`` requirement syntax) and checked
    against the pins, so a typo or a conflicting version fails here, before any server exists.
    """
    if role not in ("scheduler", "worker"):
        raise ValueError(f"unknown role {role!r} (expected 'scheduler' or 'worker')")
    if isinstance(packages, str):  # list("numpy") would be five bogus requirements
        raise TypeError("packages must be a list of requirement strings, not a string")
    pins = {
        canonicalize_name(name): version
        for name, version in versions.items()
        if name != "python"
        and not (role == "worker" and canonicalize_name(name) in _SCHEDULER_ONLY)
    }
    lines = [f"{name}=={version}" for name, version in pins.items()]
    extra: list[str] = []
    extra_names = set()
    for spec in packages:
        req = _parse(spec)
        name = canonicalize_name(req.name)
        extra_names.add(name)
        if name in pins:
            pinned = pins[name]
            if req.url or not req.specifier.contains(pinned, prereleases=True):
                raise ValueError(
                    f"package spec {spec!r} conflicts with the client's {name} {pinned}: "
                    f"the servers must run the client's version"
                )
        line = str(spec).strip()
        if line not in extra:
            extra.append(line)
    if role == "scheduler" and "bokeh" not in pins and "bokeh" not in extra_names:
        extra.insert(0, DASHBOARD_DEFAULT)
    return lines + extra


def _pins(reqs: Iterable[str]) -> dict[str, str]:
    """``name==version`` requirements of ``reqs`` (what the bootstrap verifies exactly)."""
    pins: dict[str, str] = {}
    for spec in reqs:
        req = _parse(spec)
        specs = list(req.specifier)
        # Markers may be false on the server, and then the package is rightly absent.
        exact = len(specs) == 1 and specs[0].operator in ("==", "===")
        if req.url is None and req.marker is None and exact:
            if not specs[0].version.endswith(".*"):
                pins[canonicalize_name(req.name)] = specs[0].version
    return pins


def _same_version(a: str, b: str) -> bool:
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


def check_versions(
    client: Mapping[str, str], remote: Mapping[str, str], *, where: str = ""
) -> None:
    """Raise :class:`VersionMismatch` unless ``remote`` runs the client's versions.

    Compared: Python's major.minor, every required package, and every optional package the
    client has (bokeh only if both have it: workers have no dashboard).
    """
    differences: dict[str, tuple[str | None, str | None]] = {}
    c = {canonicalize_name(k) if k != "python" else k: v for k, v in client.items()}
    r = {canonicalize_name(k) if k != "python" else k: v for k, v in remote.items()}
    for name, want in c.items():
        have = r.get(name)
        if name == "python":
            if have is None or want.split(".")[:2] != have.split(".")[:2]:
                differences[name] = (want, have)
        elif have is None:
            if name not in _SCHEDULER_ONLY:
                differences[name] = (want, None)
        elif not _same_version(want, have):
            differences[name] = (want, have)
    for name in REQUIRED_PACKAGES:
        if name not in c and name in r:
            differences[name] = (None, r[name])
    if differences:
        raise VersionMismatch(differences, where)


# --------------------------------------------------------------------------------------------
# the bootstrap script: dask_hetzner/scripts/bootstrap.sh, with the inputs put in as variables

# The line of scripts/bootstrap.sh that bootstrap_script replaces with the inputs.
_INPUTS_MARKER = "# @INPUTS@\n"


def script(name: str) -> str:
    """The text of ``dask_hetzner/scripts/<name>`` (package data: what runs on the servers)."""
    return resources.files("dask_hetzner").joinpath("scripts").joinpath(name).read_text()


def bootstrap_hash(
    role: Role,
    requirements: Iterable[str],
    *,
    python: str,
    uv_version: str,
    index_url: str | None = None,
    system: tuple[tuple[str, ...], tuple[str, ...]] = ((), ()),
    python_downloads: Mapping[str, str] | None = None,
) -> str:
    """The marker value: equal inputs, equal hash (and the bootstrap does nothing)."""
    doc: dict[str, Any] = {
        "revision": _BOOTSTRAP_REVISION,
        "role": role,
        "requirements": list(requirements),
        "python": python,
        "uv": uv_version,
        "index_url": index_url or "",
    }
    if system != ((), ()):  # hashes without system setup stay as they were
        doc["system"] = [list(system[0]), list(system[1])]
    if python_downloads:  # absent when unset: the hash of existing servers stays the same
        doc["python_downloads"] = dict(python_downloads)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def _inputs(
    role: Role,
    reqs: list[str],
    pins: dict[str, str],
    apt: tuple[str, ...] = (),
    wheels: tuple[str, ...] = (),
    **values: str,
) -> str:
    """The bootstrap's inputs: one shell variable each, every value quoted."""
    names = sorted(
        {canonicalize_name(Requirement(r).name) for r in reqs}
        | set(REQUIRED_PACKAGES)
        | set(OPTIONAL_PACKAGES)
    )
    assignments = {
        "REMOTE_DIR": shlex.quote(layout.REMOTE_DIR),
        "DASK_USER": shlex.quote(layout.DASK_USER),
        "DASK_DIR": shlex.quote(layout.DASK_DIR),
        "TLS_DIR": shlex.quote(layout.TLS_DIR),
        "RUN_AS": shlex.quote(layout.RUN_AS),
        "ROLE": shlex.quote(role),
        **{name: shlex.quote(value) for name, value in values.items()},
        "REQUIREMENTS": f"({' '.join(shlex.quote(r) for r in reqs)})",  # a bash array
        "APT_PACKAGES": f"({' '.join(shlex.quote(r) for r in apt)})",
        "LOCAL_WHEELS": f"({' '.join(shlex.quote(r) for r in wheels)})",  # paths from its directory
        "REPORT_NAMES": shlex.quote(json.dumps(names)),
        "PINS": shlex.quote(json.dumps(pins, sort_keys=True)),
        "FETCH_UV_PY": shlex.quote(script("fetch_uv.py")),
        "REPORT_PY": shlex.quote(script("report_versions.py")),
        "COMPARE_PY": shlex.quote(script("compare_versions.py")),
    }
    return "".join(f"{name}={value}\n" for name, value in assignments.items())


def bootstrap_script(
    role: Role,
    requirements: list[str],
    *,
    python: str,
    uv_version: str,
    index_url: str | None = None,
    apt_packages: tuple[str, ...] = (),
    setup_commands: tuple[str, ...] = (),
    local_wheels: tuple[str, ...] = (),
    python_downloads: Mapping[str, str] | None = None,
) -> str:
    """A bash script that builds ``~/.dask-hetzner/env`` on an Ubuntu 24.04 server as root.

    ``python_downloads``: where uv gets a Python the image lacks and which it prefers
    (``{"json_url": ..., "preference": ...}``, from ``hetzner.python-downloads-json-url`` and
    ``hetzner.python-preference``; see docs/environments.md).

    Idempotent (a marker holds a hash of the inputs), logs with timestamps to
    ``~/.dask-hetzner/bootstrap.log`` (and stderr), prints the environment's versions as JSON
    on stdout and leaves them in ``~/.dask-hetzner/versions.json``.  Run it as a file or on
    stdin (``bash -s``): it is parsed whole before it runs.
    """
    if role not in ("scheduler", "worker"):
        raise ValueError(f"unknown role {role!r}")
    reqs = [r.strip() for r in requirements]
    pins = _pins(reqs)  # validates every requirement
    if not reqs:
        raise ValueError("no requirements to install")
    if not python or not all(p.isdigit() for p in python.split(".")):
        raise ValueError(f"python must look like '3.11', got {python!r}")
    try:
        Version(uv_version)
    except InvalidVersion:
        raise ValueError(f"invalid uv version {uv_version!r}") from None
    inputs = _inputs(
        role,
        reqs,
        {"python": python, **pins},
        tuple(apt_packages),
        tuple(local_wheels),
        HASH=bootstrap_hash(
            role, [*reqs, *local_wheels], python=python, uv_version=uv_version,
            index_url=index_url, system=(tuple(apt_packages), tuple(setup_commands)),
            python_downloads=python_downloads,
        ),
        SETUP_COMMANDS="\n".join(setup_commands),
        UV_VERSION=uv_version,
        PYTHON_VERSION=python,
        INDEX_URL=index_url or "",
        PYTHON_DOWNLOADS_JSON_URL=(python_downloads or {}).get("json_url", ""),
        PYTHON_PREFERENCE=(python_downloads or {}).get("preference", ""),
    )  # fmt: skip
    template = script("bootstrap.sh")
    if template.count(_INPUTS_MARKER) != 1:
        raise RuntimeError(f"scripts/bootstrap.sh must hold one line {_INPUTS_MARKER.strip()!r}")
    return template.replace(_INPUTS_MARKER, inputs)
