"""SSH to the cluster's servers: the only production module that imports ``asyncssh``.

Every connection pins the server's host key (made by :mod:`dask_hetzner.security` and handed to
cloud-init), logs in as root with the cluster's own key, and reads nothing from the user's
``~/.ssh`` (no known_hosts, no config, no agent): the cluster's trust is exactly what this
library created.

Long-running processes (dask scheduler/worker) are started detached in their own session and
stopped explicitly by process group through a command, never with an SSH signal request (which
OpenSSH ignores for non-pty sessions and the simulator refuses).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import posixpath
import secrets
import shlex
import signal
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import asyncssh

__all__ = [
    "connect",
    "Remote",
    "Result",
    "RemoteError",
    "SSHConnectError",
    "SSHTimeout",
    "HostKeyMismatch",
    "RemoteCommandError",
    "RemoteTimeout",
    "Tunnel",
]

logger = logging.getLogger(__name__)

# How many trailing lines of stderr an error message shows.
_ERROR_TAIL_LINES = 20


class RemoteError(Exception):
    """Something failed on or talking to a server."""


class SSHConnectError(RemoteError):
    """Could not open an SSH connection."""


class HostKeyMismatch(SSHConnectError):
    """The server presented a host key other than the pinned one: never retried."""


class SSHTimeout(SSHConnectError, TimeoutError):
    """SSH did not become reachable before the deadline."""


class RemoteTimeout(RemoteError, TimeoutError):
    """A remote command or transfer did not finish in time."""


class RemoteCommandError(RemoteError):
    """A command exited with a non-zero status."""

    def __init__(self, host: str, cmd: str, exit_status: int, stdout: str, stderr: str) -> None:
        self.host = host
        self.cmd = cmd
        self.exit_status = exit_status
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"command {_short(cmd)!r} on {host} failed with exit status {exit_status}"
            + _tail_text(stderr or stdout)
        )


StopOutcome = Literal["not running", "terminated", "killed"]

# SSH exit-signal names ("TERM") -> numbers, for a shell-like exit status.
_SIGNALS = {s.name[3:]: int(s) for s in signal.Signals if not s.name.startswith("SIG_")}


@dataclass(frozen=True)
class Result:
    exit_status: int
    stdout: str
    stderr: str


def _short(cmd: str, limit: int = 160) -> str:
    cmd = " ".join(cmd.split())
    return cmd if len(cmd) <= limit else cmd[: limit - 3] + "..."


def _tail_text(text: str, lines: int = _ERROR_TAIL_LINES) -> str:
    tail = text.rstrip().splitlines()[-lines:]
    if not tail:
        return ""
    return "; last lines of output:\n" + "\n".join("    " + line for line in tail)


def _shell_path(path: str) -> str:
    """Quote a path for the remote shell, keeping a leading ``~/`` meaning the home directory."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def _sftp_path(path: str) -> str:
    """SFTP does not expand ``~``; relative paths start in the login (home) directory."""
    if path == "~":
        return "."
    if path.startswith("~/"):
        return path[2:]
    return path


def _bash(script: str) -> str:
    """Run ``script`` with bash whatever root's login shell is."""
    return "bash -c " + shlex.quote(script)


# --------------------------------------------------------------------------------------------
# connecting


async def _open_connection(
    host: str, port: int, options: asyncssh.SSHClientConnectionOptions
) -> asyncssh.SSHClientConnection:
    # A separate function so tests can observe individual attempts.
    return await asyncssh.connect(host, port, options=options)


def _options(
    *,
    client_key: str,
    host_key: str,
    username: str,
    timeout: float,
    keepalive_interval: float,
    keepalive_count_max: int,
) -> asyncssh.SSHClientConnectionOptions:
    try:
        private = asyncssh.import_private_key(client_key)
    except (asyncssh.KeyImportError, ValueError) as e:
        raise ValueError(f"client_key is not an OpenSSH private key: {e}") from None
    try:
        pinned = asyncssh.import_public_key(host_key)
    except (asyncssh.KeyImportError, ValueError) as e:
        raise ValueError(f"host_key is not an OpenSSH public key line: {e}") from None
    return asyncssh.SSHClientConnectionOptions(
        username=username,
        # Trust exactly the pinned key: (trusted host keys, trusted CA keys, revoked keys).
        known_hosts=([pinned], [], []),
        host_key_alias=None,
        # Nothing from the user's environment: no ~/.ssh/config, agent, default keys,
        # X.509 bundles, PKCS#11 tokens, Kerberos or host-based auth.
        config=None,
        agent_path=None,
        agent_forwarding=False,
        x11_forwarding=False,
        client_keys=[private],
        client_host_keysign=False,
        x509_trusted_certs=None,
        x509_trusted_cert_paths=[],
        pkcs11_provider=None,
        gss_host=None,
        gss_kex=False,
        gss_auth=False,
        host_based_auth=False,
        password_auth=False,
        kbdint_auth=False,
        preferred_auth="publickey",
        ignore_encrypted=True,
        connect_timeout=timeout,
        login_timeout=timeout,
        # Keepalives make forwarded tunnels and waits notice a dead server.
        keepalive_interval=keepalive_interval,
        keepalive_count_max=keepalive_count_max,
        errors="replace",  # command output is for humans and logs: never fail on bad UTF-8
    )


async def connect(
    host: str,
    *,
    port: int = 22,
    client_key: str,
    host_key: str,
    timeout: float = 30.0,
    retry_until: float = 300.0,
    username: str = "root",
    keepalive_interval: float = 15.0,
    keepalive_count_max: int = 4,
    probe_interval: float | None = None,
) -> Remote:
    """Connect to ``host:port`` as ``username``, trusting only ``host_key``.

    ``client_key`` is an OpenSSH private key PEM, ``host_key`` an OpenSSH public key line.
    ``timeout`` bounds one attempt (TCP connect, handshake and login); connection refused,
    unreachable, timeouts and failed logins are retried with backoff for ``retry_until``
    seconds from now (a booting server refuses until sshd is up), then :class:`SSHTimeout`.
    A different host key raises :class:`HostKeyMismatch` at once.

    With ``probe_interval``, the port is first tried with bare TCP connects that often: for
    a server still being created, whose SSH comes up at an unknown moment (an SSH attempt
    costs far more, and backs off).
    """
    options = _options(
        client_key=client_key,
        host_key=host_key,
        username=username,
        timeout=timeout,
        keepalive_interval=keepalive_interval,
        keepalive_count_max=keepalive_count_max,
    )
    where = f"{host}:{port}"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_until
    delay = 0.2
    attempts = 0
    last_error: BaseException | None = None
    if probe_interval is not None:
        await _wait_port(host, port, probe_interval, deadline)
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0 and attempts:
            break
        attempts += 1
        attempt_timeout = max(min(timeout, remaining), 0.1)
        try:
            # asyncssh's connect_timeout covers the same span; wait_for is the backstop.
            conn = await asyncio.wait_for(
                _open_connection(host, port, options), attempt_timeout + 5
            )
        except asyncssh.HostKeyNotVerifiable as e:
            pinned = asyncssh.import_public_key(host_key).get_fingerprint()
            raise HostKeyMismatch(
                f"SSH host key of {where} is not the pinned key {pinned}: refusing to "
                f"connect ({e.reason})"
            ) from e
        except (OSError, asyncio.TimeoutError, asyncssh.Error) as e:
            # OSError: refused/unreachable/reset; asyncssh.Error: handshake cut short, login
            # refused while cloud-init is still writing authorized_keys, ...
            last_error = e
            logger.debug("SSH %s not ready (attempt %d): %r", where, attempts, e)
        else:
            logger.debug("SSH %s connected after %d attempt(s)", where, attempts)
            return Remote(conn, host, port, username)
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        await asyncio.sleep(min(delay, remaining))  # backoff between attempts
        # A refused attempt costs a packet; a long gap costs up to itself once sshd is up.
        delay = min(delay * 1.6, 1.0)
    raise SSHTimeout(
        f"SSH on {where} not reachable after {retry_until:g} s "
        f"({attempts} attempts; last error: {_describe(last_error)})"
    ) from last_error


async def _wait_port(host: str, port: int, interval: float, deadline: float) -> None:
    """Until ``host:port`` accepts a TCP connection or ``deadline`` (loop time) passes."""
    loop = asyncio.get_running_loop()
    while (remaining := deadline - loop.time()) > 0:
        # A booting server refuses, or drops (then a fresh SYN beats the kernel's backoff).
        if await _accepts(host, port, min(max(3.0, interval), remaining)):
            return
        await asyncio.sleep(min(interval, max(0.0, deadline - loop.time())))


async def _accepts(host: str, port: int, timeout: float) -> bool:
    """One bare TCP connect. No exception and no stream objects on a refusal: a cluster's
    servers are probed many times a second while they are created, and that garbage would
    make the interpreter's collections stop the event loop more often."""
    loop = asyncio.get_running_loop()
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return True  # a host name: connect_ex would resolve it blocking; SSH attempts will
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        err = sock.connect_ex((host, port))
        if err == errno.EINPROGRESS:
            writable: asyncio.Future[None] = loop.create_future()

            def ready() -> None:
                if not writable.done():
                    writable.set_result(None)

            loop.add_writer(sock, ready)
            try:
                await asyncio.wait_for(writable, timeout)
            except asyncio.TimeoutError:
                return False
            finally:
                loop.remove_writer(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return err == 0


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "none"
    if isinstance(error, asyncio.TimeoutError):
        return "timed out"
    if isinstance(error, asyncssh.Error):
        return f"{type(error).__name__}: {error.reason}"
    return f"{type(error).__name__}: {error}"


# --------------------------------------------------------------------------------------------
# a connection


class Remote:
    """An open SSH connection to one server (see :func:`connect`)."""

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
                f"command {_short(cmd)!r} on {self._where} did not finish within {timeout:g} s"
                + _tail_text(_as_text(e.stderr) or _as_text(e.stdout))
            ) from e
        except asyncio.TimeoutError as e:
            raise RemoteTimeout(
                f"command {_short(cmd)!r} on {self._where}: no answer within {timeout:g} s"
            ) from e
        except (OSError, asyncssh.Error) as e:
            raise RemoteError(
                f"command {_short(cmd)!r} on {self._where}: SSH failed: {_describe(e)}"
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
            raise RemoteError(f"upload of {path} to {self._where} failed: {_describe(e)}") from e

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
                f"download of {path} from {self._where} failed: {_describe(e)}"
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
        script = f"""set -eu
log={_shell_path(log)}
pidfile={_shell_path(pidfile)}
{_ALIVE_FN}
mkdir -p -- "$(dirname -- "$log")" "$(dirname -- "$pidfile")"
if [ -s "$pidfile" ]; then
    old=$(cat -- "$pidfile")
    if alive "$old"; then
        echo "already running as process group $old (pidfile $pidfile)" >&2
        exit 3
    fi
fi
printf '=== %s starting: %s\\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" {shlex.quote(_short(cmd, 500))} >>"$log"
# Not a process-group leader here (no job control), so setsid(1) calls setsid() in place
# instead of forking: $! is the new session's leader, and its pid is the process group id.
setsid nohup bash -c {shlex.quote(cmd)} >>"$log" 2>&1 </dev/null &
pid=$!
printf '%s\\n' "$pid" >"$pidfile.tmp.$$"
mv -f -- "$pidfile.tmp.$$" "$pidfile"
printf '%s\\n' "$pid"
"""
        result = await self.run(_bash(script), timeout=timeout)
        try:
            return int(result.stdout.split()[-1])
        except (IndexError, ValueError):
            raise RemoteError(
                f"starting {_short(cmd)!r} on {self._where} printed no pid: {result.stdout!r}"
            ) from None

    async def stop(self, pidfile: str, timeout: float = 10.0) -> StopOutcome:
        """Stop the process group recorded in ``pidfile``: SIGTERM, wait ``timeout``, SIGKILL.

        Done by a command on the server (no SSH signal request). Returns what happened.
        """
        ticks = max(int(timeout * 10), 1)
        script = f"""set -u
pidfile={_shell_path(pidfile)}
{_ALIVE_FN}
if [ ! -s "$pidfile" ]; then echo "not running"; exit 0; fi
pid=$(cat -- "$pidfile")
case "$pid" in ''|*[!0-9]*) echo "bad pidfile $pidfile: $pid" >&2; exit 2;; esac
if ! alive "$pid"; then rm -f -- "$pidfile"; echo "not running"; exit 0; fi
kill -TERM -- "-$pid" 2>/dev/null || true
i=0
while alive "$pid" && [ "$i" -lt {ticks} ]; do sleep 0.1; i=$((i + 1)); done
result=terminated
if alive "$pid"; then
    result=killed
    kill -KILL -- "-$pid" 2>/dev/null || true
    i=0
    while alive "$pid" && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    if alive "$pid"; then echo "process group $pid survived SIGKILL for 10 s" >&2; exit 3; fi
fi
rm -f -- "$pidfile"
echo "$result"
"""
        result = await self.run(_bash(script), timeout=timeout + 30)
        outcome = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        if outcome not in ("not running", "terminated", "killed"):
            raise RemoteError(f"stopping {pidfile} on {self._where}: unexpected {outcome!r}")
        return outcome  # type: ignore[return-value]

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
                f"via {self._where} failed: {_describe(e)}"
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
            raise RemoteError(f"session on {self._where}: SSH failed: {_describe(e)}") from e
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


# `alive PGID`: is any non-zombie process in process group PGID?  Read from /proc because
# `kill -0 -PGID` also succeeds for zombies nobody has reaped yet.
_ALIVE_FN = r"""alive() {
    local f s
    local -a a
    for f in /proc/[0-9]*/stat; do
        { read -r s <"$f"; } 2>/dev/null || continue
        a=(${s##*\) })
        if [ "${a[2]}" = "$1" ] && [ "${a[0]}" != Z ] && [ "${a[0]}" != X ]; then
            return 0
        fi
    done
    return 1
}"""


class Tunnel:
    """Local port forwards through one server that outlive a dropped SSH connection.

    When the connection is lost, it logs in again (same pinned host key, via ``reconnect``)
    and listens again on the same local ports, so the client's scheduler address and the
    dashboard link stay valid.
    """

    def __init__(self, conn: Remote, reconnect: Callable[[], Awaitable[Remote]]) -> None:
        self.conn = conn
        self._reconnect = reconnect
        self._forwards: list[tuple[str, int, int]] = []  # remote host, remote port, local port
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.reconnects = 0

    @property
    def up(self) -> bool:
        """Whether the forwards work now (False while reconnecting)."""
        return not self._closing and not self.conn.is_closed()

    async def forward(self, remote_host: str, remote_port: int) -> int:
        _, local = await self.conn.forward_local(remote_host, remote_port)
        self._forwards.append((remote_host, remote_port, local))
        if self._task is None:
            self._task = asyncio.create_task(self._supervise())
        return local

    async def _supervise(self) -> None:
        while not self._closing:
            await self.conn.wait_closed()
            if self._closing:
                return
            logger.warning("SSH tunnel to %s lost; reconnecting", self.conn.host)
            delay = 0.5
            while not self._closing:
                conn = None
                try:
                    conn = await self._reconnect()
                    for host, port, local in self._forwards:
                        await conn.forward_local(host, port, local_port=local)
                except (RemoteError, OSError) as e:
                    if conn is not None:
                        await conn.close()
                    logger.warning("SSH tunnel to %s: %s; retrying", self.conn.host, e)
                    await asyncio.sleep(delay)  # backoff between reconnection attempts
                    delay = min(delay * 2, 10.0)
                    continue
                self.conn = conn
                self.reconnects += 1
                logger.info("SSH tunnel to %s restored", conn.host)
                break

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.conn.close()
