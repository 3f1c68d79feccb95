"""Connecting to a server: log in with the cluster's key, trusting only the pinned host key.

Nothing is read from the user's ``~/.ssh`` (no known_hosts, no config, no agent): the
cluster's trust is exactly what this library created (:mod:`dask_hetzner.security`). A server
still booting refuses connections, so attempts are retried with backoff until a deadline,
optionally after cheap bare TCP probes.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket

import asyncssh

from .connection import Remote
from .errors import HostKeyMismatch, SSHTimeout, describe

logger = logging.getLogger(__name__)


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
    seen: dict[str, str] | None = None,
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

    ``seen["last"]`` is kept up to date with what the last attempt met, for a caller whose
    own bound ends first (its error can then say why).
    """
    seen = {} if seen is None else seen
    options = _options(
        client_key=client_key,
        host_key=host_key,
        username=username,
        timeout=timeout,
        keepalive_interval=keepalive_interval,
        keepalive_count_max=keepalive_count_max,
    )
    deadline = asyncio.get_running_loop().time() + retry_until
    if probe_interval is not None:
        await _wait_port(host, port, probe_interval, deadline, seen)
    conn = await _open_until(host, port, options, host_key, timeout, deadline, retry_until, seen)
    return Remote(conn, host, port, username)


async def _open_until(
    host: str,
    port: int,
    options: asyncssh.SSHClientConnectionOptions,
    host_key: str,
    timeout: float,
    deadline: float,
    retry_until: float,
    seen: dict[str, str],
) -> asyncssh.SSHClientConnection:
    """SSH attempts with backoff until one logs in (at least one, whatever ``deadline``)."""
    where = f"{host}:{port}"
    loop = asyncio.get_running_loop()
    delay = 0.2
    attempts = 0
    last_error: BaseException | None = None
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
            seen["last"] = f"SSH attempt {attempts}: {describe(e)}"
            logger.debug("SSH %s not ready (attempt %d): %r", where, attempts, e)
        else:
            logger.debug("SSH %s connected after %d attempt(s)", where, attempts)
            return conn
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        await asyncio.sleep(min(delay, remaining))  # backoff between attempts
        # A refused attempt costs a packet; a long gap costs up to itself once sshd is up.
        delay = min(delay * 1.6, 1.0)
    raise SSHTimeout(
        f"SSH on {where} not reachable after {retry_until:g} s "
        f"({attempts} attempts; last error: {describe(last_error)})"
    ) from last_error


async def _wait_port(host: str, port: int, interval: float, deadline: float, seen: dict[str, str]) -> None:
    """Until ``host:port`` accepts a TCP connection or ``deadline`` (loop time) passes."""
    loop = asyncio.get_running_loop()
    while (remaining := deadline - loop.time()) > 0:
        # A booting server refuses, or drops (then a fresh SYN beats the kernel's backoff).
        if await _accepts(host, port, min(max(3.0, interval), remaining)):
            return
        seen["last"] = "the port did not accept a TCP connection yet"
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
