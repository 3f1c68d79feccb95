"""A real SSH server for tests (asyncssh, loopback only).

Commands run as real local subprocesses (``bash -c``), SFTP serves the real file system and
direct TCP/IP forwarding ("ssh -L") is allowed.  Like the production servers and the
simulator, it ignores SSH signal requests (and records them, so tests can assert none came).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import asyncssh

from dask_hetzner.security import HostKey


class SSHTestServer:
    def __init__(self, host_key: HostKey, authorized_keys: list[str], *, port: int = 0) -> None:
        self.host_key = host_key
        self.authorized_keys = authorized_keys
        self.host = "127.0.0.1"
        self.port = port
        self.usernames: list[str] = []
        self.commands: list[str] = []
        self.signals: list[str] = []
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._procs: set[asyncio.subprocess.Process] = set()
        self._handlers: set[asyncio.Task] = set()
        self._conns: set[asyncssh.SSHServerConnection] = set()

    async def start(self) -> SSHTestServer:
        server = self

        class _Server(asyncssh.SSHServer):
            def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
                self._conn = conn
                server._conns.add(conn)

            def connection_lost(self, exc: Exception | None) -> None:
                server._conns.discard(self._conn)

            def begin_auth(self, username: str) -> bool:
                server.usernames.append(username)
                return True

            def connection_requested(self, dest_host, dest_port, orig_host, orig_port):
                return True  # allow local port forwarding

            def server_requested(self, listen_host, listen_port):
                return False  # no remote forwarding

        self._acceptor = await asyncssh.listen(
            self.host,
            self.port,
            server_factory=_Server,
            server_host_keys=[asyncssh.import_private_key(self.host_key.private_openssh)],
            authorized_client_keys=asyncssh.import_authorized_keys(
                "\n".join(self.authorized_keys) + "\n"
            ),
            password_auth=False,
            kbdint_auth=False,
            process_factory=self._handle,
            sftp_factory=True,
            allow_scp=False,
            encoding=None,
        )
        self.port = self._acceptor.get_port()
        return self

    async def _handle(self, process: asyncssh.SSHServerProcess) -> None:
        cmd = process.command
        if cmd is None:
            process.stderr.write(b"no interactive shells here\n")
            process.exit(1)
            return
        self.commands.append(cmd)
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        # A session of its own so that a dropped channel can kill the whole command (detached
        # processes have left it through setsid).
        proc = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            cmd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        self._procs.add(proc)

        async def pump_in() -> None:
            assert proc.stdin is not None
            while True:
                try:
                    chunk = await process.stdin.read(65536)
                except asyncssh.SignalReceived as e:
                    self.signals.append(e.signal)  # refused: the real servers ignore them too
                    continue
                except (asyncssh.BreakReceived, asyncssh.TerminalSizeChanged):
                    continue
                except (OSError, asyncssh.Error):
                    break
                if not chunk:
                    break
                proc.stdin.write(chunk)
                with contextlib.suppress(OSError):
                    await proc.stdin.drain()
            with contextlib.suppress(OSError):
                proc.stdin.close()

        async def pump_out(src: asyncio.StreamReader, dst) -> None:
            while chunk := await src.read(65536):
                with contextlib.suppress(OSError, asyncssh.Error):
                    dst.write(chunk)

        async def kill_on_close() -> None:
            await process.channel.wait_closed()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)

        feeder = asyncio.create_task(pump_in())
        watcher = asyncio.create_task(kill_on_close())
        try:
            await asyncio.gather(
                pump_out(proc.stdout, process.stdout), pump_out(proc.stderr, process.stderr)
            )
            rc = await proc.wait()
        finally:
            feeder.cancel()
            watcher.cancel()  # the command is over: nothing left to kill
            self._procs.discard(proc)
        with contextlib.suppress(OSError, asyncssh.Error):
            process.exit(rc if rc >= 0 else 128 - rc)

    def drop_connections(self) -> None:
        """Cut every client connection (the server keeps listening)."""
        for conn in list(self._conns):
            conn.abort()

    async def close(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()
            await asyncio.wait_for(self._acceptor.wait_closed(), 10)
            self._acceptor = None
        self.drop_connections()
        for proc in list(self._procs):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        if self._handlers:  # let them reap their processes
            await asyncio.wait(list(self._handlers), timeout=10)

    async def __aenter__(self) -> SSHTestServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
