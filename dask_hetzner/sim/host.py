"""One simulated server's host: what it was booted with, its paths as its clients see them, its SSH."""

from __future__ import annotations

import asyncio
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from .egress import Egress
from .netns import Holder
from .sandbox import Child, Dirs, Sandbox


@dataclass
class HostSpec:
    """What a simulated host needs to know about its server."""

    server_id: int
    name: str
    public_ip: str  # loopback, listens for SSH on (public_ip, ssh_port)
    private_ips: list[str] = field(default_factory=list)  # loopback, reachable by other hosts
    authorized_keys: list[str] = field(default_factory=list)  # OpenSSH public key lines
    user_data: str | None = None  # cloud-config; ssh_keys.*_private pin the host key
    snapshot: int | None = None  # the snapshot (image id) the server was created from
    memory_gb: float | None = None  # the server type's memory: what its /proc/meminfo shows


class Host:
    """State of one simulated server."""

    def __init__(self, spec: HostSpec, *, home: Path, private: Path, cache: Path, shims: Path) -> None:
        self.spec = spec
        self.home = home
        self.private = private  # its /tmp and /var/tmp
        self.cache = cache
        self.shims = shims
        self.dirs = Dirs(home, private, cache, shims)
        self.lock = asyncio.Lock()
        self.running = False
        self.generated_key: asyncssh.SSHKey | None = None
        self.host_keys: list[asyncssh.SSHKey] = []
        self.authorized: set[bytes] = set()
        self.sandbox_task: asyncio.Task[Sandbox | None] | None = None
        self.listen_task: asyncio.Task[None] | None = None
        self.ssh_delay_over = asyncio.Event()  # ends a slow_boot early (tests)
        self.acceptors: list[asyncssh.SSHAcceptor] = []
        self.connections: set[asyncssh.SSHServerConnection] = set()
        self.children: set[Child] = set()
        self.groups: set[int] = set()  # unsandboxed: process groups to kill
        self.netns: Holder | None = None  # its network namespace, from first boot to destroy
        self.egress: Egress | None = None  # its relays to the internet (egress.py)
        self.firewall: list[dict[str, Any]] | None = None  # rules in force; None: no firewall
        self._update_paths()

    def _update_paths(self) -> None:
        tmp, var_tmp = self.private / "tmp", self.private / "var-tmp"
        # Longest prefix first: the sandbox's mounts, as the SFTP server sees them.
        mounts = [
            (str(self.home), str(self.home)),
            (str(self.cache), str(self.cache)),
            (str(self.shims), str(self.shims)),
            ("/tmp", str(tmp)),
            ("/var/tmp", str(var_tmp)),
            ("/root", str(self.home)),  # root's home is the server's directory
        ]
        self.mounts = sorted(mounts, key=lambda m: len(m[0]), reverse=True)
        self.reverse_mounts = [
            (str(tmp), "/tmp"), (str(var_tmp), "/var/tmp"), (str(self.home), "/root"),
        ]  # fmt: skip
        self.writable = [os.path.realpath(p) for p in (self.home, tmp, var_tmp)]

    def host_path(self, path: str) -> str:
        """Where a path the server's SFTP client names lives on this machine (relative
        ones start at /root, the server's directory). /etc is the machine's: SFTP does not
        see the server's /etc overlay."""
        path = posixpath.normpath(posixpath.join("/root", path))
        if path.startswith("//"):
            path = "/" + path.lstrip("/")
        for inside, outside in self.mounts:
            if path == inside or path.startswith(inside + "/"):
                return outside + path[len(inside) :]
        return path

    def server_path(self, path: str) -> str:
        """The inverse of host_path, for paths reported back to the client."""
        for outside, inside in self.reverse_mounts:
            if path == outside or path.startswith(outside + "/"):
                return inside + path[len(outside) :]
        return path

    def may_write(self, path: str) -> bool:
        return any(path == root or path.startswith(root + "/") for root in self.writable)

    async def cut_ssh(self, *, stop_listening: bool) -> list[asyncssh.SSHAcceptor]:
        """Abort every SSH session; with ``stop_listening`` also close sshd's listeners first.

        Returns the listeners closed (empty when sshd keeps listening).
        """
        acceptors: list[asyncssh.SSHAcceptor] = []
        if stop_listening:
            acceptors, self.acceptors = self.acceptors, []
            for acceptor in acceptors:
                acceptor.close()
        for conn in list(self.connections):
            conn.abort()
        for acceptor in acceptors:
            await acceptor.wait_closed()
        return acceptors

