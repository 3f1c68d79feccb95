"""sshd of a simulated host: OpenSSH's policy for ``root`` by public key, SFTP with the
sandbox's write rules, forwarding to loopback only, host keys pinned by cloud-config."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import posixpath
import re
from collections.abc import Callable, Iterable
from typing import Any

import asyncssh
import yaml
from asyncssh.forward import SSHForwarder
from asyncssh.sftp import MIN_SFTP_VERSION, run_sftp_server

from .host import Host
from .netns import connected_socket, listening_socket

log = logging.getLogger(__name__)

# What Ubuntu 24.04's sshd announces; some clients log or match it.
SERVER_VERSION = "OpenSSH_9.6p1 Ubuntu-3ubuntu13.5"

# Runs one SSH session (exec, shell) of a host: Sessions.session.
SessionRunner = Callable[[Host, "asyncssh.SSHServerProcess[bytes]"], Any]


class HostSSHServer(asyncssh.SSHServer):
    """sshd's policy for one host: root by public key, forwards to loopback only."""

    def __init__(self, host: Host, session: SessionRunner) -> None:
        self._host = host
        self._session = session
        self._conn: asyncssh.SSHServerConnection | None = None

    def session_requested(self) -> HostProcess:
        return HostProcess(self._host, self._session)

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._host.connections.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._host.connections.discard(self._conn)

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return username == "root" and key.public_data in self._host.authorized

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> bool:
        # The simulated network is loopback; nothing may leave this machine.
        if not is_loopback(dest_host):
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Connection refused")
        if self._host.netns is None:
            return True
        # Dialled from inside the server, as sshd does: its own 127.0.0.1, its neighbours.
        return self._forward(self._host.netns.pid, dest_host, dest_port)

    async def _forward(self, pid: int, dest_host: str, dest_port: int) -> SSHForwarder:
        host = "127.0.0.1" if dest_host == "localhost" else dest_host
        try:
            sock = await connected_socket(pid, host, dest_port)
            loop = asyncio.get_running_loop()
            _, peer = await loop.create_connection(SSHForwarder, sock=sock)
        except OSError as exc:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, str(exc)) from None
        return SSHForwarder(peer)

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return False


class HostProcess(asyncssh.SSHServerProcess[bytes]):
    """A session: exec and shells go to the session runner (sessions.py); the sftp
    subsystem ends like OpenSSH's, with exit status 0, even when the client sends EOF at
    once (asyncssh's own sftp session then drops the whole connection)."""

    def __init__(self, host: Host, session: SessionRunner) -> None:
        super().__init__(
            functools.partial(session, host),
            functools.partial(HostSFTPServer, host=host),
            MIN_SFTP_VERSION,
            False,  # no scp protocol: OpenSSH 9's scp speaks SFTP
        )
        self._host = host

    def session_started(self) -> None:
        if self.channel.get_subsystem() != "sftp":
            super().session_started()
            return
        reader: asyncssh.SSHReader[bytes] = asyncssh.SSHReader(self, self.channel)
        writer: asyncssh.SSHWriter[bytes] = asyncssh.SSHWriter(self, self.channel)
        self.channel.get_connection().create_task(self._sftp(reader, writer))

    async def _sftp(self, reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]) -> None:
        sftp = HostSFTPServer(self.channel, host=self._host)
        try:
            await run_sftp_server(sftp, reader, writer, MIN_SFTP_VERSION)
        except (asyncio.IncompleteReadError, asyncssh.Error, OSError):
            pass  # the client went: sftp-server exits 0 at EOF
        with contextlib.suppress(Exception):
            self.channel.exit(0)


class HostSFTPServer(asyncssh.SFTPServer):
    """OpenSSH's sftp-server for root, with the sandbox's write rules.

    Paths are the host's (relative ones start at HOME; /tmp and /var/tmp are
    the server's private ones); any write outside the server's directory and
    its /tmp is refused with "permission denied", symlinks resolved.
    """

    def __init__(self, chan: asyncssh.SSHServerChannel, *, host: Host) -> None:
        super().__init__(chan)
        self._host = host

    def exit(self) -> None:
        # OpenSSH's sshd reports sftp-server's exit status (0) before closing the channel;
        # OpenSSH 9's scp (SFTP underneath) and `ssh -s sftp` fail without it.
        with contextlib.suppress(Exception):
            self.channel.exit(0)
        super().exit()

    def map_path(self, path: bytes) -> bytes:
        return os.fsencode(self._host.host_path(os.fsdecode(path)))

    def reverse_map_path(self, path: bytes) -> bytes:
        return os.fsencode(self._host.server_path(os.fsdecode(path)))

    def _check(self, path: bytes | str, *, follow: bool) -> None:
        """Refuse unless the object at (mapped) path is inside a writable root."""
        local = os.fsdecode(path)
        if follow:
            real = os.path.realpath(local)
        else:
            parent, name = posixpath.split(local)
            real = posixpath.join(os.path.realpath(parent or "/"), name)
        if not self._host.may_write(real):
            raise asyncssh.SFTPPermissionDenied("Permission denied")

    def _check_entry(self, path: bytes) -> None:
        """Refuse unless the directory holding the entry is writable."""
        parent = posixpath.dirname(os.fsdecode(self.map_path(path)))
        if not self._host.may_write(os.path.realpath(parent or "/")):
            raise asyncssh.SFTPPermissionDenied("Permission denied")

    def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> object:
        writing = asyncssh.FXF_WRITE | asyncssh.FXF_APPEND | asyncssh.FXF_CREAT | asyncssh.FXF_TRUNC
        if pflags & writing:
            self._check(self.map_path(path), follow=True)
        return super().open(path, pflags, attrs)

    def open56(
        self, path: bytes, desired_access: int, flags: int, attrs: asyncssh.SFTPAttrs
    ) -> object:
        writing = asyncssh.ACE4_WRITE_DATA | asyncssh.ACE4_APPEND_DATA
        disposition = flags & asyncssh.FXF_ACCESS_DISPOSITION
        if desired_access & writing or disposition != asyncssh.FXF_OPEN_EXISTING:
            self._check(self.map_path(path), follow=True)
        return super().open56(path, desired_access, flags, attrs)

    def setstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> Any:
        self._check(self.map_path(path), follow=True)
        return super().setstat(path, attrs)

    def lsetstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> Any:
        self._check(self.map_path(path), follow=False)
        return super().lsetstat(path, attrs)

    def fsetstat(self, file_obj: object, attrs: asyncssh.SFTPAttrs) -> Any:
        self._check(getattr(file_obj, "name", "/"), follow=True)
        return super().fsetstat(file_obj, attrs)

    def remove(self, path: bytes) -> Any:
        self._check_entry(path)
        return super().remove(path)

    def mkdir(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> Any:
        self._check_entry(path)
        return super().mkdir(path, attrs)

    def rmdir(self, path: bytes) -> Any:
        self._check_entry(path)
        return super().rmdir(path)

    def rename(self, oldpath: bytes, newpath: bytes) -> Any:
        self._check_entry(oldpath)
        self._check_entry(newpath)
        return super().rename(oldpath, newpath)

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> Any:
        self._check_entry(oldpath)
        self._check_entry(newpath)
        return super().posix_rename(oldpath, newpath)

    def symlink(self, oldpath: bytes, newpath: bytes) -> Any:
        self._check_entry(newpath)
        return super().symlink(oldpath, newpath)

    def link(self, oldpath: bytes, newpath: bytes) -> Any:
        # A hard link to a file outside would make it writable from inside.
        self._check(self.map_path(oldpath), follow=False)
        self._check_entry(newpath)
        return super().link(oldpath, newpath)


def host_keys(host: Host) -> list[asyncssh.SSHKey]:
    keys = cloud_config_host_keys(host.spec.user_data)
    if keys:
        return keys
    if host.generated_key is None:
        # A real server keeps the host key it generated on first boot.
        host.generated_key = asyncssh.generate_private_key("ssh-ed25519")
    return [host.generated_key]


async def listen(host: Host, port: int, session: SessionRunner) -> None:
    """Listen on every address of the host (as a real server listens on all interfaces)."""
    if host.netns is not None:
        # One socket on 0.0.0.0 inside the server's network namespace, as sshd's.
        sock = await listening_socket(host.netns.pid, port)
        host.acceptors.append(await _serve(host, session, sock=sock))
        return
    addresses = [host.spec.public_ip, *host.spec.private_ips]
    for address in dict.fromkeys(addresses):
        acceptor = await _serve(host, session, host=address, port=port, reuse_address=True)
        host.acceptors.append(acceptor)


async def _serve(server: Host, session: SessionRunner, **where: Any) -> asyncssh.SSHAcceptor:
    return await asyncssh.create_server(
        functools.partial(HostSSHServer, server, session),
        server_host_keys=server.host_keys,
        encoding=None,
        line_editor=False,
        allow_scp=False,
        agent_forwarding=False,
        x11_forwarding=False,
        server_version=SERVER_VERSION,
        **where,
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def authorized_keys(lines: Iterable[str]) -> set[bytes]:
    keys = set()
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            keys.add(asyncssh.import_public_key(line).public_data)
        except (asyncssh.KeyImportError, ValueError):
            log.warning("ignoring an authorized key that cannot be read: %.40s...", line)
    return keys


def cloud_config_ssh_port(user_data: str | None, default: int) -> int:
    """The port sshd listens on: the image's, unless the cloud-config's ``write_files`` puts a
    ``Port`` into ``/etc/ssh/sshd_config.d/`` (cloud-init writes it, its ``runcmd`` restarts
    sshd). Nothing else moves it: Hetzner does not (docs/simulator.md, "Deliberate behaviours")."""
    if not user_data or not user_data.lstrip().startswith("#cloud-config"):
        return default
    try:
        config = yaml.safe_load(user_data)
    except yaml.YAMLError:
        return default
    files = config.get("write_files") if isinstance(config, dict) else None
    for entry in files if isinstance(files, list) else []:
        path = str(entry.get("path", "")) if isinstance(entry, dict) else ""
        if path.startswith("/etc/ssh/sshd_config.d/") and path.endswith(".conf"):
            found = re.search(r"^\s*Port\s+(\d+)\s*$", str(entry.get("content", "")), re.MULTILINE)
            if found:
                return int(found.group(1))
    return default


def cloud_config_host_keys(user_data: str | None) -> list[asyncssh.SSHKey]:
    """The host keys a cloud-config's ``ssh_keys`` gives (``*_private``)."""
    if not user_data or not user_data.lstrip().startswith("#cloud-config"):
        return []
    try:
        config = yaml.safe_load(user_data)
    except yaml.YAMLError:
        log.warning("user_data is not valid YAML; generating a host key")
        return []
    ssh_keys = config.get("ssh_keys") if isinstance(config, dict) else None
    if not isinstance(ssh_keys, dict):
        return []
    keys = []
    for name, value in ssh_keys.items():
        if str(name).endswith("_private") and isinstance(value, str):
            try:
                keys.append(asyncssh.import_private_key(value))
            except (asyncssh.KeyImportError, ValueError):
                log.warning("ignoring host key %s from user_data: cannot be read", name)
    return keys
