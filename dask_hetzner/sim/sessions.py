"""SSH sessions of a simulated host: exec and shells, with pipes or a pty, like OpenSSH's sshd.

The client's environment is not forwarded; signal requests are ignored; a command
started without a pty survives the client's disconnect (only its pipes close); with a
pty, the disconnect hangs the terminal up (SIGHUP).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import struct
import termios
from collections.abc import Callable, Iterable
from typing import Any

import asyncssh

from .host import Host
from .sandbox import HOST_NICENESS, Child, PopenIn, Sandbox, enter_argv, read_pipe, tool

log = logging.getLogger(__name__)

_CHUNK = 65536
ROOT_HOME = "/root"
# With a pty, sshd closes the session when the shell exits, after sending
# the output already written; this bounds the wait for that output.
_PTY_DRAIN_TIMEOUT = 0.5


class Sessions:
    """Runs the sessions of every host of one HostManager."""

    def __init__(self, path: str, popen_in: PopenIn) -> None:
        self.path = path  # PATH inside a server
        self.popen_in = popen_in

    async def session(self, host: Host, process: asyncssh.SSHServerProcess[bytes]) -> None:
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
        self, host: Host, process: asyncssh.SSHServerProcess[bytes], home: str
    ) -> dict[str, str]:
        conn = process.channel.get_connection()
        peer = conn.get_extra_info("peername") or ("0.0.0.0", 0)
        sock = conn.get_extra_info("sockname") or ("0.0.0.0", 0)
        # Ubuntu's sshd_config: AcceptEnv LANG LC_* (the client's locale, nothing else).
        accepted = {
            str(k): str(v)
            for k, v in process.env.items()
            if str(k) == "LANG" or str(k).startswith("LC_")
        }
        env = {
            "HOME": home,
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
        env.update(accepted)
        return env

    @staticmethod
    def _home(host: Host, sandbox: Sandbox | None) -> str:
        """HOME and the working directory: /root in a sandbox (sandbox.sh mounts the server's
        directory there), the directory itself without one."""
        return ROOT_HOME if sandbox is not None else str(host.home)


    def _spawn(
        self,
        host: Host,
        sandbox: Sandbox | None,
        inner: list[str],
        env: dict[str, str],
        *,
        pty: bool = False,
        **kwargs: Any,
    ) -> Child:
        if sandbox is not None:
            if not sandbox.alive():
                raise RuntimeError(f"server {host.spec.server_id}: sandbox is gone")
            argv, cwd = enter_argv(sandbox, ROOT_HOME, inner), "/"
        else:
            argv, cwd = inner, str(host.home)
        # Real servers are other machines: in the server's CPU group and niced, simulated ones
        # leave the client's process (and its event loop) the CPU it would have (cpu.py).
        # sshd starts each session with default signal dispositions, whatever the
        # simulator ignores (nohup, a test runner): env --default-signal resets them all.
        argv = [tool("nice"), "-n", str(HOST_NICENESS), tool("env"), "--default-signal", *argv]
        # A session of its own, as sshd gives each (with a pty, setsid -c
        # does it): no signal for the simulator's terminal reaches it.
        popen = self.popen_in(host, argv, env=env, cwd=cwd, start_new_session=not pty, **kwargs)
        child = Child(popen, asyncio.get_running_loop())
        if sandbox is None:
            host.groups.add(popen.pid)
        host.children.add(child)
        child.exited.add_done_callback(lambda _: host.children.discard(child))
        return child

    async def _run_pipes(
        self, host: Host, sandbox: Sandbox | None, process: asyncssh.SSHServerProcess[bytes]
    ) -> None:
        command = process.command
        inner = [tool("bash"), "-c", command] if command is not None else [tool("bash")]
        env = self._environment(host, process, self._home(host, sandbox))
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
        out, out_transport = await read_pipe(stdout_r)
        err, err_transport = await read_pipe(stderr_r)
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
        self, host: Host, sandbox: Sandbox | None, process: asyncssh.SSHServerProcess[bytes]
    ) -> None:
        command = process.command
        bash = tool("bash")
        # setsid -c makes the pty the controlling terminal (job control, ^C).
        inner = [tool("setsid"), "-w", "-c", bash] + (
            ["-c", command] if command is not None else ["-i"]
        )
        env = self._environment(host, process, self._home(host, sandbox))
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
        out, out_transport = await read_pipe(master)
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


def _set_winsize(fd: int, width: int, height: int, pixwidth: int = 0, pixheight: int = 0) -> None:
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, pixwidth, pixheight))


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
