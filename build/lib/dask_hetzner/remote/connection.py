"""One open SSH connection to a server (made by :func:`dask_hetzner.remote.connect`).

Commands, SFTP transfers (files written atomically, secret from the start), detached
processes (scripts in :mod:`.detached`), local port forwards and interactive sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import secrets
import signal
import stat
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import asyncssh

from .detached import STOP_OUTCOMES, StopOutcome, start_command, stop_command
from .errors import RemoteCommandError, RemoteError, RemoteTimeout, describe, short, tail_text

logger = logging.getLogger(__name__)

# SSH exit-signal names ("TERM") -> numbers, for a shell-like exit status.
_SIGNALS = {s.name[3:]: int(s) for s in signal.Signals if not s.name.startswith("SIG_")}


@dataclass(frozen=True)
class Result:
    """What a command did (:meth:`Remote.run`): output decoded leniently."""

    exit_status: int
    stdout: str
    stderr: str


def _sftp_path(path: str) -> str:
    """SFTP does not expand ``~``; relative paths start in the login (home) directory."""
    if path == "~":
        return "."
    if path.startswith("~/"):
        return path[2:]
    return path


class Remote:
    """An open SSH connection to one server (see :func:`dask_hetzner.remote.connect`)."""

    def __init__(
        self, conn: asyncssh.SSHClientConnection, host: str, port: int, username: str
    ) -> None:
        self._conn = conn
        self.host = host
        self.port = port
        self.username = username
        self._sftp: asyncssh.SFTPClient | None = None
        self._sftp_lock = asyncio.Lock()
        self._listeners: list[asyncssh.SSHListener] = []
        self._session: asyncssh.SSHClientProcess[bytes] | None = None

    def __repr__(self) -> str:
        state = "closed" if self.is_closed() else "open"
        return f"<Remote {self.username}@{self.host}:{self.port} {state}>"

    @property
    def _where(self) -> str:
        return f"{self.host}:{self.port}"

    def is_closed(self) -> bool:
        return self._conn.is_closed()

    # commands ------------------------------------------------------------------------------

    async def run(
        self,
        cmd: str,
        *,
        check: bool = True,
        timeout: float,
        input: str | bytes | None = None,
    ) -> Result:
        """Run a shell command; raise :class:`RemoteCommandError` if it fails and ``check``."""
        if isinstance(input, str):
            input = input.encode()
        try:
            proc = await asyncio.wait_for(
                # bytes in and out (decoded leniently below): input may be binary
                self._conn.run(cmd, check=False, input=input, timeout=timeout, encoding=None),
                timeout + 10,  # backstop for opening the channel on a dead connection
            )
        except asyncssh.TimeoutError as e:
            raise RemoteTimeout(
                f"command {short(cmd)!r} on {self._where} did not finish within {timeout:g} s"
                + tail_text(_as_text(e.stderr) or _as_text(e.stdout))
            ) from e
        except asyncio.TimeoutError as e:
            raise RemoteTimeout(
                f"command {short(cmd)!r} on {self._where}: no answer within {timeout:g} s"
            ) from e
        except (OSError, asyncssh.Error) as e:
            raise RemoteError(
                f"command {short(cmd)!r} on {self._where}: SSH failed: {describe(e)}"
            ) from e
        stdout = _as_text(proc.stdout)
        stderr = _as_text(proc.stderr)
        status = proc.exit_status
        if status is None:  # killed by a signal
            status = proc.returncode if proc.returncode is not None else -1
        if check and status != 0:
            raise RemoteCommandError(self._where, cmd, status, stdout, stderr)
        return Result(status, stdout, stderr)

    # files ---------------------------------------------------------------------------------

    async def _sftp_client(self) -> asyncssh.SFTPClient:
        async with self._sftp_lock:
            if self._sftp is None:
                self._sftp = await self._conn.start_sftp_client()
            return self._sftp

    async def put(
        self,
        path: str,
        data: bytes | str,
        mode: int = 0o600,
        *,
        dir_mode: int = 0o700,
        timeout: float = 120.0,
    ) -> None:
        """Write ``data`` to ``path`` over SFTP, atomically, with ``mode`` from the start.

        The file is created under a temporary name with ``mode`` (and chmod-ed again, since the
        server's umask may have stripped bits) before any byte is written, then renamed over
        ``path``: a secret is never readable by others, not even briefly, and readers never
        see half a file.  Missing parent directories are created with ``dir_mode``.
        """
        payload = data.encode() if isinstance(data, str) else data
        target = _sftp_path(path)
        try:
            await asyncio.wait_for(self._put(target, payload, mode, dir_mode), timeout)
        except asyncio.TimeoutError as e:
            raise RemoteTimeout(f"upload of {path} to {self._where} timed out") from e
        except (OSError, asyncssh.Error) as e:
            raise RemoteError(f"upload of {path} to {self._where} failed: {describe(e)}") from e

    async def _put(self, target: str, payload: bytes, mode: int, dir_mode: int) -> None:
        sftp = await self._sftp_client()
        parent = posixpath.dirname(target)
        if parent:
            await sftp.makedirs(
                parent, attrs=asyncssh.SFTPAttrs(permissions=dir_mode), exist_ok=True
            )
        tmp = f"{target}.tmp-{secrets.token_hex(6)}"
        try:
            async with sftp.open(tmp, "xb", attrs=asyncssh.SFTPAttrs(permissions=mode)) as f:
                await f.setstat(asyncssh.SFTPAttrs(permissions=mode))
                await f.write(payload)
            try:
                await sftp.posix_rename(tmp, target)
            except asyncssh.SFTPOpUnsupported:
                with contextlib.suppress(asyncssh.SFTPNoSuchFile):
                    await sftp.remove(target)
                await sftp.rename(tmp, target)
        except BaseException:
            with contextlib.suppress(Exception):
                await sftp.remove(tmp)
            raise

    async def get(self, path: str, *, timeout: float = 120.0) -> bytes:
        """The contents of ``path`` (over SFTP)."""
        try:
            return await asyncio.wait_for(self._get(_sftp_path(path)), timeout)
        except asyncio.TimeoutError as e:
            raise RemoteTimeout(f"download of {path} from {self._where} timed out") from e
        except (OSError, asyncssh.Error) as e:
            raise RemoteError(
                f"download of {path} from {self._where} failed: {describe(e)}"
            ) from e

    async def _get(self, path: str) -> bytes:
        sftp = await self._sftp_client()
        async with sftp.open(path, "rb") as f:
            return await f.read()

    # detached processes ----------------------------------------------------------------------

    async def start_detached(
        self, cmd: str, *, log: str, pidfile: str, timeout: float = 30.0
    ) -> int:
        """Start ``cmd`` (a shell command) in a new session that outlives this connection.

        Output goes to ``log`` (appended), the process id to ``pidfile``; the process is the
        leader of its own process group, so :meth:`stop` can reach its children too.  Refuses
        to start if ``pidfile`` names a group that is still running.
        """
        result = await self.run(start_command(cmd, log=log, pidfile=pidfile), timeout=timeout)
        try:
            return int(result.stdout.split()[-1])
        except (IndexError, ValueError):
            raise RemoteError(
                f"starting {short(cmd)!r} on {self._where} printed no pid: {result.stdout!r}"
            ) from None

    async def stop(self, pidfile: str, timeout: float = 10.0) -> StopOutcome:
        """Stop the process group recorded in ``pidfile``: SIGTERM, wait ``timeout``, SIGKILL.

        Done by a command on the server (no SSH signal request). Returns what happened.
        """
        result = await self.run(stop_command(pidfile, timeout), timeout=timeout + 30)
        outcome = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        if outcome not in STOP_OUTCOMES:
            raise RemoteError(f"stopping {pidfile} on {self._where}: unexpected {outcome!r}")
        return outcome

    # tunnels -------------------------------------------------------------------------------

    async def forward_local(
        self,
        remote_host: str,
        remote_port: int,
        local_host: str = "127.0.0.1",
        local_port: int = 0,
    ) -> tuple[str, int]:
        """Listen on ``local_host:local_port`` and tunnel each connection to
        ``remote_host:remote_port`` as seen from the server. Returns the bound address.
        """
        try:
            listener = await self._conn.forward_local_port(
                local_host, local_port, remote_host, remote_port
            )
        except (OSError, asyncssh.Error) as e:
            raise RemoteError(
                f"forwarding {local_host}:{local_port} to {remote_host}:{remote_port} "
                f"via {self._where} failed: {describe(e)}"
            ) from e
        self._listeners.append(listener)
        return local_host, listener.get_port()

    # interactive sessions ------------------------------------------------------------------

    async def session(
        self,
        command: str | None,
        *,
        stdin: Any,
        stdout: Any,
        stderr: Any,
        term_type: str | None = None,
        term_size: tuple[int, int] | None = None,
    ) -> int:
        """Run ``command`` (a login shell when None) wired to local files; return its exit status.

        ``stdin``/``stdout``/``stderr`` are local file descriptors, which the session closes
        (pass duplicates); ttys and pipes are read and written asynchronously, /dev/null-like
        devices stand for no input / discarded output. With ``term_type`` the session gets a pty of ``term_size``
        (columns, rows); putting the local terminal in raw mode is the caller's business.
        A command killed by a signal gives 128 + its number, a lost connection 255.
        """
        if term_type and isinstance(stderr, int):
            os.close(stderr)  # a pty has one output stream: stdout
        try:
            proc = await self._conn.create_process(
                command,
                term_type=term_type,
                term_size=term_size,
                encoding=None,
                stdin=_redirectable(stdin),
                stdout=_redirectable(stdout),
                stderr=_redirectable(stderr) if not term_type else asyncssh.STDOUT,
            )
            self._session = proc
            try:
                completed = await proc.wait()
            finally:
                self._session = None
        except (OSError, asyncssh.Error) as e:
            raise RemoteError(f"session on {self._where}: SSH failed: {describe(e)}") from e
        if completed.exit_status is not None:
            return completed.exit_status
        if completed.exit_signal:
            return 128 + _SIGNALS.get(completed.exit_signal[0], 0)
        return 255

    def resize_session(self, columns: int, rows: int) -> None:
        """Tell the running :meth:`session`'s pty the local terminal's new size."""
        proc = self._session
        if proc is not None:
            with contextlib.suppress(OSError, asyncssh.Error):
                proc.change_terminal_size(columns, rows)

    # lifetime ------------------------------------------------------------------------------

    async def close(self, timeout: float = 10.0) -> None:
        """Close tunnels, SFTP and the connection (detached processes keep running)."""
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        if self._sftp is not None:
            self._sftp.exit()
            self._sftp = None
        self._conn.close()
        try:
            await asyncio.wait_for(self._conn.wait_closed(), timeout)
        except asyncio.TimeoutError:
            logger.warning("SSH connection to %s did not close within %g s", self._where, timeout)

    async def wait_closed(self) -> None:
        """Return when the connection is gone (closed here, or the server died)."""
        await self._conn.wait_closed()

    async def __aenter__(self) -> Remote:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _redirectable(fd: Any) -> Any:
    """A file descriptor as asyncssh can use it: /dev/null and its kind cannot be polled."""
    if not isinstance(fd, int):
        return fd
    mode = os.fstat(fd).st_mode
    if stat.S_ISCHR(mode) and not os.isatty(fd):
        os.close(fd)
        return asyncssh.DEVNULL
    return fd


def _as_text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data
