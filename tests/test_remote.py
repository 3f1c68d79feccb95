"""dask_hetzner.remote against a real asyncssh server on 127.0.0.1 (tests/sshserver.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import stat
import sys
from pathlib import Path

import pytest
from sshserver import SSHTestServer
from support import free_port

from dask_hetzner import remote as remote_mod
from dask_hetzner.remote import (
    HostKeyMismatch,
    RemoteCommandError,
    RemoteTimeout,
    SSHTimeout,
    connect,
)
from dask_hetzner.remote import login as remote_login
from dask_hetzner.security import HostKey, SSHKeyPair

# Every wait in these tests is bounded by this (seconds).
BOUND = 30


@pytest.fixture(scope="module")
def client_key() -> SSHKeyPair:
    return SSHKeyPair.generate()


@pytest.fixture(scope="module")
def host_key() -> HostKey:
    return HostKey.generate()


@pytest.fixture
async def server(client_key: SSHKeyPair, host_key: HostKey):
    async with SSHTestServer(host_key, [client_key.public_openssh]) as srv:
        yield srv


def _login(port: int, client_key: SSHKeyPair, host_key: HostKey, host: str = "127.0.0.1", **kw):
    """``connect`` to ``host:port`` with the test keys."""
    return connect(
        host, port=port, client_key=client_key.private_openssh, host_key=host_key.public_openssh, **kw
    )


def _connect(server: SSHTestServer, client_key: SSHKeyPair, host_key: HostKey, **kw):
    kw.setdefault("timeout", 5)
    kw.setdefault("retry_until", 10)
    return asyncio.wait_for(_login(server.port, client_key, host_key, server.host, **kw), BOUND)


@pytest.fixture
async def remote(server, client_key, host_key):
    r = await _connect(server, client_key, host_key)
    try:
        yield r
    finally:
        await r.close()


def _alive(pid: int) -> bool:
    """Is ``pid`` a live (not zombie) process?"""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return data.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.fixture
def attempts(monkeypatch):
    """Counts connection attempts; ``failed`` is set when one fails."""

    class Attempts:
        count = 0
        failed = asyncio.Event()

    original = remote_login._open_connection

    async def counting(*args, **kwargs):
        Attempts.count += 1
        try:
            return await original(*args, **kwargs)
        except BaseException:
            Attempts.failed.set()
            raise

    monkeypatch.setattr(remote_login, "_open_connection", counting)
    return Attempts


# --------------------------------------------------------------------------------------------
# connecting


async def test_connect_with_pinned_key(server, client_key, host_key, remote):
    assert not remote.is_closed()
    result = await remote.run("echo hello; whoami >/dev/null", timeout=BOUND)
    assert result.stdout == "hello\n" and result.exit_status == 0
    assert server.usernames[-1] == "root"


async def test_user_ssh_files_are_ignored(server, client_key, host_key, tmp_path, monkeypatch):
    # A hostile ~/.ssh: a config that would redirect the user and port, a known_hosts that
    # trusts a different key for 127.0.0.1.  None of it may matter.
    ssh = tmp_path / ".ssh"
    ssh.mkdir()
    (ssh / "config").write_text("Host *\n  User nobody\n  Port 1\n  StrictHostKeyChecking yes\n")
    (ssh / "known_hosts").write_text(
        f"[127.0.0.1]:{server.port} {HostKey.generate().public_openssh}\n"
    )
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    r = await _connect(server, client_key, host_key)
    try:
        assert (await r.run("true", timeout=BOUND)).exit_status == 0
    finally:
        await r.close()
    assert server.usernames[-1] == "root"
    assert (ssh / "known_hosts").read_text().count("\n") == 1  # nothing written


async def test_host_key_mismatch_fails_immediately(server, client_key, attempts):
    other = HostKey.generate()
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(HostKeyMismatch, match=rf"127\.0\.0\.1:{server.port}"):
        await _connect(server, client_key, other, retry_until=120)
    assert attempts.count == 1
    assert loop.time() - start < 10


async def test_wrong_client_key_times_out_with_reason(server, host_key):
    stranger = SSHKeyPair.generate()
    with pytest.raises(SSHTimeout, match="PermissionDenied"):
        await _connect(server, stranger, host_key, retry_until=1)


async def test_retry_until_server_appears(client_key, host_key, attempts):
    port = free_port()
    task = asyncio.create_task(_login(port, client_key, host_key, timeout=5, retry_until=BOUND))
    try:
        # The first attempt is refused: nothing listens yet.  Only then start the server.
        await asyncio.wait_for(attempts.failed.wait(), BOUND)
        assert not task.done()
        async with SSHTestServer(host_key, [client_key.public_openssh], port=port):
            r = await asyncio.wait_for(task, BOUND)
            try:
                assert (await r.run("echo up", timeout=BOUND)).stdout == "up\n"
            finally:
                await r.close()
        assert attempts.count >= 2
    finally:
        task.cancel()


async def test_probes_take_the_refusals_and_ssh_is_tried_once(
    client_key, host_key, attempts, monkeypatch
):
    port = free_port()
    refused = asyncio.Event()
    real = remote_login._accepts

    async def watched(*args, **kwargs):
        accepted = await real(*args, **kwargs)
        if not accepted:
            refused.set()
        return accepted

    monkeypatch.setattr(remote_login, "_accepts", watched)
    task = asyncio.create_task(
        _login(port, client_key, host_key, timeout=5, retry_until=BOUND, probe_interval=0.05)
    )
    try:
        # A booting server: bare TCP probes are refused, and no SSH attempt is made.
        await asyncio.wait_for(refused.wait(), BOUND)
        assert attempts.count == 0
        async with SSHTestServer(host_key, [client_key.public_openssh], port=port):
            r = await asyncio.wait_for(task, BOUND)
            await r.close()
        assert attempts.count == 1
    finally:
        task.cancel()


async def test_timeout_error_names_what_was_waited_for(client_key, host_key):
    port = free_port()
    with pytest.raises(SSHTimeout) as info:
        await asyncio.wait_for(_login(port, client_key, host_key, timeout=1, retry_until=1), BOUND)
    message = str(info.value)
    assert f"SSH on 127.0.0.1:{port} not reachable after 1 s" in message
    assert "ConnectionRefusedError" in message


async def test_timeout_when_server_never_speaks(client_key, host_key):
    # Accepts TCP, never sends an SSH banner (a server whose sshd hangs).
    held: list[asyncio.StreamWriter] = []

    async def silent(reader, writer):
        held.append(writer)

    tcp = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    try:
        with pytest.raises(SSHTimeout, match="timed out"):
            await asyncio.wait_for(
                _login(port, client_key, host_key, timeout=0.5, retry_until=1.5), BOUND
            )
    finally:
        for w in held:
            w.close()
        tcp.close()
        await asyncio.wait_for(tcp.wait_closed(), BOUND)


async def test_bad_key_arguments(client_key, host_key):
    with pytest.raises(ValueError, match="client_key"):
        await connect("127.0.0.1", client_key="nope", host_key=host_key.public_openssh)
    with pytest.raises(ValueError, match="host_key"):
        await connect("127.0.0.1", client_key=client_key.private_openssh, host_key="nope")


async def test_dead_server_is_noticed(server, remote):
    server.drop_connections()
    await asyncio.wait_for(remote.wait_closed(), BOUND)
    assert remote.is_closed()


# --------------------------------------------------------------------------------------------
# commands


async def test_run(remote):
    r = await remote.run("echo out; echo err >&2; exit 3", check=False, timeout=BOUND)
    assert (r.exit_status, r.stdout, r.stderr) == (3, "out\n", "err\n")
    assert (await remote.run("cat", input="piped\n", timeout=BOUND)).stdout == "piped\n"
    assert (await remote.run("wc -c", input=b"\x00\xff\xfe", timeout=BOUND)).stdout.strip() == "3"
    assert (await remote.run("printf '\\377'", timeout=BOUND)).stdout == "\ufffd"  # not UTF-8


async def test_run_error_shows_command_status_and_stderr_tail(remote):
    cmd = "for i in $(seq 1 50); do echo line$i >&2; done; exit 7"
    with pytest.raises(RemoteCommandError) as info:
        await remote.run(cmd, timeout=BOUND)
    err = info.value
    assert err.exit_status == 7 and "line50" in err.stderr
    message = str(err)
    assert "for i in" in message and "exit status 7" in message
    assert "line50" in message and "line31" in message and "line30\n" not in message


async def test_run_timeout(remote):
    with pytest.raises(RemoteTimeout, match="did not finish within 0.5 s") as info:
        await remote.run("echo partial >&2; sleep 30", timeout=0.5)
    assert "partial" in str(info.value)
    # the connection is still usable
    assert (await remote.run("echo ok", timeout=BOUND)).stdout == "ok\n"


# --------------------------------------------------------------------------------------------
# files


async def test_put_get(remote, tmp_path):
    target = tmp_path / "new" / "dir" / "secret.pem"
    await remote.put(str(target), b"\x00secret\xff")
    assert target.read_bytes() == b"\x00secret\xff"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    assert await remote.get(str(target)) == b"\x00secret\xff"

    # overwriting a world-readable file: contents replaced, mode tightened
    loose = tmp_path / "loose.txt"
    loose.write_text("old")
    loose.chmod(0o644)
    await remote.put(str(loose), "new text")
    assert loose.read_text() == "new text"
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600

    script = tmp_path / "run.sh"
    await remote.put(str(script), "#!/bin/sh\necho hi\n", mode=0o755)
    assert stat.S_IMODE(script.stat().st_mode) == 0o755
    assert (await remote.run(shlex.quote(str(script)), timeout=BOUND)).stdout == "hi\n"

    leftovers = [p.name for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


async def test_get_missing_file(remote, tmp_path):
    with pytest.raises(remote_mod.RemoteError, match="missing"):
        await remote.get(str(tmp_path / "missing"))


# --------------------------------------------------------------------------------------------
# detached processes


_PINGER = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"started\\n")
for line in s.makefile("rb"):
    s.sendall(b"pong\\n")
"""


async def test_start_detached_survives_disconnect_and_stop_kills_group(
    server, client_key, host_key, tmp_path
):
    connections: asyncio.Queue = asyncio.Queue()

    async def accept(reader, writer):
        await connections.put((reader, writer))

    tcp = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    pidfile = tmp_path / "run" / "pinger.pid"
    childfile = tmp_path / "child.pid"
    log = tmp_path / "logs" / "pinger.log"
    cmd = (
        f"sleep 600 & echo $! > {shlex.quote(str(childfile))}; "
        f"exec {shlex.quote(sys.executable)} -c {shlex.quote(_PINGER)} {port}"
    )
    pid = child = None
    try:
        r1 = await _connect(server, client_key, host_key)
        pid = await r1.start_detached(cmd, log=str(log), pidfile=str(pidfile))
        assert int(pidfile.read_text()) == pid
        assert os.getpgid(pid) == pid and os.getsid(pid) == pid  # its own session and group
        reader, writer = await asyncio.wait_for(connections.get(), BOUND)
        assert await asyncio.wait_for(reader.readline(), BOUND) == b"started\n"
        child = int(childfile.read_text())
        assert os.getpgid(child) == pid

        # the SSH connection goes away (client side and server side)
        await r1.close()
        server.drop_connections()
        writer.write(b"ping\n")
        assert await asyncio.wait_for(reader.readline(), BOUND) == b"pong\n"
        assert _alive(pid) and _alive(child)

        r2 = await _connect(server, client_key, host_key)
        try:
            with pytest.raises(RemoteCommandError, match="already running"):
                await r2.start_detached(cmd, log=str(log), pidfile=str(pidfile))
            assert await r2.stop(str(pidfile), timeout=BOUND) == "terminated"
            assert await asyncio.wait_for(reader.read(), BOUND) == b""  # its socket closed
            assert not _alive(pid) and not _alive(child)
            assert not pidfile.exists()
            assert await r2.stop(str(pidfile), timeout=BOUND) == "not running"
        finally:
            await r2.close()
        assert "starting:" in log.read_text()
        assert server.signals == []  # stopped by command, not by SSH signal
        writer.close()
    finally:
        for p in (pid, child):
            if p is not None and _alive(p):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
        tcp.close()
        await asyncio.wait_for(tcp.wait_closed(), BOUND)


async def test_stop_escalates_to_kill(remote, tmp_path):
    pidfile = tmp_path / "stubborn.pid"
    ready = tmp_path / "ready"
    # Ignores SIGTERM; `ready` appears after the trap is in place.
    cmd = f"trap '' TERM; touch {shlex.quote(str(ready))}; while :; do sleep 1; done"
    pid = None
    try:
        # start, then wait (bounded) for the trap to be set, via a remote command that
        # blocks on the file rather than a sleep here
        pid = await remote.start_detached(cmd, log=str(tmp_path / "s.log"), pidfile=str(pidfile))
        await remote.run(
            f"for i in $(seq 1 100); do [ -e {shlex.quote(str(ready))} ] && exit 0; "
            "sleep 0.1; done; exit 1",
            timeout=BOUND,
        )
        assert await remote.stop(str(pidfile), timeout=0.5) == "killed"
        assert not _alive(pid)
    finally:
        if pid is not None and _alive(pid):
            os.killpg(pid, signal.SIGKILL)


async def test_stop_without_pidfile(remote, tmp_path):
    assert await remote.stop(str(tmp_path / "none.pid")) == "not running"


# --------------------------------------------------------------------------------------------
# tunnels


async def test_forward_local_reaches_echo_server(remote):
    async def echo(reader, writer):
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    tcp = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    try:
        host, local = await remote.forward_local("127.0.0.1", port)
        assert host == "127.0.0.1" and local != port
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, local), BOUND)
        writer.write(b"through the tunnel\n")
        assert await asyncio.wait_for(reader.readline(), BOUND) == b"through the tunnel\n"
        writer.close()
        await remote.close()
        with pytest.raises(OSError):
            await asyncio.wait_for(asyncio.open_connection(host, local), BOUND)
    finally:
        tcp.close()
        await asyncio.wait_for(tcp.wait_closed(), BOUND)


async def test_tunnel_stops_when_the_host_key_changed(client_key, host_key):
    """A server that comes back with another host key is not ours: one line, no retries."""
    from dask_hetzner.remote import Tunnel

    port = free_port()
    async with SSHTestServer(host_key, [client_key.public_openssh], port=port) as first:
        conn = await asyncio.wait_for(_login(port, client_key, host_key, first.host), BOUND)
        tunnel = Tunnel(conn, lambda: _login(port, client_key, host_key, first.host, retry_until=5))
        await tunnel.forward("127.0.0.1", port)
    async with SSHTestServer(HostKey.generate(), [client_key.public_openssh], port=port):
        try:
            await asyncio.wait_for(asyncio.shield(tunnel._task), BOUND)  # it ends by itself
            assert isinstance(tunnel.failure, HostKeyMismatch)
            assert not tunnel.up
        finally:
            await tunnel.close()


async def test_logs_fail_when_a_host_key_changed():
    """``logs`` (manage.node_logs) reports a changed host key as an error, not as a missing log."""
    from dask_hetzner.cloud import ServerInfo
    from dask_hetzner.manage import node_logs

    async def connect(host: str, key: str):
        raise HostKeyMismatch(f"SSH host key of {host}:22 is not the pinned key: refusing to connect")

    server = ServerInfo(1, "c-scheduler", "running", {"dask-hetzner/role": "scheduler"}, "cx23", "fsn1", "127.0.0.9", None, "")
    with pytest.raises(HostKeyMismatch, match="not the pinned key"):
        await node_logs(connect, [server], {"c-scheduler": "ssh-ed25519 AAAA"})
