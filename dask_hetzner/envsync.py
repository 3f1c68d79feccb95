"""Which environment the servers get: ``minimal``, ``sync`` or a requirements file; checked first.

``minimal`` is the client's dask stack (``environment.requirements``). ``sync`` adds every
distribution installed on the client at its exact version (local directories become wheels,
see ``localcode``). A path adds the requirements file. Before any server exists,
:func:`resolve` asks uv to resolve the whole list for the servers' platform (Ubuntu 24.04's
glibc, x86_64 or aarch64, the client's Python): a misspelled package, a version the index
lacks for that platform, or a package built only for another platform is named then.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from . import localcode
from .cloud import ConfigError

MODES = ("minimal", "sync")

# Ubuntu 24.04 has glibc 2.39; Hetzner's architectures as the API names them.
_PLATFORMS = {"x86": "x86_64-manylinux_2_39", "arm": "aarch64-manylinux_2_39"}


def check_mode(value: object) -> str:
    """``minimal``, ``sync`` or a readable requirements file; anything else refused."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"environment must be 'minimal', 'sync' or a requirements file, got {value!r}")
    if value in MODES:
        return value
    path = localcode.expand(value, "environment")
    try:
        path.read_text()
    except OSError as e:
        raise ConfigError(f"environment: cannot read requirements file {value}: {e.strerror}") from None
    return str(path.resolve())


def wanted(mode: str) -> tuple[list[str], list[localcode.LocalPackage]]:
    """The requirement lines beyond the pinned stack, and the local packages, of ``mode``."""
    if mode == "minimal":
        return [], []
    if mode == "sync":
        return synced()
    return requirements_file(Path(mode))


def synced(dists: Iterable[metadata.Distribution] | None = None) -> tuple[list[str], list[localcode.LocalPackage]]:
    """Every installed distribution at its version; local directories as local packages.

    A distribution installed from a local archive cannot be installed elsewhere: refused,
    named, with every other such one in the same message.
    """
    dists = list(metadata.distributions() if dists is None else dists)
    local = {p.name: p for p in localcode.local_distributions(dists)}
    lines: list[str] = []
    unusable: list[str] = []
    seen: set[str] = set()
    for dist in dists:
        name = canonicalize_name(dist.metadata["Name"] or "")
        if not name or name in seen:
            continue  # the first on sys.path wins, as for imports
        seen.add(name)
        if name in local:
            continue
        info = localcode.direct_url(dist) or {}
        url = info.get("url", "")
        if "vcs_info" in info:
            vcs = info["vcs_info"]
            lines.append(f"{name} @ {vcs['vcs']}+{url}@{vcs.get('commit_id', '')}")
        elif "archive_info" in info and url.startswith(("https://", "http://")):
            lines.append(f"{name} @ {url}")
        elif url:
            unusable.append(f"{name} {dist.version} (installed from {url})")
        else:
            lines.append(f"{name}=={dist.version}")
    if unusable:
        raise ConfigError(
            "environment='sync': these packages were installed from files only this machine has "
            "and cannot be installed on the servers: " + "; ".join(unusable)
            + " (install them from an index, or pass their project directory in packages=)"
        )
    return lines, list(local.values())


def requirements_file(path: Path) -> tuple[list[str], list[localcode.LocalPackage]]:
    lines: list[str] = []
    local: list[localcode.LocalPackage] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        editable = line.startswith(("-e ", "--editable "))
        if editable:
            line = line.split(None, 1)[1].strip()
        if localcode.is_local_path(str(path.parent / line)) and not _is_requirement(line):
            local.append(localcode.LocalPackage(Path(line).name, (path.parent / line).resolve(), editable))
        elif line.startswith("-"):
            raise ConfigError(f"{path}:{number}: pip options are not supported here ({line.split()[0]})")
        else:
            try:
                Requirement(line)
            except InvalidRequirement as e:
                raise ConfigError(f"{path}:{number}: invalid requirement {line!r}: {e}") from None
            lines.append(line)
    return lines, local


def _is_requirement(line: str) -> bool:
    try:
        Requirement(line)
    except InvalidRequirement:
        return False
    return not line.startswith((".", "/", "~"))


def resolve(requirements: list[str], *, python: str, architecture: str, index_url: str | None) -> None:
    """Resolve ``requirements`` for a server of ``architecture`` with uv; refuse what fails.

    Blocking (a subprocess that asks the index): call it in a thread.
    """
    uv = localcode.uv_binary()
    if uv is None:
        raise ConfigError("checking the servers' packages needs uv on the client: pip install uv")
    platform = _PLATFORMS.get(architecture)
    if platform is None:
        raise ConfigError(f"unknown server architecture {architecture!r}")
    cmd = [uv, "pip", "compile", "-", "--no-config", "--no-header", "--quiet",
           "--python-platform", platform, "--python-version", python]
    if index_url:
        cmd += ["--index-url", index_url]
    done = subprocess.run(cmd, input="\n".join(requirements) + "\n", capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        tail = "\n".join(line for line in done.stderr.strip().splitlines()[-12:] if line.strip())
        raise ConfigError(
            f"the servers' packages cannot be installed on {architecture} Linux with Python {python}: "
            f"{uv_cause(done.stderr)}\n{tail}"
        )


def uv_cause(stderr: str) -> str:
    """uv's reason in one line: its ``cause:`` paragraph (wrapped over indented lines) joined,
    else its first ``error:`` line."""
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("cause:"):
            words = [line.strip().removeprefix("cause:").strip()]
            for more in lines[i + 1 :]:
                if not more.startswith("  ") or more.strip().startswith(("hint:", "help:")):
                    break
                words.append(more.strip())
            return " ".join(words)
    errors = [line.removeprefix("error:").strip() for line in lines if line.startswith("error:")]
    return errors[0] if errors else "see uv's output below"
