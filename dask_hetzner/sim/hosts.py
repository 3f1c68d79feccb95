"""Simulated hosts: every running simulated server is a real SSH endpoint.

A server that is ``running`` listens for SSH on ``(public_ip, ssh_port)`` (and
on its private IPs, as a real server listens on all interfaces). It behaves
like OpenSSH for ``root`` on Ubuntu 24.04:

* public-key login for ``root`` with the create request's ``ssh_keys``; the
  host key comes from the cloud-config ``ssh_keys`` in ``user_data`` (so
  clients can pin it), else it is generated once per server;
* exec with exit status (or exit signal), stdin/stdout/stderr; the client's
  environment is not forwarded; signal requests are ignored; a command
  started without a pty survives the client's disconnect, only its pipes are
  closed (writes then fail with EPIPE/SIGPIPE); with a pty, the disconnect
  hangs the terminal up (SIGHUP);
* commands run as ``bash -c``; shells as ``bash`` (``bash -i`` with a pty,
  job control and window size included), not login shells, since Debian's
  /etc/profile would drop the shims from PATH;
* SFTP: relative paths resolve against HOME; absolute paths are the host's,
  but writes are refused outside the server's directory and its /tmp;
* local port forwarding (direct-tcpip) to loopback addresses only; remote
  forwarding, agent and X11 forwarding are refused.

Commands run on this machine, in a per-server sandbox (``sandbox.sh``): an
"init" in new mount, pid and UTS namespaces where every mount is read-only
except the server's directory (HOME, the working directory), a private
/tmp, /var/tmp and /dev/shm and the shared package cache; /proc shows only the
server's processes; ``hostname`` is the server's name. Each SSH command enters
it with ``nsenter`` and runs without the capabilities that could undo the
sandbox or act on the whole machine (``setpriv --bounding-set``). Killing the
init kills every process of the server, daemons included: that is how power
off works. Without root (no ``unshare``) commands run unsandboxed, with a
logged warning.

Inside a server: ``HOME`` = the server's directory, ``USER=root``, ``PATH`` =
the shims (``shims/README.md``), the host Python's base ``bin`` (``python3``
is the real interpreter), then the usual Ubuntu root PATH; ``XDG_CACHE_HOME``
= the shared cache (uv's and pip's caches, the stand-in for a nearby package
mirror); ``UV_PYTHON_DOWNLOADS=never``; ``UV_NATIVE_TLS=1``; ``LANG=C.UTF-8``;
``HOSTNAME``; and what sshd adds (``SSH_CONNECTION``, ``SSH_CLIENT``,
``TERM``/``SSH_TTY`` with a pty). Nothing else of the simulator's environment.
Commands run niced (``HOST_NICENESS``), each server in a CPU group of its own
below the client where cgroups allow (``cpu.py``), so the client keeps its CPU.

Costs (2-core VM, measured with 200 hosts): ~90 ms to boot one host (the
sandbox's ~35 ``mount`` calls), 200 concurrently in 7-12 s; per host 3 small
processes (unshare, the init, its sleep; ~0.3 MB PSS, ~1 MB of the machine's
memory all in), 4 fds in the simulator (2 listeners, 2 pidfds; +1 a
connection, +4 a running command), no threads.

Layout under ``root_dir``: ``<server_id>/`` is a server's directory (HOME,
kept while the server is off, removed by ``destroy``); ``.private/<server_id>/``
holds its /tmp (emptied at boot, like a reboot does) and /var/tmp;
``.shims/`` a copy of the shims; ``.cache/`` the package cache unless
``cache_dir`` is given. Keep ``root_dir`` outside /tmp when you can: a server's
private /tmp must then contain the (bind-mounted) path of its own directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import ipaddress
import logging
import os
import posixpath
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import yaml

from .cpu import CpuShares

log = logging.getLogger(__name__)

SANDBOX_SCRIPT = Path(__file__).with_name("sandbox.sh")
SHIMS_SOURCE = Path(__file__).with_name("shims")

# What Ubuntu 24.04's sshd announces; some clients log or match it.
SERVER_VERSION = "OpenSSH_9.6p1 Ubuntu-3ubuntu13.5"

# Capabilities a server's processes lose. With them root could undo the
# sandbox (mount, open_by_handle_at) or act on the whole machine (kernel
# modules, reboot, clock, raw disks, network configuration).
DROPPED_CAPS = (
    "sys_admin sys_module sys_boot sys_time sys_rawio mknod net_admin dac_read_search "
    "linux_immutable mac_admin mac_override syslog sys_pacct audit_control bpf perfmon "
    "checkpoint_restore wake_alarm block_suspend sys_tty_config lease"
).split()

# Ubuntu's PATH for root, after the shims and the host Python.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Environment for the sandbox's own tools (never for the server's commands).
_TOOL_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}

_CHUNK = 65536
_SANDBOX_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 10.0
# With a pty, sshd closes the session when the shell exits, after sending
# the output already written; this bounds the wait for that output.
_PTY_DRAIN_TIMEOUT = 0.5


@dataclass
class HostSpec:
    """What a simulated host needs to know about its server."""

    server_id: int
    name: str
    public_ip: str  # loopback, listens for SSH on (public_ip, ssh_port)
    private_ips: list[str] = field(default_factory=list)  # loopback, reachable by other hosts
    authorized_keys: list[str] = field(default_factory=list)  # OpenSSH public key lines
    user_data: str | None = None  # cloud-config; ssh_keys.*_private pin the host key


class _Child:
    """A child process reaped by the event loop through a pidfd.

    No SIGCHLD handler and no watcher thread: a command that outlives its SSH
    session (``nohup`` without ``&`` or a dropped client) is still reaped.
    """

    def __init__(self, popen: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self.popen = popen
        self.exited: asyncio.Future[int] = loop.create_future()
        self._loop = loop
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):
            # Old kernel or Python: a daemon thread per child instead.
            threading.Thread(target=self._wait_thread, daemon=True).start()
        else:
            loop.add_reader(self._pidfd, self._check)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _check(self) -> None:
        returncode = self.popen.poll()
        if returncode is None:
            return
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if not self.exited.done():
            self.exited.set_result(returncode)

    def _wait_thread(self) -> None:
        returncode = self.popen.wait()
        with contextlib.suppress(RuntimeError):  # loop closed meanwhile
            self._loop.call_soon_threadsafe(self._set, returncode)

    def _set(self, returncode: int) -> None:
        if not self.exited.done():
            self.exited.set_result(returncode)


class _Sandbox:
    """One running sandbox: the ``unshare`` child and the init it forked."""

    def __init__(self, child: _Child, init_pid: int) -> None:
        self.child = child
        self.init_pid = init_pid
        self._init_fd: int | None
        try:
            self._init_fd = os.pidfd_open(init_pid)
        except (AttributeError, OSError):
            self._init_fd = None

    def alive(self) -> bool:
        if self.child.exited.done():
            return False
        if self._init_fd is not None:
            # A pidfd becomes readable when its process exits.
            return not select.select([self._init_fd], [], [], 0)[0]
        return True

    def kill(self) -> None:
        """SIGKILL the init: the kernel then kills every process of its pid namespace."""
        if self._init_fd is not None:
            # Through the pidfd: never a recycled pid.
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._init_fd, signal.SIGKILL)
            os.close(self._init_fd)
            self._init_fd = None
        elif not self.child.exited.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGKILL)


class _Host:
    """State of one simulated server."""

    def __init__(self, manager: HostManager, spec: HostSpec) -> None:
        self.spec = spec
        self.home = manager.directory(spec.server_id)
        self.private = manager.root_dir / ".private" / str(spec.server_id)
        self.cache = manager.cache_dir
        self.shims = manager.shims_dir
        self.lock = asyncio.Lock()
        self.running = False
        self.generated_key: asyncssh.SSHKey | None = None
        self.host_keys: list[asyncssh.SSHKey] = []
        self.authorized: set[bytes] = set()
        self.sandbox_task: asyncio.Task[_Sandbox | None] | None = None
        self.listen_task: asyncio.Task[None] | None = None
        self.acceptors: list[asyncssh.SSHAcceptor] = []
        self.connections: set[asyncssh.SSHServerConnection] = set()
        self.children: set[_Child] = set()
        self.groups: set[int] = set()  # unsandboxed: process groups to kill
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
        ]
        self.mounts = sorted(mounts, key=lambda m: len(m[0]), reverse=True)
        self.reverse_mounts = [(str(tmp), "/tmp"), (str(var_tmp), "/var/tmp")]
        self.writable = [os.path.realpath(p) for p in (self.home, tmp, var_tmp)]

    def host_path(self, path: str) -> str:
        """Where a path the server's SFTP client names lives on this machine."""
        path = posixpath.normpath(posixpath.join(str(self.home), path))
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


class _HostSSHServer(asyncssh.SSHServer):
    """sshd's policy for one host: root by public key, forwards to loopback only."""

    def __init__(self, host: _Host) -> None:
        self._host = host
        self._conn: asyncssh.SSHServerConnection | None = None

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
        if _is_loopback(dest_host):
            return True
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Connection refused")

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return False


class _HostSFTPServer(asyncssh.SFTPServer):
    """OpenSSH's sftp-server for root, with the sandbox's write rules.

    Paths are the host's (relative ones start at HOME; /tmp and /var/tmp are
    the server's private ones); any write outside the server's directory and
    its /tmp is refused with "permission denied", symlinks resolved.
    """

    def __init__(self, chan: asyncssh.SSHServerChannel, *, host: _Host) -> None:
        super().__init__(chan)
        self._host = host

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


HOST_NICENESS = 10


class HostManager:
    """The simulated hosts of one simulator (see the module docstring)."""

    def __init__(
        self, root_dir: Path, *, ssh_port: int = 22, cache_dir: Path | None = None
    ) -> None:
        self.root_dir = Path(root_dir).absolute()
        self.ssh_port = ssh_port
        self._own_cache = cache_dir is None
        self.cache_dir = Path(cache_dir).absolute() if cache_dir else self.root_dir / ".cache"
        self.shims_dir = self.root_dir / ".shims"
        for path in (self.root_dir, self.cache_dir):
            # The sandbox replaces these trees wholesale.
            if path.parts[1:2] in (("dev",), ("proc",), ("sys",)):
                raise ValueError(f"{path}: simulated hosts cannot live under /dev, /proc or /sys")
        self._hosts: dict[int, _Host] = {}
        self._removals: set[asyncio.Future[None]] = set()  # directories of destroyed servers
        self._sandboxed: bool | None = None
        self._probe: asyncio.Future[bool] | None = None
        self._tools: dict[str, str] = {}
        self.cpu = CpuShares(HOST_NICENESS, self._tool("sh"))
        self.root_dir.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        _raise_fd_limit()
        # A copy, so the shims are executable whatever the installer did to modes.
        shutil.rmtree(self.shims_dir, ignore_errors=True)
        shutil.copytree(SHIMS_SOURCE, self.shims_dir)
        for shim in self.shims_dir.iterdir():
            shim.chmod(0o644 if shim.name.startswith("_") or shim.suffix == ".md" else 0o755)
        self.path = ":".join([str(self.shims_dir), str(Path(sys.base_prefix) / "bin"), SYSTEM_PATH])

    # -- the contract -----------------------------------------------------

    def directory(self, server_id: int) -> Path:
        """The server's directory: its HOME and working directory."""
        return self.root_dir / str(server_id)

    async def boot(
        self, spec: HostSpec, *, ssh_delay: float = 0.0, ssh_never: bool = False
    ) -> None:
        """Start the server's sandbox, then SSH.

        Returns once the sandbox runs; SSH listens before return when
        ``ssh_delay`` is 0, else ``ssh_delay`` seconds later (in the
        background); with ``ssh_never`` it never listens (a host fault).
        Booting a running server does nothing.
        """
        host = self._hosts.get(spec.server_id)
        if host is None:
            host = self._hosts[spec.server_id] = _Host(self, spec)
        async with host.lock:
            if host.running:
                return
            host.spec = spec
            host.host_keys = self._host_keys(host)
            host.authorized = _authorized_keys(spec.authorized_keys)
            await asyncio.to_thread(_prepare_dirs, host)
            host.sandbox_task = asyncio.ensure_future(self._start_sandbox(host))
            try:
                await host.sandbox_task
            except BaseException:
                host.sandbox_task = None
                raise
            host.running = True
            if ssh_never:
                return
            if ssh_delay <= 0:
                try:
                    await self._listen(host)
                except BaseException:
                    await self._stop(host)
                    raise
            else:
                host.listen_task = asyncio.ensure_future(self._listen_later(host, ssh_delay))

    async def power_off(self, server_id: int) -> None:
        """Kill every process of the server and close its SSH; keep its disk."""
        host = self._hosts.get(server_id)
        if host is None:
            return
        async with host.lock:
            await self._stop(host)

    async def destroy(self, server_id: int) -> None:
        """Power off; the server's directory is removed in the background.

        A deleted server's disk is gone at once on Hetzner; here removing a directory with a
        built environment takes seconds of I/O, which must not make a delete last longer.
        :meth:`removed` waits for it.
        """
        host = self._hosts.get(server_id)
        if host is not None:
            async with host.lock:
                await self._stop(host)
                self._hosts.pop(server_id, None)
        self.cpu.release(server_id)
        private = self.root_dir / ".private" / str(server_id)
        task = asyncio.ensure_future(asyncio.to_thread(_rmtree, self.directory(server_id), private))
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)

    async def removed(self) -> None:
        """Wait until the directories of destroyed servers are gone."""
        while self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)

    def kill_processes(self, server_id: int) -> None:
        """Host fault: every process of the server dies at once; SSH stays up.

        The sandbox restarts in the background; new commands wait for it.
        """
        host = self._hosts.get(server_id)
        if host is None or not host.running or host.sandbox_task is None:
            return
        old = host.sandbox_task
        if old.done() and not old.cancelled() and old.exception() is None:
            sandbox = old.result()
            if sandbox is not None:
                sandbox.kill()
        self._kill_children(host)
        host.sandbox_task = asyncio.ensure_future(self._restart_sandbox(host, old))

    async def drop_ssh(self, server_id: int, *, down: float = 0.0) -> None:
        """Host fault: every SSH connection of the server is cut (processes keep running).

        With ``down`` > 0 sshd also refuses new connections for that many seconds.
        """
        host = self._hosts.get(server_id)
        if host is None or not host.running:
            return
        async with host.lock:
            acceptors = await host.cut_ssh(stop_listening=down > 0)
        if not acceptors:
            return
        await asyncio.sleep(down)
        async with host.lock:
            if host.running and not host.acceptors:
                await self._listen(host)

    async def close(self) -> None:
        """Destroy every server and remove what this manager created."""
        for server_id in list(self._hosts):
            await self.destroy(server_id)
        await self.removed()
        self.cpu.close()
        dirs = [self.root_dir / ".private", self.shims_dir]
        if self._own_cache:
            dirs.append(self.cache_dir)
        await asyncio.to_thread(_rmtree, *dirs)

    # -- extras for tests and diagnostics -----------------------------------

    @property
    def sandboxed(self) -> bool | None:
        """Whether commands run in sandboxes (None until the first boot)."""
        return self._sandboxed

    def init_pid(self, server_id: int) -> int | None:
        """Host pid of the server's init (None when off or unsandboxed)."""
        host = self._hosts.get(server_id)
        task = host.sandbox_task if host else None
        if task is None or not task.done() or task.cancelled() or task.exception():
            return None
        sandbox = task.result()
        return sandbox.init_pid if sandbox and sandbox.alive() else None

    def processes(self, server_id: int) -> list[int]:
        """Host pids of the server's processes (its sandbox's pid namespace)."""
        pid = self.init_pid(server_id)
        if pid is None:
            return []
        try:
            namespace = os.readlink(f"/proc/{pid}/ns/pid")
        except OSError:
            return []
        found = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry.name}/ns/pid") == namespace:
                        found.append(int(entry.name))
        return found

    # -- sandbox ----------------------------------------------------------

    def _tool(self, name: str) -> str:
        if name not in self._tools:
            self._tools[name] = shutil.which(name, path=_TOOL_ENV["PATH"]) or name
        return self._tools[name]

    async def _check_sandbox(self) -> bool:
        # One probe, however many hosts boot at once.
        if self._probe is None:
            self._probe = asyncio.ensure_future(self._probe_sandbox())
        sandboxed = await asyncio.shield(self._probe)
        if self._sandboxed is None:
            self._sandboxed = sandboxed
            if not sandboxed:
                log.warning(
                    "simulated servers run UNSANDBOXED: their commands can change this machine "
                    "(needs root and util-linux unshare/nsenter/setpriv)"
                )
        return sandboxed

    async def _probe_sandbox(self) -> bool:
        if os.geteuid() != 0:
            return False
        needed = ["unshare", "nsenter", "setpriv", "setsid", "findmnt", "mount", "bash"]
        if not all(shutil.which(tool, path=_TOOL_ENV["PATH"]) for tool in needed):
            return False
        argv = [self._tool("unshare"), "--mount", "--pid", "--uts", "--fork", "true"]
        try:
            proc = _popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_TOOL_ENV)
        except OSError:
            return False
        return await _Child(proc, asyncio.get_running_loop()).exited == 0

    async def _start_sandbox(self, host: _Host) -> _Sandbox | None:
        if not await self._check_sandbox():
            return None
        argv = [
            # If the simulator dies, unshare dies, and takes the init with it.
            self._tool("setpriv"), "--pdeathsig", "KILL", "--",
            self._tool("unshare"), "--mount", "--pid", "--uts", "--fork",
            "--propagation", "private", "--kill-child=KILL",
            self._tool("bash"), str(SANDBOX_SCRIPT), host.spec.name,
            str(host.home), str(host.private), str(host.cache), str(host.shims),
        ]  # fmt: skip
        out_r, out_w = os.pipe()
        try:
            proc = self._popen_in(
                host,
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=out_w,
                env=_TOOL_ENV,
                cwd="/",
                start_new_session=True,
            )
        except BaseException:
            os.close(out_r)
            raise
        finally:
            os.close(out_w)
        child = _Child(proc, asyncio.get_running_loop())
        reader, transport = await _read_pipe(out_r)
        try:
            init_pid = await asyncio.wait_for(
                _sandbox_ready(reader, child, host.spec.server_id), _SANDBOX_START_TIMEOUT
            )
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        finally:
            transport.close()
        return _Sandbox(child, init_pid)

    async def _restart_sandbox(
        self, host: _Host, old: asyncio.Task[_Sandbox | None]
    ) -> _Sandbox | None:
        sandbox = None
        with contextlib.suppress(Exception):
            sandbox = await old
        if sandbox is not None:
            sandbox.kill()
            await asyncio.wait_for(asyncio.shield(sandbox.child.exited), _STOP_TIMEOUT)
        if not host.running:
            return None
        # Not a reboot: /tmp keeps its files.
        await asyncio.to_thread(_prepare_dirs, host, fresh_tmp=False)
        return await self._start_sandbox(host)

    async def _stop(self, host: _Host) -> None:
        """Power off: SSH closes, every process dies, then wait for them to go."""
        host.running = False
        if host.listen_task is not None:
            host.listen_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await host.listen_task
            host.listen_task = None
        await host.cut_ssh(stop_listening=True)
        waits: list[asyncio.Future[Any]] = []
        task, host.sandbox_task = host.sandbox_task, None
        if task is not None:
            with contextlib.suppress(Exception):
                sandbox = await task
                if sandbox is not None:
                    sandbox.kill()
                    waits.append(sandbox.child.exited)
        self._kill_children(host)
        waits.extend(child.exited for child in host.children)
        if waits:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(asyncio.shield(w)) for w in waits], timeout=_STOP_TIMEOUT
            )
            if pending:
                log.warning(
                    "server %s: %d processes did not exit", host.spec.server_id, len(pending)
                )

    def _kill_children(self, host: _Host) -> None:
        """Unsandboxed servers: kill the process group of every command (best effort).

        Sandboxed ones need nothing: the init's death kills their processes,
        and each nsenter exits once it has reaped its child. (Killing nsenter
        first would orphan that child to the machine's init, which may reap it
        late and so delay the namespace's teardown.)
        """
        if self._sandboxed:
            return
        # By process group: a command's background jobs outlive its shell.
        for group in host.groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        host.groups.clear()

    # -- SSH --------------------------------------------------------------

    def _host_keys(self, host: _Host) -> list[asyncssh.SSHKey]:
        keys = _cloud_config_host_keys(host.spec.user_data)
        if keys:
            return keys
        if host.generated_key is None:
            # A real server keeps the host key it generated on first boot.
            host.generated_key = asyncssh.generate_private_key("ssh-ed25519")
        return [host.generated_key]

    async def _listen_later(self, host: _Host, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self._listen(host)
        except OSError as exc:
            log.error("server %s: cannot listen for SSH: %s", host.spec.server_id, exc)

    async def _listen(self, host: _Host) -> None:
        addresses = [host.spec.public_ip, *host.spec.private_ips]
        for address in dict.fromkeys(addresses):
            acceptor = await asyncssh.create_server(
                functools.partial(_HostSSHServer, host),
                address,
                self.ssh_port,
                server_host_keys=host.host_keys,
                process_factory=functools.partial(self._session, host),
                sftp_factory=functools.partial(_HostSFTPServer, host=host),
                encoding=None,
                line_editor=False,
                allow_scp=False,
                agent_forwarding=False,
                x11_forwarding=False,
                server_version=SERVER_VERSION,
                reuse_address=True,
            )
            host.acceptors.append(acceptor)

    async def _session(self, host: _Host, process: asyncssh.SSHServerProcess[bytes]) -> None:
        try:
            if process.subsystem:
                # sftp is served by asyncssh; anything else is unknown.
                process.stderr.write(b"subsystem request failed\n")
                process.exit(1)
                return
            assert host.sandbox_task is not None
            sandbox = await asyncio.shield(host.sandbox_task)
            if process.term_type:
                await self._run_pty(host, sandbox, process)
            else:
                await self._run_pipes(host, sandbox, process)
        except Exception:
            log.exception("server %s: session failed", host.spec.server_id)
            with contextlib.suppress(Exception):
                process.exit(255)

    def _environment(
        self, host: _Host, process: asyncssh.SSHServerProcess[bytes]
    ) -> dict[str, str]:
        conn = process.channel.get_connection()
        peer = conn.get_extra_info("peername") or ("0.0.0.0", 0)
        sock = conn.get_extra_info("sockname") or ("0.0.0.0", 0)
        env = {
            "HOME": str(host.home),
            "USER": "root",
            "LOGNAME": "root",
            "SHELL": "/bin/bash",
            "PATH": self.path,
            "LANG": "C.UTF-8",
            "HOSTNAME": host.spec.name,
            "XDG_CACHE_HOME": str(host.cache),
            "UV_PYTHON_DOWNLOADS": "never",
            # This machine's own trust store (it may hold a proxy's CA), as any host would use.
            "UV_NATIVE_TLS": "1",
            "SSH_CLIENT": f"{peer[0]} {peer[1]} {sock[1]}",
            "SSH_CONNECTION": f"{peer[0]} {peer[1]} {sock[0]} {sock[1]}",
        }
        if process.term_type:
            env["TERM"] = process.term_type
        return env

    def _popen_in(
        self, host: _Host, argv: list[str], *, start_new_session: bool, **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        """Start a process of the server, in its CPU group (cpu.py)."""
        popen = _popen(
            self.cpu.wrap(host.spec.server_id, argv), start_new_session=start_new_session, **kwargs
        )
        self.cpu.spawned(popen.pid, own_session=start_new_session)
        return popen

    def _spawn(
        self,
        host: _Host,
        sandbox: _Sandbox | None,
        inner: list[str],
        env: dict[str, str],
        *,
        pty: bool = False,
        **kwargs: Any,
    ) -> _Child:
        if sandbox is not None:
            if not sandbox.alive():
                raise RuntimeError(f"server {host.spec.server_id}: sandbox is gone")
            argv = [
                self._tool("nsenter"), "-t", str(sandbox.init_pid), "-m", "-p", "-u",
                f"--wdns={host.home}", "--",
                self._tool("setpriv"), "--bounding-set", ",".join("-" + c for c in DROPPED_CAPS), "--",
                *inner,
            ]  # fmt: skip
            cwd = "/"
        else:
            argv, cwd = inner, str(host.home)
        # Real servers are other machines: in the server's CPU group and niced, simulated ones
        # leave the client's process (and its event loop) the CPU it would have (cpu.py).
        argv = [self._tool("nice"), "-n", str(HOST_NICENESS), *argv]
        # A session of its own, as sshd gives each (with a pty, setsid -c
        # does it): no signal for the simulator's terminal reaches it.
        popen = self._popen_in(host, argv, env=env, cwd=cwd, start_new_session=not pty, **kwargs)
        child = _Child(popen, asyncio.get_running_loop())
        if sandbox is None:
            host.groups.add(popen.pid)
        host.children.add(child)
        child.exited.add_done_callback(lambda _: host.children.discard(child))
        return child

    async def _run_pipes(
        self, host: _Host, sandbox: _Sandbox | None, process: asyncssh.SSHServerProcess[bytes]
    ) -> None:
        command = process.command
        inner = [self._tool("bash"), "-c", command] if command is not None else [self._tool("bash")]
        env = self._environment(host, process)
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        try:
            child = self._spawn(
                host, sandbox, inner, env, stdin=stdin_r, stdout=stdout_w, stderr=stderr_w
            )
        except BaseException:
            for fd in (stdin_w, stdout_r, stderr_r):
                os.close(fd)
            raise
        finally:
            for fd in (stdin_r, stdout_w, stderr_w):
                os.close(fd)
        out, out_transport = await _read_pipe(stdout_r)
        err, err_transport = await _read_pipe(stderr_r)
        writer = await _write_pipe(stdin_w)
        pumps = [
            asyncio.ensure_future(_copy_out(out, process.stdout)),
            asyncio.ensure_future(_copy_out(err, process.stderr)),
        ]
        feeder = asyncio.ensure_future(_copy_in(process, writer, None))

        async def finished() -> int:
            # Like sshd: the exit status goes out after the output's EOF, so
            # `cmd &` holding stdout keeps the session open.
            returncode = await asyncio.shield(child.exited)
            await asyncio.gather(*pumps)
            return returncode

        await self._finish(
            process, finished(), pumps, feeder, [out_transport, err_transport, writer]
        )

    async def _run_pty(
        self, host: _Host, sandbox: _Sandbox | None, process: asyncssh.SSHServerProcess[bytes]
    ) -> None:
        command = process.command
        bash = self._tool("bash")
        # setsid -c makes the pty the controlling terminal (job control, ^C).
        inner = [self._tool("setsid"), "-w", "-c", bash] + (
            ["-c", command] if command is not None else ["-i"]
        )
        env = self._environment(host, process)
        master, slave = os.openpty()
        try:
            _set_winsize(master, *process.term_size)
            env["SSH_TTY"] = os.ttyname(slave)
            child = self._spawn(
                host, sandbox, inner, env, pty=True, stdin=slave, stdout=slave, stderr=slave
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        control = os.dup(master)
        out, out_transport = await _read_pipe(master)
        writer = await _write_pipe(control)
        pumps = [asyncio.ensure_future(_copy_out(out, process.stdout))]
        feeder = asyncio.ensure_future(
            _copy_in(process, writer, lambda size: _set_winsize(control, *size))
        )

        async def finished() -> int:
            returncode = await asyncio.shield(child.exited)
            # Output is complete when every holder of the pty is gone (EIO);
            # a background job may keep it, so bound the wait like sshd does.
            await asyncio.wait(pumps, timeout=_PTY_DRAIN_TIMEOUT)
            return returncode

        # Closing the master on a dropped connection hangs the terminal up:
        # the shell gets SIGHUP, as with a real sshd.
        await self._finish(process, finished(), pumps, feeder, [out_transport, writer])

    async def _finish(
        self,
        process: asyncssh.SSHServerProcess[bytes],
        finished: Any,
        pumps: list[asyncio.Future[None]],
        feeder: asyncio.Future[None],
        closers: Iterable[Any],
    ) -> None:
        done_task: asyncio.Future[int] = asyncio.ensure_future(finished)
        closed = asyncio.ensure_future(process.channel.wait_closed())
        try:
            await asyncio.wait([done_task, closed], return_when=asyncio.FIRST_COMPLETED)
            if done_task.done() and not done_task.cancelled() and done_task.exception() is None:
                returncode = done_task.result()
                with contextlib.suppress(Exception):
                    if returncode < 0:
                        process.exit_with_signal(signal.Signals(-returncode).name[3:])
                    else:
                        process.exit(returncode)
        finally:
            # The client is gone or the command is done: close our ends of its
            # pipes. The process itself is left alone, like sshd does.
            for future in (done_task, closed, feeder, *pumps):
                future.cancel()
            for closer in closers:
                closer.close()


# -- helpers ---------------------------------------------------------------


async def _sandbox_ready(reader: asyncio.StreamReader, child: _Child, server_id: int) -> int:
    """Wait for sandbox.sh's "ready <host pid of the init>" line."""
    output = b""
    while True:
        line = await reader.readline()
        if line.startswith(b"ready "):
            return int(line.split()[1])
        if not line:
            await child.exited
            message = output.decode(errors="replace").strip()
            raise RuntimeError(f"sandbox of server {server_id} failed: {message}")
        output += line


def _raise_fd_limit(wanted: int = 65536) -> None:
    """Each host holds about 4 fds (+3 a command, +1 a connection): 1024 is too few for 200."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


def _popen(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    # Popen does not block on the child (vfork + exec, errors come back
    # through a pipe at once); reaping is _Child's job.
    return subprocess.Popen(argv, close_fds=True, **kwargs)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _authorized_keys(lines: Iterable[str]) -> set[bytes]:
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


def _cloud_config_host_keys(user_data: str | None) -> list[asyncssh.SSHKey]:
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


def _prepare_dirs(host: _Host, *, fresh_tmp: bool = True) -> None:
    host.home.mkdir(mode=0o700, parents=True, exist_ok=True)
    # /tmp starts empty at every boot; /var/tmp persists, as on Ubuntu.
    if fresh_tmp:
        shutil.rmtree(host.private / "tmp", ignore_errors=True)
    for name in ("tmp", "var-tmp"):
        (host.private / name).mkdir(parents=True, exist_ok=True)
        (host.private / name).chmod(0o1777)


def _rmtree(*paths: Path) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _set_winsize(fd: int, width: int, height: int, pixwidth: int = 0, pixheight: int = 0) -> None:
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, pixwidth, pixheight))


async def _read_pipe(fd: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**20)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    return reader, transport


async def _write_pipe(fd: int) -> asyncio.StreamWriter:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_write_pipe(
        lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()),
        os.fdopen(fd, "wb", buffering=0),
    )
    return asyncio.StreamWriter(transport, protocol, None, loop)


async def _copy_out(reader: asyncio.StreamReader, writer: asyncssh.SSHWriter[bytes]) -> None:
    """Command output to the channel, until EOF or until the client is gone."""
    while True:
        try:
            data = await reader.read(_CHUNK)
        except OSError:  # EIO: the pty's last holder closed it
            return
        if not data:
            return
        try:
            writer.write(data)
            await writer.drain()
        except Exception:
            return


async def _copy_in(
    process: asyncssh.SSHServerProcess[bytes],
    writer: asyncio.StreamWriter,
    resize: Callable[[tuple[int, int, int, int]], None] | None,
) -> None:
    """Channel input to the command; EOF closes its stdin (not with a pty)."""
    target: asyncio.StreamWriter | None = writer
    while True:
        try:
            data = await process.stdin.read(_CHUNK)
        except asyncssh.TerminalSizeChanged as exc:
            if resize is not None:
                resize((exc.width, exc.height, exc.pixwidth, exc.pixheight))
            continue
        except (asyncssh.SignalReceived, asyncssh.BreakReceived):
            # OpenSSH ignores signal requests for root: stop processes explicitly.
            continue
        except Exception:
            break
        if not data:
            break
        if target is None:
            continue  # the command closed its stdin: drop input, as sshd does
        try:
            target.write(data)
            await target.drain()
        except Exception:
            target.close()
            target = None
    if target is not None and resize is None:
        target.close()
