"""The user's own code: local and editable packages as wheels, loose files as one archive.

A package installed from a local directory (editable or not, PEP 610's ``direct_url.json``
with ``dir_info``) or named in ``packages=`` by its directory is built into a wheel here, on
the client, and uploaded to every server, where the bootstrap installs it with the rest.
The wheel is kept per content hash of the source: a changed source is rebuilt on the next
scale-up, an unchanged one is not. ``upload=`` paths travel as one tar archive.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

import platformdirs
from packaging.utils import canonicalize_name

from .cloud import ConfigError

# Not part of a package's source: never hashed, never in a wheel's inputs.
_SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", ".venv", "venv", ".tox", ".nox", "build", "dist",
              ".mypy_cache", ".pytest_cache", ".ruff_cache", "node_modules", "_build"}
_SKIP_SUFFIXES = (".pyc", ".pyo", ".egg-info")


@dataclass(frozen=True)
class LocalPackage:
    """A package whose source is a directory on the client."""

    name: str
    path: Path
    editable: bool


@dataclass(frozen=True)
class Wheel:
    path: Path  # in the client's cache
    digest: str  # of the source it was built from

    @property
    def name(self) -> str:
        return self.path.name


def expand(path: str | os.PathLike[str], what: str) -> Path:
    """``~`` and ``~user`` expanded; an unknown user is refused naming the input."""
    try:
        return Path(path).expanduser()
    except RuntimeError:  # pathlib: "Could not determine home directory."
        raise ConfigError(f"{what}: {str(path)!r} names a home directory that does not exist") from None


def is_local_path(spec: str) -> bool:
    """A ``packages=`` entry naming a project directory on the client (not a requirement)."""
    try:
        p = Path(spec).expanduser()
    except RuntimeError:  # ~user of no such user: not a directory here
        return False
    looks_like_path = spec.startswith((".", "/", "~")) or os.sep in spec
    return looks_like_path and p.is_dir() and ((p / "pyproject.toml").exists() or (p / "setup.py").exists())


def local_distributions(dists: Iterable[metadata.Distribution] | None = None) -> list[LocalPackage]:
    """Installed distributions whose source is a local directory (PEP 610 ``dir_info``)."""
    found: dict[str, LocalPackage] = {}
    for dist in metadata.distributions() if dists is None else dists:
        info = direct_url(dist)
        if info is None or "dir_info" not in info:
            continue
        url = urlparse(info.get("url", ""))
        if url.scheme != "file":
            continue
        name = canonicalize_name(dist.metadata["Name"] or "")
        if name and name not in found:  # the first on sys.path wins, as for imports
            found[name] = LocalPackage(name, Path(unquote(url.path)), bool(info["dir_info"].get("editable")))
    return list(found.values())


def direct_url(dist: metadata.Distribution) -> dict | None:
    text = dist.read_text("direct_url.json")
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def source_digest(path: Path) -> str:
    """A hash of a directory's source files (names and contents): equal source, equal hash."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.endswith(_SKIP_SUFFIXES))
        for f in sorted(files):
            if f.endswith(_SKIP_SUFFIXES):
                continue
            full = Path(root) / f
            h.update(str(full.relative_to(path)).encode() + b"\0")
            try:
                h.update(full.read_bytes())
            except OSError as e:
                raise ConfigError(f"cannot read {full} of local package {path}: {e.strerror}") from None
            h.update(b"\0")
    return h.hexdigest()[:16]


def uv_binary() -> str | None:
    """The client's uv: the ``uv`` package's binary, else one on ``PATH``."""
    try:
        from uv import find_uv_bin  # the uv package, when installed

        return str(find_uv_bin())
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


def build_wheel(package: LocalPackage, cache: Path | None = None) -> Wheel:
    """The package's wheel, built on the client (or taken from the cache for this source)."""
    digest = source_digest(package.path)
    out = (cache or platformdirs.user_cache_path("dask-hetzner")) / "wheels" / f"{package.name}-{digest}"
    wheels = sorted(out.glob("*.whl")) if out.is_dir() else []
    if not wheels:
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        uv = uv_binary()
        if uv is not None:
            cmd = [uv, "build", "--wheel", "--quiet", "--out-dir", str(tmp), str(package.path)]
        elif importlib.util.find_spec("pip") is not None:
            cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp), str(package.path)]
        else:
            raise ConfigError(f"building local package {package.name} needs uv or pip on the client: pip install uv")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
            raise ConfigError(f"building a wheel of local package {package.name} ({package.path}) failed:\n{tail}")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        wheels = sorted(out.glob("*.whl"))
    if len(wheels) != 1:
        raise ConfigError(f"building local package {package.name} gave {len(wheels)} wheels, expected one")
    return Wheel(wheels[0], digest)


def check_uploads(paths: Iterable[str]) -> tuple[str, ...]:
    """``upload=`` entries: readable files or directories with distinct names, else refused."""
    if isinstance(paths, str):
        raise ConfigError("upload must be a list of paths, not a string")
    seen: dict[str, str] = {}
    for entry in paths:
        if not isinstance(entry, (str, os.PathLike)):
            raise ConfigError(f"upload: {entry!r} is not a path")
        p = expand(entry, "upload")
        if not p.exists():
            raise ConfigError(f"upload: {entry} does not exist")
        if not os.access(p, os.R_OK) or (p.is_dir() and not os.access(p, os.X_OK)):
            raise ConfigError(f"upload: {entry} is not readable")
        base = p.resolve().name
        if base in seen:
            raise ConfigError(f"upload: {entry} and {seen[base]} would both be {base} on the servers")
        seen[base] = str(entry)
    return tuple(str(expand(x, "upload").resolve()) for x in paths)


def upload_archive(paths: Iterable[str]) -> bytes:
    """One gzipped tar of the ``upload=`` paths, each under its own name (read now)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for entry in paths:
            p = Path(entry)
            try:
                tar.add(p, arcname=p.name, filter=_skip_caches)
            except OSError as e:
                raise ConfigError(f"upload: cannot read {e.filename or entry}: {e.strerror}") from None
    return buf.getvalue()


def _skip_caches(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    parts = Path(info.name).parts
    if "__pycache__" in parts or info.name.endswith(".pyc"):
        return None
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info
