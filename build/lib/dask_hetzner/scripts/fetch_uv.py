"""Fetch the uv wheel for this machine from the package index and install its uv binary.

Run by the bootstrap (bootstrap.sh) with the system python3 and nothing but its standard
library: servers (and the simulator hosts) reach package registries, not download sites.
argv: uv_version, machine (uname -m), cache dir, destination, index URL ("" = PyPI).
"""

from __future__ import annotations

import hashlib
import html.parser
import json
import os
import platform
import re
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile

version, machine, cache, dest, index = sys.argv[1:6]
arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(
    machine.lower())
if arch is None:
    sys.exit(f"no uv wheel for machine type {machine!r}")
index = (index or "https://pypi.org/simple/").rstrip("/") + "/"
page = urllib.parse.urljoin(index, "uv/")


class Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data: str) -> None:
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


def glibc_needed(tag: str) -> tuple[int, int] | None:
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


def digest(path: str) -> str:
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
