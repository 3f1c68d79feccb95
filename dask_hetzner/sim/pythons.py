"""A mirror of uv's managed Python downloads, so that path runs without the internet.

On Hetzner a client whose Python is not the image's (Ubuntu 24.04 has 3.12) makes uv
download a Python build on every server (python-build-standalone, from GitHub). Simulated
servers have no internet, so the simulator serves uv's download list (the format of
``--python-downloads-json-url``) and one archive built from this machine's own interpreter:
its executable and ``_sysconfigdata_`` in the layout uv unpacks (``python/bin``,
``python/lib/pythonX.Y``); the executable finds its standard library where it was built.
Served at ``/python/downloads.json`` and ``/python/<archive>`` beside the API, no token.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import os
import platform
import sys
import sysconfig
import tarfile
from typing import Any

BUILD = "20990101"  # a build date no real release has


def _key() -> str:
    v = sys.version_info
    return f"cpython-{v.major}.{v.minor}.{v.micro}-linux-{platform.machine()}-gnu"


def archive_name() -> str:
    return f"{_key()}+{BUILD}-install_only.tar.gz"


@functools.lru_cache(maxsize=1)
def archive() -> bytes:
    """The archive (built once, a few MB): call it in a thread."""
    v = sys.version_info
    minor = f"{v.major}.{v.minor}"
    executable = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    stdlib = sysconfig.get_path("stdlib")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(executable, arcname=f"python/bin/python{minor}")
        for alias in ("python3", "python"):
            link = tarfile.TarInfo(f"python/bin/{alias}")
            link.type, link.linkname = tarfile.SYMTYPE, f"python{minor}"
            tar.addfile(link)
        for path in glob.glob(os.path.join(stdlib, "_sysconfigdata_*.py")):
            tar.add(path, arcname=f"python/lib/python{minor}/{os.path.basename(path)}")
    return buf.getvalue()


def downloads(base_url: str, data: bytes) -> dict[str, Any]:
    """uv's download list, with this machine's Python the one entry."""
    v = sys.version_info
    return {
        _key(): {
            "name": "cpython",
            "arch": {"family": platform.machine(), "variant": None},
            "os": "linux",
            "libc": "gnu",
            "major": v.major,
            "minor": v.minor,
            "patch": v.micro,
            "prerelease": "",
            "url": f"{base_url}/python/{archive_name()}",
            "sha256": hashlib.sha256(data).hexdigest(),
            "variant": None,
            "build": BUILD,
        }
    }
