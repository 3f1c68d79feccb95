"""The Python environment on the servers: which versions, how it is built, how it is checked.

The servers must run the client's versions of everything that crosses the wire (dask's protocol,
pickled functions, serialized arrays).  :func:`local_versions` records the client's,
:func:`requirements` turns them into pins, :func:`bootstrap_script` builds the environment on
a server with ``uv`` (fetched from the package index, not from a download site), and
:func:`check_versions` compares what the server reports with the client.

This module only builds text; running the script is the caller's business (``nodes.py``).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata
from typing import Literal

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

__all__ = [
    "REQUIRED_PACKAGES",
    "OPTIONAL_PACKAGES",
    "DASHBOARD_DEFAULT",
    "REMOTE_BASE",
    "REMOTE_PYTHON",
    "REMOTE_VERSIONS",
    "REMOTE_LOG",
    "REMOTE_SCRIPT",
    "DEFAULT_UV_VERSION",
    "default_uv_version",
    "bootstrap_hash",
    "VersionMismatch",
    "local_versions",
    "requirements",
    "bootstrap_script",
    "check_versions",
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

# Where the bootstrap puts things on a server ("~" is root's home directory).
REMOTE_BASE = "~/.dask-hetzner"
REMOTE_PYTHON = f"{REMOTE_BASE}/env/bin/python"
REMOTE_VERSIONS = f"{REMOTE_BASE}/versions.json"
REMOTE_LOG = f"{REMOTE_BASE}/bootstrap.log"
REMOTE_SCRIPT = f"{REMOTE_BASE}/bootstrap.sh"  # a suggested place to upload the script to

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
        raise ValueError(f"invalid package spec {spec!r}: {e}") from None


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
# the bootstrap script

# Fetches uv's wheel for this machine from the package index with nothing but python3's stdlib:
# servers (and the simulator's hosts) reach package registries, not download sites.
# argv: uv_version, machine (uname -m), cache dir, destination, index URL ("" = PyPI).
_FETCH_UV_PY = r"""
import hashlib, html.parser, json, os, platform, re, sys, tempfile, urllib.parse
import urllib.request, zipfile

version, machine, cache, dest, index = sys.argv[1:6]
arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(
    machine.lower())
if arch is None:
    sys.exit(f"no uv wheel for machine type {machine!r}")
index = (index or "https://pypi.org/simple/").rstrip("/") + "/"
page = urllib.parse.urljoin(index, "uv/")


class Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self._href = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data):
        if self._href is not None:
            self.links.append((data.strip(), self._href))
            self._href = None


request = urllib.request.Request(page, headers={
    "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1",
    "User-Agent": "dask-hetzner-bootstrap"})
with urllib.request.urlopen(request, timeout=60) as response:
    kind = response.headers.get("Content-Type", "")
    body = response.read()
files = []  # (filename, url, sha256 or None)
if "json" in kind:
    for f in json.loads(body)["files"]:
        files.append((f["filename"], urllib.parse.urljoin(page, f["url"]),
                      f.get("hashes", {}).get("sha256")))
else:
    parser = Links()
    parser.feed(body.decode("utf-8", "replace"))
    for text, href in parser.links:
        url = urllib.parse.urljoin(page, href)
        frag = urllib.parse.urlparse(url).fragment
        sha = frag[len("sha256="):] if frag.startswith("sha256=") else None
        files.append((text or url.rsplit("/", 1)[-1].split("#")[0], url.split("#")[0], sha))

libc = platform.libc_ver()
glibc = tuple(int(x) for x in libc[1].split(".")[:2]) if libc[0] == "glibc" else (9, 99)
legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def glibc_needed(tag):
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)_" + arch, tag)
    if m:
        return int(m.group(1)), int(m.group(2))
    base = tag[: -len("_" + arch)] if tag.endswith("_" + arch) else None
    return legacy.get(base)


candidates = []
for filename, url, sha in files:
    if not filename.endswith(".whl"):
        continue
    parts = filename[:-4].split("-")
    if len(parts) not in (5, 6) or parts[0].lower() != "uv" or parts[1] != version:
        continue
    needs = [glibc_needed(t) for t in parts[-1].split(".")]
    needs = [n for n in needs if n is not None and n <= glibc]
    if needs:
        candidates.append((min(needs), filename, url, sha))
if not candidates:
    sys.exit(f"no manylinux wheel of uv {version} for {arch} (glibc {glibc}) at {page}")
_, filename, url, sha = sorted(candidates)[0]
if not sha:
    sys.exit(f"the index gives no sha256 for {filename}: refusing to install it unverified")

os.makedirs(cache, exist_ok=True)
wheel = os.path.join(cache, filename)


def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


if os.path.exists(wheel) and digest(wheel) == sha:
    print(f"using cached {wheel}")
else:
    print(f"downloading {url}")
    # temp file + rename: servers sharing a cache never see a partial wheel
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{filename}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=300) as response:
            while block := response.read(1 << 20):
                out.write(block)
        got = digest(tmp)
        if got != sha:
            sys.exit(f"sha256 mismatch for {filename}: expected {sha}, got {got}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, wheel)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

with zipfile.ZipFile(wheel) as z:
    members = [n for n in z.namelist() if re.fullmatch(r"uv-[^/]+\.data/scripts/uv", n)]
    if not members:
        sys.exit(f"{filename} contains no uv-*.data/scripts/uv")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".uv.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, z.open(members[0]) as src:
            while block := src.read(1 << 20):
                out.write(block)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
print(f"installed uv {version} from {filename}")
"""

# Run by the new environment's python: print the installed versions as JSON.
# argv: JSON list of package names to report.
_REPORT_PY = r"""
import json, re, sys
from importlib import metadata

def canon(name):
    return re.sub(r"[-_.]+", "-", name).lower()

installed = {}
for dist in metadata.distributions():
    name = dist.metadata["Name"]
    if name:
        installed.setdefault(canon(name), dist.version)
report = {"python": "%d.%d" % sys.version_info[:2]}
for name in json.loads(sys.argv[1]):
    if canon(name) in installed:
        report[canon(name)] = installed[canon(name)]
print(json.dumps(report, sort_keys=True))
"""

# Compare the report (file argv[1]) with the pins (JSON argv[2]); fail naming each mismatch.
_COMPARE_PY = r"""
import json, re, sys

def norm(v):
    # "2.0" and "2.0.0" are the same release; anything fancier compares as text.
    m = re.fullmatch(r"v?(\d+(?:\.\d+)*)(.*)", v.strip().lower())
    if not m:
        return v.strip().lower()
    release = [int(x) for x in m.group(1).split(".")]
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    return ".".join(map(str, release)) + m.group(2)

with open(sys.argv[1]) as f:
    report = json.load(f)
problems = []
for name, want in sorted(json.loads(sys.argv[2]).items()):
    have = report.get(name)
    if have is None:
        problems.append(f"{name}: not installed (pinned {want})")
    elif name == "python":
        if have.split(".")[:2] != want.split(".")[:2]:
            problems.append(f"python: environment has {have}, wanted {want}")
    elif norm(have) != norm(want):
        problems.append(f"{name}: installed {have}, pinned {want}")
if problems:
    print("version mismatch in the new environment:", file=sys.stderr)
    for p in problems:
        print("  " + p, file=sys.stderr)
    sys.exit(1)
print("versions verified: " + ", ".join(f"{k} {v}" for k, v in sorted(report.items())))
"""

_SCRIPT = r"""#!/bin/bash
# dask-hetzner bootstrap ({role}): builds {base}/env with uv. Generated; safe to re-run.
set -Eeuo pipefail
umask 022

main() {{
BASE="$HOME/{base_rel}"
LOG="$BASE/bootstrap.log"
ENV_DIR="$BASE/env"
UV="$BASE/bin/uv"
MARKER="$BASE/bootstrap.done"
VERSIONS="$BASE/versions.json"
CACHE="${{XDG_CACHE_HOME:-$HOME/.cache}}/dask-hetzner"
ROLE={role_q}
HASH={hash_q}
UV_VERSION={uv_version_q}
PYTHON_VERSION={python_q}
INDEX_URL={index_q}
REQUIREMENTS=({requirements_q})
REPORT_NAMES={names_q}
PINS={pins_q}
FETCH_UV_PY={fetch_q}
REPORT_PY={report_q}
COMPARE_PY={compare_q}

# The base directory also receives TLS keys: root only. (The cache may be shared: umask 022.)
(umask 077 && mkdir -p "$BASE")
mkdir -p "$BASE/bin" "$CACHE"

# Everything (ours and the tools') goes to the log with a timestamp and to stderr; stdout
# (fd 3) carries only the final versions JSON for the caller.
exec 3>&1 4>&2
exec > >(
    while IFS= read -r line || [ -n "$line" ]; do
        printf -v ts '%(%Y-%m-%dT%H:%M:%S%z)T' -1
        printf '%s %s\n' "$ts" "$line" >>"$LOG"
        printf '%s\n' "$line" >&4
    done
) 2>&1
LOGGER=$!
trap 'echo "error: status $? at line $LINENO: $BASH_COMMAND"' ERR
trap 'finish $?' EXIT

# One bootstrap at a time per server (a retried bootstrap may overlap a slow one).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$BASE/bootstrap.lock"
    flock -w 1800 9 || {{ echo "error: another bootstrap holds $BASE/bootstrap.lock"; exit 1; }}
fi

echo "bootstrap $ROLE ($HASH) on $(uname -n) $(uname -m)"
if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$HASH" ] \
        && [ -x "$ENV_DIR/bin/python" ] && [ -s "$VERSIONS" ]; then
    echo "already bootstrapped with these inputs: nothing to do"
    cat "$VERSIONS" >&3
    exit 0
fi
rm -f "$MARKER"

# 1. uv, at the pinned version, from the package index
if [ -x "$UV" ] && [ "$("$UV" --version 2>/dev/null | cut -d' ' -f2)" = "$UV_VERSION" ]; then
    echo "uv $UV_VERSION present"
else
    command -v python3 >/dev/null 2>&1 || {{ echo "error: python3 is needed to fetch uv"; exit 1; }}
    python3 -c "$FETCH_UV_PY" "$UV_VERSION" "$(uname -m)" "$CACHE/uv-wheels" "$UV" "$INDEX_URL"
    found=$("$UV" --version | cut -d' ' -f2)
    [ "$found" = "$UV_VERSION" ] || {{ echo "error: $UV is uv $found, not $UV_VERSION"; exit 1; }}
fi

INDEX_ARGS=()
if [ -n "$INDEX_URL" ]; then INDEX_ARGS=(--index-url "$INDEX_URL"); fi

# 2. a fresh virtual environment with the client's Python major.minor
cd "$BASE"
rm -rf -- "$ENV_DIR"
"$UV" venv --no-config --no-project --python "$PYTHON_VERSION" "$ENV_DIR"

# 3. the pinned requirements (hard links from uv's cache where the file system allows)
"$UV" pip install --no-config --python "$ENV_DIR/bin/python" --link-mode hardlink \
    "${{INDEX_ARGS[@]}}" "${{REQUIREMENTS[@]}}"

# 4. verify: the environment reports its versions, which must equal the pins
"$ENV_DIR/bin/python" -c "$REPORT_PY" "$REPORT_NAMES" >"$VERSIONS.tmp"
mv -f "$VERSIONS.tmp" "$VERSIONS"
"$ENV_DIR/bin/python" -c "$COMPARE_PY" "$VERSIONS" "$PINS"

# 5. done: same inputs next time means nothing to do
printf '%s\n' "$HASH" >"$MARKER.tmp"
mv -f "$MARKER.tmp" "$MARKER"
echo "bootstrap complete"
cat "$VERSIONS" >&3
}}

finish() {{
    local rc=$1
    trap - ERR EXIT
    if [ "$rc" -ne 0 ]; then echo "bootstrap FAILED with status $rc; log: $LOG"; fi
    # Close our ends of the logger's pipe and let it write the last lines before we exit.
    exec 1>&3 2>&4
    wait "$LOGGER" 2>/dev/null || true
    exit "$rc"
}}

main "$@" </dev/null
"""


def bootstrap_hash(
    role: Role,
    requirements: Iterable[str],
    *,
    python: str,
    uv_version: str,
    index_url: str | None = None,
) -> str:
    """The marker value: equal inputs, equal hash (and the bootstrap does nothing)."""
    doc = {
        "revision": _BOOTSTRAP_REVISION,
        "role": role,
        "requirements": list(requirements),
        "python": python,
        "uv": uv_version,
        "index_url": index_url or "",
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def bootstrap_script(
    role: Role,
    requirements: list[str],
    *,
    python: str,
    uv_version: str,
    index_url: str | None = None,
) -> str:
    """A bash script that builds ``~/.dask-hetzner/env`` on an Ubuntu 24.04 server as root.

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
    names = sorted(
        {canonicalize_name(Requirement(r).name) for r in reqs}
        | set(REQUIRED_PACKAGES)
        | set(OPTIONAL_PACKAGES)
    )
    pins_with_python = {"python": python, **pins}
    return _SCRIPT.format(
        role=role,
        base=REMOTE_BASE,
        base_rel=REMOTE_BASE.removeprefix("~/"),
        role_q=shlex.quote(role),
        hash_q=shlex.quote(
            bootstrap_hash(role, reqs, python=python, uv_version=uv_version, index_url=index_url)
        ),
        uv_version_q=shlex.quote(uv_version),
        python_q=shlex.quote(python),
        index_q=shlex.quote(index_url or ""),
        requirements_q=" ".join(shlex.quote(r) for r in reqs),
        names_q=shlex.quote(json.dumps(names)),
        pins_q=shlex.quote(json.dumps(pins_with_python, sort_keys=True)),
        fetch_q=shlex.quote(_FETCH_UV_PY),
        report_q=shlex.quote(_REPORT_PY),
        compare_q=shlex.quote(_COMPARE_PY),
    )
