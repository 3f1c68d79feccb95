"""Local state of each cluster: what another process needs to find, reach and delete it.

One directory per cluster under the user's XDG state home
(``platformdirs.user_state_path("dask-hetzner")/<name>/``, or ``hetzner.state-dir``)::

    cluster.json            metadata: location, types, image, connect, ports, API endpoint, ...
                            (never the token); written last, so its presence means complete
    ca.pem, ca.key          the cluster's CA (its key signs the TLS certificates of new workers)
    client.pem, client.key  the client's TLS certificate and key
    ssh_key, ssh_key.pub    the SSH key registered with Hetzner for root logins
    hosts/<server>.json     each server's pinned SSH host key (public), with its server id
    client.json             where a Client reaches the scheduler from this machine, and the
                            process whose SSH tunnel that is (``dask_hetzner.connect``)

Directories are 0700, files 0600, every file is written atomically (a crash leaves the old
or the new file, never half of one). Nothing here touches the disk at import time.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ClusterState", "StateError", "Secrets", "root_dir", "local_names"]

FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_SERVER_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")


class StateError(Exception):
    """The local state of a cluster is missing or unreadable."""


@dataclass(frozen=True)
class Secrets:
    """Key material of one cluster, as PEM / OpenSSH text."""

    ca_cert: str
    ca_key: str
    client_cert: str
    client_key: str
    ssh_private: str
    ssh_public: str

    def __repr__(self) -> str:  # keys never end up in logs or tracebacks
        return "Secrets(...)"


def root_dir(configured: str | os.PathLike[str] | None = None) -> Path:
    """Where cluster directories live: ``configured`` (``hetzner.state-dir``) or the XDG state home."""
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_state_path("dask-hetzner"))


def local_names(root: Path) -> list[str]:
    """Names of the clusters with a (complete) local state under ``root``."""
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if _NAME_RE.match(p.name) and (p / "cluster.json").is_file()
    )


def _atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees a partial file or looser mode.

    mkstemp creates the temporary file 0600 before any byte is written; the rename is atomic
    on POSIX, so a crash leaves either the old or the new file.
    """
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _mkdir_private(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # mkdir's mode goes through the umask; and an old dir may be looser


class ClusterState:
    """The state directory of one cluster. Methods do blocking file I/O: call them off-loop."""

    def __init__(self, root: Path, name: str) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid cluster name {name!r}")
        self.root = Path(root)
        self.name = name
        self.path = self.root / name

    def __repr__(self) -> str:
        return f"ClusterState({str(self.path)!r})"

    # paths ---------------------------------------------------------------------------------

    @property
    def metadata_file(self) -> Path:
        return self.path / "cluster.json"

    @property
    def ca_cert(self) -> Path:
        return self.path / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.path / "ca.key"

    @property
    def client_cert(self) -> Path:
        return self.path / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.path / "client.key"

    @property
    def ssh_key(self) -> Path:
        return self.path / "ssh_key"

    @property
    def hosts_dir(self) -> Path:
        return self.path / "hosts"

    def _host_file(self, server_name: str) -> Path:
        if not _SERVER_RE.match(server_name):
            raise ValueError(f"invalid server name {server_name!r}")
        return self.hosts_dir / f"{server_name}.json"

    # life ----------------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.metadata_file.is_file()

    def create(self, metadata: dict[str, Any], secrets_: Secrets) -> None:
        """Write a fresh state (a stale directory of the same name is replaced)."""
        if self.path.exists():
            self.remove()
        _mkdir_private(self.root)
        _mkdir_private(self.path)
        _mkdir_private(self.hosts_dir)
        files = {
            self.ca_cert: secrets_.ca_cert,
            self.ca_key: secrets_.ca_key,
            self.client_cert: secrets_.client_cert,
            self.client_key: secrets_.client_key,
            self.ssh_key: secrets_.ssh_private,
            Path(f"{self.ssh_key}.pub"): secrets_.ssh_public + "\n",
        }
        for path, text in files.items():
            _atomic_write(path, text.encode(), 0o600)
        # Last: a directory without cluster.json is an interrupted write, never a valid state.
        self.write_metadata({"format": FORMAT_VERSION, **metadata})

    def remove(self) -> None:
        """Delete the directory; renamed first so a half-deleted state never looks valid."""
        if not self.path.exists():
            return
        trash = self.root / f".{self.name}.removing-{secrets.token_hex(4)}"
        try:
            os.replace(self.path, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    # metadata ------------------------------------------------------------------------------

    def write_metadata(self, metadata: dict[str, Any]) -> None:
        if "token" in metadata:
            raise ValueError("the API token is never written to the local state")
        data = json.dumps(metadata, indent=2, sort_keys=True, default=str).encode()
        _atomic_write(self.metadata_file, data, 0o600)

    def metadata(self) -> dict[str, Any]:
        try:
            data = json.loads(self.metadata_file.read_text())
        except FileNotFoundError:
            raise StateError(
                f"no local state for cluster {self.name!r} in {self.root} (it was created "
                "elsewhere or its state was deleted): it can be listed and nuked, not reattached"
            ) from None
        except (OSError, ValueError) as e:
            raise StateError(f"local state of cluster {self.name!r} is unreadable: {e}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            raise StateError(f"local state of cluster {self.name!r} has an unknown format")
        return data

    # secrets -------------------------------------------------------------------------------

    def secrets(self) -> Secrets:
        self.metadata()  # a clear error when the state is missing altogether
        self._check_private()
        try:
            return Secrets(
                ca_cert=self.ca_cert.read_text(),
                ca_key=self.ca_key.read_text(),
                client_cert=self.client_cert.read_text(),
                client_key=self.client_key.read_text(),
                ssh_private=self.ssh_key.read_text(),
                ssh_public=Path(f"{self.ssh_key}.pub").read_text().strip(),
            )
        except OSError as e:
            raise StateError(
                f"local state of cluster {self.name!r} is incomplete ({type(e).__name__}: "
                f"{getattr(e, 'filename', '') or e})"
            ) from None

    def _check_private(self) -> None:
        """Key files others may read are refused, as ssh refuses an unprotected private key:
        whoever could read them could reach the cluster."""
        for path in (self.path, self.ca_key, self.client_key, self.ssh_key):
            try:
                mode = path.stat().st_mode
            except FileNotFoundError:
                continue  # secrets() names a missing file
            if mode & 0o077:
                raise StateError(
                    f"local state of cluster {self.name!r}: {path} is readable by other users "
                    f"(mode {mode & 0o777:o}); run: chmod -R go-rwx {self.path}"
                )

    # host keys -----------------------------------------------------------------------------

    def pin_host_key(self, server_name: str, server_id: int, public_key: str) -> None:
        data = json.dumps({"id": server_id, "key": public_key}).encode()
        _atomic_write(self._host_file(server_name), data, 0o600)

    def forget_host_key(self, server_name: str, server_id: int) -> None:
        """Remove the pin of ``server_id`` only: a successor of the same name keeps its own."""
        path = self._host_file(server_name)
        try:
            if json.loads(path.read_text()).get("id") != server_id:
                return
            path.unlink()
        except (FileNotFoundError, ValueError):
            pass

    def host_keys(self) -> dict[str, tuple[int, str]]:
        """Server name -> (server id, public host key)."""
        out: dict[str, tuple[int, str]] = {}
        if not self.hosts_dir.is_dir():
            return out
        for path in self.hosts_dir.glob("*.json"):
            try:
                data = json.loads(path.read_text())
                out[path.name[: -len(".json")]] = (int(data["id"]), str(data["key"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # an unreadable pin is like a missing one: that server is unreachable
        return out

    # where clients connect (clients.py) ------------------------------------------------------

    @property
    def client_file(self) -> Path:
        return self.path / "client.json"

    def write_client_address(self, info: dict[str, Any]) -> None:
        _atomic_write(self.client_file, json.dumps(info, sort_keys=True).encode(), 0o600)

    def client_address(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.client_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def forget_client_address(self, pid: int) -> None:
        """Remove ``client.json`` if process ``pid`` wrote it (another may hold it now)."""
        info = self.client_address()
        if info is not None and info.get("pid") == pid:
            self.client_file.unlink(missing_ok=True)
