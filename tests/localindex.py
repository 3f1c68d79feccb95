"""A package index on 127.0.0.1 for tests: PEP 503 HTML or PEP 691 JSON, with wheels built here.

Lets the bootstrap script run for real (fetch uv, create an env, install, verify) without any
traffic leaving the machine: uv's "wheel" wraps the uv binary installed next to the test's
Python, and small pure-Python wheels stand in for real packages.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import platform
import shutil
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode().rstrip("=")


def build_wheel(
    directory: Path,
    name: str,
    version: str,
    files: dict[str, bytes],
    *,
    tag: str = "py3-none-any",
    purelib: bool = True,
) -> Path:
    """A minimal valid wheel (METADATA, WHEEL, RECORD) holding ``files``."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    contents = dict(files)
    contents[f"{info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    ).encode()
    contents[f"{info}/WHEEL"] = (
        f"Wheel-Version: 1.0\nGenerator: dask-hetzner-tests\n"
        f"Root-Is-Purelib: {'true' if purelib else 'false'}\nTag: {tag}\n"
    ).encode()
    record = [f"{path},{_record_hash(data)},{len(data)}" for path, data in contents.items()]
    record.append(f"{info}/RECORD,,")
    contents[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = Path(directory) / f"{dist}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for member, data in contents.items():
            info_ = zipfile.ZipInfo(member, date_time=(2020, 1, 1, 0, 0, 0))
            info_.external_attr = (0o755 if "/scripts/" in member else 0o644) << 16
            z.writestr(info_, data)
    return path


def build_probe_wheel(directory: Path, name: str, version: str) -> Path:
    module = name.replace("-", "_")
    return build_wheel(
        directory, name, version, {f"{module}/__init__.py": f"VERSION = {version!r}\n".encode()}
    )


def build_uv_wheels(directory: Path, uv_binary: Path, version: str) -> Path:
    """uv's wheel for this machine (the real binary) plus decoys that must not be chosen."""
    arch = {"arm64": "aarch64", "amd64": "x86_64"}.get(platform.machine(), platform.machine())
    other = "aarch64" if arch == "x86_64" else "x86_64"
    real = build_wheel(
        directory,
        "uv",
        version,
        {f"uv-{version}.data/scripts/uv": Path(uv_binary).read_bytes()},
        tag=f"py3-none-manylinux_2_17_{arch}.manylinux2014_{arch}",
        purelib=False,
    )
    broken = b"#!/bin/sh\necho 'wrong wheel chosen' >&2\nexit 99\n"
    for tag in (
        f"py3-none-musllinux_1_1_{arch}",
        f"py3-none-manylinux_2_17_{other}.manylinux2014_{other}",
        "py3-none-win_amd64",
    ):
        build_wheel(
            directory,
            "uv",
            version,
            {f"uv-{version}.data/scripts/uv": broken},
            tag=tag,
            purelib=False,
        )
    build_wheel(  # another version for this machine
        directory,
        "uv",
        "0.0.1",
        {"uv-0.0.1.data/scripts/uv": broken},
        tag=f"py3-none-manylinux_2_17_{arch}",
        purelib=False,
    )
    return real


class LocalIndex:
    """Serves the wheels in ``directory`` at ``http://127.0.0.1:PORT/simple/``.

    ``json=True`` answers PEP 691 JSON to clients that ask for it; ``bad_sha`` lists file
    names whose advertised sha256 is wrong.  ``requests`` records every path requested.
    """

    def __init__(self, directory: Path, *, json: bool = False) -> None:
        self.directory = Path(directory)
        self.json = json
        self.bad_sha: set[str] = set()
        self.requests: list[str] = []
        self.json_responses = 0  # how many project pages were answered with PEP 691 JSON
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/simple/"

    def _files(self, project: str) -> list[tuple[str, str]]:
        norm = project.lower().replace("_", "-")
        out = []
        for wheel in sorted(self.directory.glob("*.whl")):
            dist = wheel.name.split("-")[0].lower().replace("_", "-")
            if dist == norm:
                sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
                if wheel.name in self.bad_sha:
                    sha = "0" * 64
                out.append((wheel.name, sha))
        return out

    def start(self) -> LocalIndex:
        index = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            head = False

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not self.head:
                    self.wfile.write(body)

            def do_HEAD(self) -> None:
                self.head = True
                self.do_GET()

            def do_GET(self) -> None:
                index.requests.append(f"{self.command} {self.path}")
                parts = [p for p in self.path.split("?")[0].split("/") if p]
                if len(parts) == 2 and parts[0] == "files":
                    path = index.directory / parts[1]
                    if path.is_file():
                        return self._send(200, path.read_bytes(), "application/octet-stream")
                elif len(parts) == 1 and parts[0] == "simple":
                    names = sorted({w.name.split("-")[0] for w in index.directory.glob("*.whl")})
                    links = "".join(f'<a href="{n}/">{n}</a>\n' for n in names)
                    return self._send(
                        200, f"<html><body>{links}</body></html>".encode(), "text/html"
                    )
                elif len(parts) == 2 and parts[0] == "simple":
                    files = index._files(parts[1])
                    if files:
                        wants_json = "application/vnd.pypi.simple.v1+json" in self.headers.get(
                            "Accept", ""
                        )
                        if index.json and wants_json:
                            doc = {
                                "meta": {"api-version": "1.0"},
                                "name": parts[1],
                                "files": [
                                    {
                                        "filename": f,
                                        "url": f"../../files/{f}",
                                        "hashes": {"sha256": sha},
                                    }
                                    for f, sha in files
                                ],
                            }
                            index.json_responses += 1
                            return self._send(
                                200, json.dumps(doc).encode(), "application/vnd.pypi.simple.v1+json"
                            )
                        links = "".join(
                            f'<a href="../../files/{html.escape(f)}#sha256={sha}">'
                            f"{html.escape(f)}</a><br/>\n"
                            for f, sha in files
                        )
                        return self._send(
                            200, f"<html><body>{links}</body></html>".encode(), "text/html"
                        )
                self._send(404, b"not found", "text/plain")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> LocalIndex:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def copy_wheels(source: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for wheel in Path(source).glob("*.whl"):
        shutil.copy2(wheel, target / wheel.name)
    return target
