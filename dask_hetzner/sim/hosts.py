"""Simulated hosts: every running simulated server is a real SSH endpoint.

A server that is ``running`` listens for SSH on ``(public_ip, ssh_port)`` (and
on its private IPs, as a real server listens on all interfaces), in a network
namespace of its own (``netns.py``; firewalls ``firewall.py``, internet ``egress.py``). It behaves
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

Inside a server: ``HOME`` = ``/root``, where the server's directory is mounted
(its host path without a sandbox), its own ``/etc`` overlay, ``USER=root``, ``PATH`` =
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

Code: this module is ``HostManager`` (boot, power off, destroy, host faults, close);
``host.py`` one host's state, ``sandbox.py`` the namespaces and child processes,
``sshd.py`` the SSH and SFTP servers, ``sessions.py`` commands and shells, ``cpu.py``
the CPU groups.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncssh

from .cpu import CpuShares
from .host import Host, HostSpec
from .networking import Networking
from .sandbox import HOST_NICENESS, Sandbox, popen, prepare_dirs, probe, start, tool, write_meminfo
from .sessions import Sessions
from .sshd import authorized_keys, cloud_config_ssh_port, host_keys, listen

__all__ = ["HOST_NICENESS", "HostManager", "HostSpec"]

log = logging.getLogger(__name__)

SHIMS_SOURCE = Path(__file__).with_name("shims")

# Ubuntu's PATH for root, after the shims and the host Python.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_STOP_TIMEOUT = 10.0


class HostManager:
    """The simulated hosts of one simulator (see the module docstring)."""

    def __init__(
        self,
        root_dir: Path,
        *,
        ssh_port: int = 22,
        cache_dir: Path | None = None,
        network: bool = True,
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
        self._hosts: dict[int, Host] = {}
        self._removals: set[asyncio.Future[None]] = set()  # directories of destroyed servers
        self._sandboxed: bool | None = None
        self._probe: asyncio.Future[bool] | None = None
        self.networking = Networking(network)  # a network namespace per sandboxed server
        self.cpu = CpuShares(HOST_NICENESS, tool("sh"))
        self.root_dir.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        _raise_fd_limit()
        # A copy, so the shims are executable whatever the installer did to modes.
        shutil.rmtree(self.shims_dir, ignore_errors=True)
        shutil.copytree(SHIMS_SOURCE, self.shims_dir)
        for shim in self.shims_dir.iterdir():
            shim.chmod(0o644 if shim.name.startswith("_") or shim.suffix == ".md" else 0o755)
        self.path = ":".join([str(self.shims_dir), str(Path(sys.base_prefix) / "bin"), SYSTEM_PATH])
        self.sessions = Sessions(self.path, self.popen_in)

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
        restore = None
        if host is None:
            host = self._hosts[spec.server_id] = self._new_host(spec)
            if spec.snapshot is not None and not self.directory(spec.server_id).exists():
                restore = self._image_dir(spec.snapshot)  # a new server from a snapshot
        async with host.lock:
            if restore is not None:
                disk = (host.home, host.private / "etc" / "upper", host.private / "home")
                await asyncio.to_thread(_restore, restore, *disk)
            if host.running:
                return
            host.spec = spec
            host.host_keys = host_keys(host)
            host.authorized = authorized_keys(spec.authorized_keys)
            await asyncio.to_thread(prepare_dirs, host.dirs)
            if await self._check_sandbox():
                await self.networking.connect(host)
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
                host.ssh_delay_over.clear()  # a release ends this boot's delay, not a later one's
                host.listen_task = asyncio.ensure_future(self._listen_later(host, ssh_delay))

    def end_ssh_delay(self, server_id: int) -> bool:
        """SSH listens now on a booted server still in its delay (a ``slow_boot`` ended
        early: a test's release, not a wait); False if it is not waiting."""
        host = self._hosts.get(server_id)
        if host is None or host.listen_task is None or host.listen_task.done():
            return False
        host.ssh_delay_over.set()
        return True

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
                await self.networking.disconnect(host)
        self.networking.rules.pop(server_id, None)  # also for a server that never booted
        self.cpu.release(server_id)
        private = self.root_dir / ".private" / str(server_id)
        task = asyncio.ensure_future(asyncio.to_thread(rmtree, self.directory(server_id), private))
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

    async def drop_ssh(self, server_id: int, *, down: float = 0.0, new_host_key: bool = False) -> None:
        """Host fault: every SSH connection of the server is cut (processes keep running).

        With ``down`` > 0 sshd also refuses new connections for that many seconds; with
        ``new_host_key`` it comes back with a host key of its own (not the pinned one).
        """
        host = self._hosts.get(server_id)
        if host is None or not host.running:
            return
        async with host.lock:
            acceptors = await host.cut_ssh(stop_listening=down > 0 or new_host_key)
            if new_host_key:
                host.host_keys = [asyncssh.generate_private_key("ssh-ed25519")]
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
        await self.networking.close()
        dirs = [self.root_dir / ".private", self.root_dir / ".images", self.shims_dir]
        if self._own_cache:
            dirs.append(self.cache_dir)
        await asyncio.to_thread(rmtree, *dirs)

    async def snapshot(self, server_id: int, image_id: int) -> int:
        """Copy the server's disk (its directory, its /etc changes and its /home) into an image;
        its size in bytes."""
        host = self._hosts.get(server_id)
        if host is None:
            return 0
        target = self._image_dir(image_id)
        return await asyncio.to_thread(
            _copy_disk, host.home, host.private / "etc" / "upper", target, host.private / "home"
        )

    async def forget_image(self, image_id: int) -> None:
        await asyncio.to_thread(rmtree, self._image_dir(image_id))

    def _image_dir(self, image_id: int) -> Path:
        return self.root_dir / ".images" / str(image_id)

    async def set_firewall(self, server_id: int, rules: list[dict[str, Any]] | None) -> None:
        """The rules of the firewalls applied to a server (None: none applies); enforced
        from now on, and at every boot."""
        self.networking.rules[server_id] = rules  # before any await: a boot meanwhile sees it
        host = self._hosts.get(server_id)
        if host is None:
            return
        async with host.lock:
            await self.networking.apply_firewall(host)

    async def start_network(self, guarded: Sequence[str] = ()) -> str | None:
        """The servers' network made now; this machine's address on it (None without).
        ``guarded``: the public address blocks, unreachable until a server has its address."""
        return self.networking.client_ip if await self.networking.start(guarded) else None

    # -- extras for tests and diagnostics -----------------------------------

    @property
    def client_ip(self) -> str | None:
        """This machine's address on the simulated network (what servers and firewalls see
        connections from the client come from); None without network namespaces."""
        return self.networking.client_ip

    @property
    def networked(self) -> bool:
        """Whether servers have network namespaces of their own (after the first boot)."""
        return self.networking.started

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

    # -- sandboxes --------------------------------------------------------

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
        return await probe()

    async def _start_sandbox(self, host: Host) -> Sandbox | None:
        if not await self._check_sandbox():
            return None
        popen_in = functools.partial(self.popen_in, host)
        netns = host.netns.pid if host.netns is not None else None
        if host.spec.memory_gb:  # sandbox.sh mounts it on /proc/meminfo
            await asyncio.to_thread(write_meminfo, host.private / "meminfo", host.spec.memory_gb)
        return await start(host.spec.server_id, host.spec.name, host.dirs, popen_in, netns)

    # -- network ----------------------------------------------------------

    async def _restart_sandbox(
        self, host: Host, old: asyncio.Task[Sandbox | None]
    ) -> Sandbox | None:
        sandbox = None
        with contextlib.suppress(Exception):
            sandbox = await old
        if sandbox is not None:
            sandbox.kill()
            await asyncio.wait_for(asyncio.shield(sandbox.child.exited), _STOP_TIMEOUT)
        if not host.running:
            return None
        # Not a reboot: /tmp keeps its files.
        await asyncio.to_thread(prepare_dirs, host.dirs, fresh_tmp=False)
        return await self._start_sandbox(host)

    async def _stop(self, host: Host) -> None:
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

    def _kill_children(self, host: Host) -> None:
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

    def popen_in(
        self, host: Host, argv: list[str], *, start_new_session: bool, **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        """Start a process of the server, in its CPU group (cpu.py)."""
        process = popen(
            self.cpu.wrap(host.spec.server_id, argv), start_new_session=start_new_session, **kwargs
        )
        self.cpu.spawned(process.pid, own_session=start_new_session)
        return process

    # -- SSH --------------------------------------------------------------

    async def _listen_later(self, host: Host, delay: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(host.ssh_delay_over.wait(), delay)  # or ended early
        try:
            await self._listen(host)
        except OSError as exc:
            log.error("server %s: cannot listen for SSH: %s", host.spec.server_id, exc)

    async def _listen(self, host: Host) -> None:
        port = cloud_config_ssh_port(host.spec.user_data, self.ssh_port)
        await listen(host, port, self.sessions.session)

    def _new_host(self, spec: HostSpec) -> Host:
        return Host(
            spec,
            home=self.directory(spec.server_id),
            private=self.root_dir / ".private" / str(spec.server_id),
            cache=self.cache_dir,
            shims=self.shims_dir,
        )


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


def _copy_tree(source: Path, target: Path) -> None:
    """A copy with modes and owners (a server's users own files: the dask user's, useradd -m)."""
    shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
    if os.geteuid() != 0:
        return
    for path in [source, *source.rglob("*")]:
        info = path.lstat()
        os.lchown(target / path.relative_to(source), info.st_uid, info.st_gid)
        if not path.is_symlink():  # chown clears set-user/group-ID bits
            os.chmod(target / path.relative_to(source), info.st_mode & 0o7777)


def _copy_disk(home: Path, etc: Path, target: Path, users: Path | None = None) -> int:
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for source, name in ((home, "home"), (etc, "etc"), (users, "users")):
        if source is not None and source.is_dir():
            _copy_tree(source, target / name)
    return sum(p.lstat().st_size for p in target.rglob("*") if p.is_file() and not p.is_symlink())


def _restore(image: Path, home: Path, etc: Path, users: Path | None = None) -> None:
    """A new server's disk from a snapshot (an image deleted meanwhile: an empty disk)."""
    for name, target in (("home", home), ("etc", etc), ("users", users)):
        if target is not None and (image / name).is_dir():
            _copy_tree(image / name, target)


def rmtree(*paths: Path) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
