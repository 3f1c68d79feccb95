"""The sandbox of a simulated server: ``sandbox.sh`` in new mount, pid and UTS namespaces.

An "init" per server; every mount read-only except the server's directory, a private
/tmp, /var/tmp, /home and /dev/shm, an /etc overlay, and the shared package cache.  Its commands enter it with
``nsenter`` without the capabilities that could undo it (``DROPPED_CAPS``); killing the
init kills every process of the server.  Children are reaped through pidfds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SANDBOX_SCRIPT = Path(__file__).with_name("sandbox.sh")

# Capabilities a server's processes lose. With them root could undo the
# sandbox (mount, open_by_handle_at) or act on the whole machine (kernel
# modules, reboot, clock, raw disks, network configuration).
DROPPED_CAPS = (
    "sys_admin sys_module sys_boot sys_time sys_rawio mknod net_admin dac_read_search "
    "linux_immutable mac_admin mac_override syslog sys_pacct audit_control bpf perfmon "
    "checkpoint_restore wake_alarm block_suspend sys_tty_config lease"
).split()


# Environment for the sandbox's own tools (never for the server's commands).
TOOL_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}
# Simulated servers' commands run niced (and in CPU groups, cpu.py): the client keeps its CPU.
HOST_NICENESS = 10

_SANDBOX_START_TIMEOUT = 60.0

# Starts a process of one server (in its CPU group): HostManager.popen_in for that server.
PopenIn = Callable[..., "subprocess.Popen[bytes]"]

_TOOLS: dict[str, str] = {}


def tool(name: str) -> str:
    """Full path of a system tool (found once)."""
    if name not in _TOOLS:
        _TOOLS[name] = shutil.which(name, path=TOOL_ENV["PATH"]) or name
    return _TOOLS[name]


def popen(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    # Popen does not block on the child (vfork + exec, errors come back
    # through a pipe at once); reaping is Child's job.
    return subprocess.Popen(argv, close_fds=True, **kwargs)


class Child:
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


class Sandbox:
    """One running sandbox: the ``unshare`` child and the init it forked."""

    def __init__(self, child: Child, init_pid: int) -> None:
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



async def probe() -> bool:
    """Whether sandboxes work here (root and util-linux unshare/nsenter/setpriv)."""
    if os.geteuid() != 0:
        return False
    needed = ["unshare", "nsenter", "setpriv", "setsid", "findmnt", "mount", "bash"]
    if not all(shutil.which(t, path=TOOL_ENV["PATH"]) for t in needed):
        return False
    argv = [tool("unshare"), "--mount", "--pid", "--uts", "--fork", "true"]
    try:
        proc = popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=TOOL_ENV)
    except OSError:
        return False
    return await Child(proc, asyncio.get_running_loop()).exited == 0


@dataclass(frozen=True)
class Dirs:
    """A server's directories, as sandbox.sh mounts them."""

    home: Path  # HOME and working directory, writable
    private: Path  # holds its /tmp and /var/tmp
    cache: Path  # the shared package cache
    shims: Path


async def start(
    server_id: int, name: str, dirs: Dirs, popen_in: PopenIn, netns_pid: int | None = None
) -> Sandbox:
    """Run sandbox.sh for a server (in the network namespace ``netns_pid`` holds, if given);
    returns once its init is ready."""
    # nsenter execs unshare in the server's network namespace (netns.py).
    join = [tool("nsenter"), f"--net=/proc/{netns_pid}/ns/net", "--"] if netns_pid else []
    argv = [
        # If the simulator dies, unshare dies, and takes the init with it.
        tool("setpriv"), "--pdeathsig", "KILL", "--", *join,
        tool("unshare"), "--mount", "--pid", "--uts", "--fork",
        "--propagation", "private", "--kill-child=KILL",
        tool("bash"), str(SANDBOX_SCRIPT), name,
        str(dirs.home), str(dirs.private), str(dirs.cache), str(dirs.shims), _under_root(),
    ]  # fmt: skip
    out_r, out_w = os.pipe()
    try:
        proc = popen_in(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out_w,
            stderr=out_w,
            env=TOOL_ENV,
            cwd="/",
            start_new_session=True,
        )
    except BaseException:
        os.close(out_r)
        raise
    finally:
        os.close(out_w)
    child = Child(proc, asyncio.get_running_loop())
    reader, transport = await read_pipe(out_r)
    try:
        init_pid = await asyncio.wait_for(
            _sandbox_ready(reader, child, server_id), _SANDBOX_START_TIMEOUT
        )
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    finally:
        transport.close()
    return Sandbox(child, init_pid)


def _under_root() -> str:
    """The host Python's prefix when it lives under /root, which a server's home hides."""
    prefix = os.path.realpath(sys.base_prefix)
    return prefix if prefix.startswith("/root/") else ""


def enter_argv(sandbox: Sandbox, home: Path | str, inner: list[str]) -> list[str]:
    """``inner`` run inside the sandbox, without the dropped capabilities."""
    return [
        tool("nsenter"), "-t", str(sandbox.init_pid), "-m", "-p", "-u", "-n",
        f"--wdns={home}", "--",
        tool("setpriv"), "--bounding-set", ",".join("-" + c for c in DROPPED_CAPS), "--",
        *inner,
    ]  # fmt: skip


async def _sandbox_ready(reader: asyncio.StreamReader, child: Child, server_id: int) -> int:
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


def prepare_dirs(dirs: Dirs, *, fresh_tmp: bool = True) -> None:
    dirs.home.mkdir(mode=0o700, parents=True, exist_ok=True)
    # /tmp starts empty at every boot; /var/tmp persists, as on Ubuntu.
    if fresh_tmp:
        shutil.rmtree(dirs.private / "tmp", ignore_errors=True)
    for name in ("tmp", "var-tmp"):
        (dirs.private / name).mkdir(parents=True, exist_ok=True)
        (dirs.private / name).chmod(0o1777)
    (dirs.private / "home").mkdir(mode=0o755, exist_ok=True)  # the server's /home (sandbox.sh)
    for name in ("upper", "work"):  # the server's /etc overlay (sandbox.sh)
        (dirs.private / "etc" / name).mkdir(mode=0o755, parents=True, exist_ok=True)


# Lines of /proc/meminfo that describe the machine's size; the rest is the host's.
_SIZE_LINES = ("MemTotal:", "MemFree:", "MemAvailable:")
# MemTotal / nominal memory on a cloud server (the kernel's own share): an estimate.
_VISIBLE = 0.96


def write_meminfo(path: Path, memory_gb: float) -> None:
    """A /proc/meminfo for a server of ``memory_gb`` (its type's memory): the machine's own
    lines, with its size lines those of the server (Linux shows a bit less than nominal)."""
    total_kb = int(memory_gb * 1024**2 * _VISIBLE)
    lines = []
    for line in Path("/proc/meminfo").read_text().splitlines():
        key = line.split(maxsplit=1)[0] if line.strip() else ""
        if key in _SIZE_LINES:
            share = 1.0 if key == "MemTotal:" else 0.9  # a fresh server: most of it free
            line = f"{key:<16}{int(total_kb * share):>8} kB"
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")


async def read_pipe(fd: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**20)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    return reader, transport
