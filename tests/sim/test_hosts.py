"""Simulated hosts (dask_hetzner.sim.hosts), driven directly: real SSH, real sandboxes."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from dask_hetzner.sim.hosts import HostManager, HostSpec

pytestmark = pytest.mark.timeout(120)

TIMEOUT = 15.0  # bound for every wait on a condition


# -- helpers ----------------------------------------------------------------


def _free_block() -> int:
    """A random /24 in 127.64.0.0/10 whose .1 nobody listens on (ssh port 22)."""
    for _ in range(100):
        block = random.randrange(64 * 256, 128 * 256)
        address = f"127.{block >> 8}.{block & 255}.1"
        with socket.socket() as probe:
            if probe.connect_ex((address, 22)) != 0:
                return block
    raise RuntimeError("no free loopback block")


class Net:
    """Hands out distinct loopback addresses: public from 127.64/10, private from 127.128/9."""

    def __init__(self) -> None:
        self.block = _free_block()
        self.next = 0

    def pair(self) -> tuple[str, str]:
        self.next += 1
        assert self.next < 255
        a, b = self.block >> 8, self.block & 255
        return f"127.{a}.{b}.{self.next}", f"127.{a + 64}.{b}.{self.next}"


def cloud_config(host_key: asyncssh.SSHKey) -> str:
    private = host_key.export_private_key().decode()
    public = host_key.export_public_key().decode().strip()
    indented = "".join(f"    {line}\n" for line in private.splitlines())
    return (
        f'#cloud-config\nssh_keys:\n  ed25519_private: |\n{indented}  ed25519_public: "{public}"\n'
    )


def known_hosts(address: str, host_key: asyncssh.SSHKey) -> asyncssh.SSHKnownHosts:
    return asyncssh.import_known_hosts(f"{address} {host_key.export_public_key().decode()}")


async def eventually(
    check: Callable[[], Awaitable[Any] | Any], timeout: float = TIMEOUT, what: str = "condition"
) -> Any:
    """Poll check() until it returns something true; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def exists(path: str) -> bool:
    return os.path.exists(path)


def running(pid: int) -> bool:
    """Whether pid exists and is not a zombie (reaped late by the host's init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def names(path: Path) -> list[str]:
    return sorted(os.listdir(path))


Ident = tuple[int, str]


def identity(pid: int) -> Ident | None:
    """(pid, start time): tells a process from a later one that reuses its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return pid, fields[19]  # field 22, starttime


def alive(ident: Ident | None) -> bool:
    """Whether that very process still runs (a zombie does not count)."""
    if ident is None:
        return False
    try:
        with open(f"/proc/{ident[0]}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == ident[1] and fields[0] != "Z"


def pids_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(entry.name))
            except OSError:
                pass
    return found


class Cloud:
    """A HostManager plus what the tests need to boot hosts and log in."""

    def __init__(self, root: Path, **options: Any) -> None:
        self.manager = HostManager(root, **options)
        self.net = Net()
        self.client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.host_keys: dict[int, asyncssh.SSHKey] = {}
        self.specs: dict[int, HostSpec] = {}
        self.inits: list[Ident | None] = []

    async def boot(self, server_id: int, **kwargs: Any) -> HostSpec:
        public, private = self.net.pair()
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        spec = HostSpec(
            server_id=server_id,
            name=f"node-{server_id}",
            public_ip=public,
            private_ips=[private],
            authorized_keys=[self.client_key.export_public_key().decode()],
            user_data=cloud_config(host_key),
        )
        self.host_keys[server_id] = host_key
        self.specs[server_id] = spec
        await self.manager.boot(spec, **kwargs)
        self.track(server_id)
        return spec

    def track(self, server_id: int) -> None:
        """Remember the server's init: when it is gone, so is every process of the server."""
        pid = self.manager.init_pid(server_id)
        if pid is not None:
            self.inits.append(identity(pid))

    def processes(self, server_id: int) -> list[Ident | None]:
        return [identity(pid) for pid in self.manager.processes(server_id)]

    def connect(self, server_id: int, **kwargs: Any) -> Any:
        spec = self.specs[server_id]
        options: dict[str, Any] = {
            "username": "root",
            "client_keys": [self.client_key],
            "known_hosts": known_hosts(spec.public_ip, self.host_keys[server_id]),
        }
        options.update(kwargs)
        return asyncssh.connect(spec.public_ip, 22, **options)

    async def reachable(self, server_id: int) -> bool:
        """Whether the server takes an SSH login and runs a command now."""
        try:
            async with self.connect(server_id) as conn:
                return (await conn.run("true")).exit_status == 0
        except OSError:
            return False

    async def run(
        self, server_id: int, command: str, **kwargs: Any
    ) -> asyncssh.SSHCompletedProcess:
        async with self.connect(server_id) as conn:
            return await conn.run(command, **kwargs)

    def require_sandbox(self) -> None:
        if not self.manager.sandboxed:
            pytest.skip("needs root and util-linux unshare: simulated hosts run unsandboxed here")


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[Cloud]:
    cloud = Cloud(tmp_path / "hosts")
    try:
        yield cloud
    finally:
        await cloud.manager.close()
    # Nothing may outlive close(): no process of any server, no nsenter or
    # unshare, no directory but the (empty) root.
    assert [init for init in cloud.inits if alive(init)] == []
    assert pids_mentioning(str(tmp_path)) == []
    assert list((tmp_path / "hosts").iterdir()) == []
    cpu_root = cloud.manager.cpu.root
    assert cpu_root is None or not cpu_root.exists()


# -- SSH endpoint ------------------------------------------------------------


async def test_host_key_from_user_data_is_pinned(cloud: Cloud) -> None:
    await cloud.boot(1)
    async with cloud.connect(1) as conn:
        assert (await conn.run("true")).exit_status == 0
    other = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        async with cloud.connect(1, known_hosts=known_hosts(cloud.specs[1].public_ip, other)):
            pass


async def test_generated_host_key_is_kept_across_reboots(cloud: Cloud) -> None:
    public, private = cloud.net.pair()
    key = cloud.client_key.export_public_key().decode()
    spec = HostSpec(7, "plain", public, [private], [key], None)
    await cloud.manager.boot(spec)
    cloud.track(7)

    async def server_key() -> bytes:
        async with asyncssh.connect(
            public, 22, username="root", client_keys=[cloud.client_key], known_hosts=None
        ) as conn:
            return conn.get_server_host_key().public_data

    first = await server_key()
    await cloud.manager.power_off(7)
    await cloud.manager.boot(spec)
    cloud.track(7)
    assert await server_key() == first


async def test_only_root_with_an_authorized_key(cloud: Cloud) -> None:
    await cloud.boot(1)
    with pytest.raises(asyncssh.PermissionDenied):
        async with cloud.connect(1, client_keys=[asyncssh.generate_private_key("ssh-ed25519")]):
            pass
    with pytest.raises(asyncssh.PermissionDenied):
        async with cloud.connect(1, username="ubuntu"):
            pass


async def test_exec_status_streams_and_environment(cloud: Cloud) -> None:
    spec = await cloud.boot(1)
    home = str(cloud.manager.directory(1))
    async with cloud.connect(1) as conn:
        result = await conn.run("echo out; echo err >&2; exit 3")
        assert (result.exit_status, result.stdout, result.stderr) == (3, "out\n", "err\n")
        result = await conn.run("tr a-z A-Z", input="hello\n")
        assert result.stdout == "HELLO\n"
        result = await conn.run("kill -KILL $$")
        assert result.exit_signal is not None and result.exit_signal[0] == "KILL"
        # The client's environment is not forwarded but for Ubuntu's AcceptEnv LANG LC_*.
        result = await conn.run("env -0; pwd; hostname", env={"LEAK": "1", "LC_TIME": "C"})
    *pairs, rest = result.stdout.split("\0")
    env = dict(pair.split("=", 1) for pair in pairs)
    # A root's HOME: /root, the server's own directory mounted there.
    if cloud.manager.sandboxed:
        home = "/root"
    assert rest.split() == [home, "node-1"]
    assert "LEAK" not in env and env["LC_TIME"] == "C"
    assert env["HOME"] == home and env["USER"] == "root" and env["LANG"] == "C.UTF-8"
    assert env["HOSTNAME"] == "node-1" and env["UV_PYTHON_DOWNLOADS"] == "never"
    assert env["XDG_CACHE_HOME"] == str(cloud.manager.cache_dir)
    assert env["SSH_CONNECTION"].split()[2:] == [spec.public_ip, "22"]
    path = env["PATH"].split(":")
    assert path[0] == str(cloud.manager.shims_dir)
    assert {"/usr/local/bin", "/usr/bin", "/bin"} <= set(path)
    # Only what sshd and bash set, nothing from the simulator's environment.
    allowed = {"HOME", "USER", "LOGNAME", "SHELL", "PATH", "LANG", "HOSTNAME", "XDG_CACHE_HOME"}
    allowed |= {"UV_PYTHON_DOWNLOADS", "UV_NATIVE_TLS", "SSH_CLIENT", "SSH_CONNECTION"}
    allowed |= {"PWD", "SHLVL", "_", "LC_TIME"}
    assert set(env) <= allowed


async def test_a_shared_cache_under_root_is_not_hidden_by_the_servers_root(tmp_path: Path) -> None:
    """Root's own ~/.cache (the default cache when root runs the simulator) lies under /root,
    where each server's directory is mounted: the cache must stay the shared one, or every
    server fills a cache of its own (downloading every package)."""
    home = Path.home()
    if home != Path("/root"):
        pytest.skip("needs HOME=/root (root runs the simulator)")
    (home / ".cache").mkdir(exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="dask-hetzner-test-cache-", dir=home / ".cache"))
    cloud = Cloud(tmp_path / "hosts", cache_dir=cache)
    try:
        await cloud.boot(1)
        cloud.require_sandbox()
        await cloud.boot(2)
        put = await cloud.run(1, 'echo one > "$XDG_CACHE_HOME/probe"')
        assert put.exit_status == 0, put.stderr
        assert (cache / "probe").read_text() == "one\n"
        got = await cloud.run(2, 'cat "$XDG_CACHE_HOME/probe"')
        assert got.stdout == "one\n", got.stderr
    finally:
        await cloud.manager.close()
        shutil.rmtree(cache, ignore_errors=True)


async def test_python3_is_the_real_interpreter(cloud: Cloud) -> None:
    import sys

    await cloud.boot(1)
    result = await cloud.run(1, "python3 -c 'import sys; print(sys.base_prefix)'")
    assert result.stdout.strip() == sys.base_prefix


async def test_interactive_shell_with_pty(cloud: Cloud) -> None:
    await cloud.boot(1)
    async with cloud.connect(1) as conn:
        process = await conn.create_process(term_type="xterm", term_size=(100, 30), encoding=None)
        process.stdin.write(b"tty; echo term=$TERM; stty size; exit 5\n")
        output = await asyncio.wait_for(process.stdout.read(), TIMEOUT)
        await process.wait()
    assert b"/dev/pts/" in output and b"term=xterm" in output and b"30 100" in output
    assert process.exit_status == 5


async def test_command_with_pty_and_hangup_on_disconnect(cloud: Cloud) -> None:
    await cloud.boot(1)
    async with cloud.connect(1) as conn:
        result = await conn.run("tty; echo $TERM", term_type="vt100")
        assert result.stdout.split() == [result.stdout.split()[0], "vt100"]
        assert result.stdout.startswith("/dev/pts/")
        # Without a pty a dropped client leaves the command running (see the
        # nohup test); with one, sshd's hangup kills it.
        async with cloud.connect(1) as other:
            process = await other.create_process("echo go; exec sleep 1002", term_type="vt100")
            assert (await process.stdout.readline()).strip() == "go"

        async def gone() -> bool:
            return "sleep 1002" not in (await conn.run("ps -eo args")).stdout

        await eventually(gone, what="SIGHUP to kill the pty's command")


# -- SFTP ------------------------------------------------------------------


async def test_sftp_put_keeps_0600_and_resolves_relative_paths(
    cloud: Cloud, tmp_path: Path
) -> None:
    await cloud.boot(1)
    home = cloud.manager.directory(1)
    local = tmp_path / "secret.pem"
    local.write_text("key\n")
    async with cloud.connect(1) as conn, conn.start_sftp_client() as sftp:
        assert await sftp.realpath(".") == "/root"  # root's home: the server's directory
        await sftp.put(str(local), "secret.pem")
        await sftp.chmod("secret.pem", 0o600)
        await sftp.makedirs("tls/ca")
        attrs = asyncssh.SFTPAttrs(permissions=0o600)
        async with sftp.open("tls/ca/key.pem", "w", attrs) as f:
            await f.write("ca\n")
        # /tmp is the server's private one.
        async with sftp.open("/tmp/scratch", "w") as f:
            await f.write("tmp\n")
        assert await sftp.realpath("/tmp/scratch") == "/tmp/scratch"
        result = await conn.run("cat /tmp/scratch")
    assert result.stdout == "tmp\n"
    assert (home / "secret.pem").read_text() == "key\n"
    assert (home / "secret.pem").stat().st_mode & 0o777 == 0o600
    assert (home / "tls/ca/key.pem").stat().st_mode & 0o777 == 0o600
    assert not exists("/tmp/scratch")


@pytest.fixture
def outside() -> Iterator[Path]:
    """A host directory outside the servers' view of /tmp (where tmp_path lives)."""
    path = Path(tempfile.mkdtemp(prefix="dask-hetzner-test-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path)


async def test_sftp_refuses_writes_outside_the_server(cloud: Cloud, outside: Path) -> None:
    await cloud.boot(1)
    (outside / "file").write_text("host\n")
    await cloud.run(1, f"ln -s {outside} escape")
    async with cloud.connect(1) as conn, conn.start_sftp_client() as sftp:
        for path in (f"{outside}/new", "/usr/dask-hetzner-sim-test", "escape/new"):
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                async with sftp.open(path, "w") as f:
                    await f.write("x")
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.mkdir(f"{outside}/dir")
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.remove(f"{outside}/file")
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.chmod(f"{outside}/file", 0o777)
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.rename(f"{outside}/file", "stolen")
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.symlink("/etc/passwd", f"{outside}/link")
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.link(f"{outside}/file", "hardlink")
        # Reading the host is allowed, as on a real server's own filesystem.
        async with sftp.open(f"{outside}/file") as f:
            assert await f.read() == "host\n"
    assert names(outside) == ["file"]
    assert (outside / "file").stat().st_mode & 0o777 == 0o644
    assert not exists("/usr/dask-hetzner-sim-test")


# -- the sandbox --------------------------------------------------------------


async def test_commands_cannot_write_outside_the_server(cloud: Cloud, tmp_path: Path) -> None:
    await cloud.boot(1)
    cloud.require_sandbox()
    outside = tmp_path / "outside"
    outside.mkdir()
    marker = f"dask-hetzner-sim-{os.getpid()}-{random.randrange(10**9)}"
    attempts = {
        "touch /work/x": Path("/work/x"),
        f"touch /usr/local/{marker}": Path("/usr/local") / marker,
        # Under the host's /tmp: hidden behind the server's own /tmp.
        f"touch {outside}/x": outside / "x",
    }
    existed = {path: path.exists() for path in attempts.values()}
    async with cloud.connect(1) as conn:
        for command, path in attempts.items():
            result = await conn.run(command)
            assert result.exit_status != 0, command
            if not str(path).startswith("/tmp/"):
                assert "Read-only file system" in result.stderr, command
            assert path.exists() == existed[path], command
        # Root cannot undo the sandbox either.
        assert (await conn.run("mount -o remount,rw /")).exit_status != 0
        assert (await conn.run(f"umount {cloud.manager.directory(1)}")).exit_status != 0
        assert (await conn.run("echo 1 > /proc/sys/vm/drop_caches")).exit_status != 0
        # Its own directory (/root), /tmp, /var/tmp, /dev/shm and its /etc are writable.
        script = f"touch /root/home.txt /tmp/t /var/tmp/v /dev/shm/s /etc/{marker} && ls /dev"
        result = await conn.run(script)
    assert result.exit_status == 0, result.stderr
    assert "vda" not in result.stdout and "null" in result.stdout
    assert (cloud.manager.directory(1) / "home.txt").exists()
    assert not (Path("/etc") / marker).exists()  # the server's /etc, not this machine's


async def test_tmp_is_private_to_each_server(cloud: Cloud) -> None:
    await cloud.boot(1)
    await cloud.boot(2)
    cloud.require_sandbox()
    name = f"private-{random.randrange(10**9)}"
    assert (await cloud.run(1, f"echo one > /tmp/{name}")).exit_status == 0
    assert (await cloud.run(2, f"test -e /tmp/{name}")).exit_status == 1
    assert not exists(f"/tmp/{name}")
    assert (await cloud.run(1, f"cat /tmp/{name}")).stdout == "one\n"


async def test_only_the_servers_processes_are_visible(cloud: Cloud) -> None:
    await cloud.boot(1)
    cloud.require_sandbox()
    result = await cloud.run(1, "ls /proc | grep -c '^[0-9]'; hostname")
    count, hostname = result.stdout.split()
    assert int(count) < 10 and hostname == "node-1"


async def test_nohup_survives_disconnect_and_power_off_kills_it(cloud: Cloud) -> None:
    await cloud.boot(1)
    cloud.require_sandbox()
    result = await cloud.run(1, "nohup sleep 1000 > /dev/null 2>&1 & echo $!")
    pid = int(result.stdout)
    # A foreground command of a dropped connection keeps running too.
    async with cloud.connect(1) as conn:
        process = await conn.create_process("echo go; exec sleep 1001")
        assert await process.stdout.readline() == "go\n"
    ps = (await cloud.run(1, "ps -eo args")).stdout
    assert "sleep 1000" in ps and "sleep 1001" in ps
    assert (await cloud.run(1, f"kill -0 {pid}")).exit_status == 0
    on_host = cloud.processes(1)
    assert len(on_host) >= 4  # init, its sleep, sleep 1000, sleep 1001

    await cloud.manager.power_off(1)
    assert [p for p in on_host if alive(p)] == []
    with pytest.raises(OSError):
        async with cloud.connect(1):
            pass
    await cloud.manager.power_off(1)  # idempotent


async def test_double_forked_daemon_dies_with_the_server(cloud: Cloud) -> None:
    await cloud.boot(1)
    cloud.require_sandbox()
    daemon = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        open('daemon.pid', 'w').write(str(os.getpid()))\n"
        "        time.sleep(1000)\n"
    )
    await cloud.run(1, "python3 - > /dev/null 2>&1", input=daemon)
    pidfile = cloud.manager.directory(1) / "daemon.pid"
    await eventually(lambda: pidfile.exists() and pidfile.read_text(), what="daemon pid file")
    ns_pid = int(pidfile.read_text())
    assert (await cloud.run(1, f"kill -0 {ns_pid}")).exit_status == 0
    on_host = cloud.processes(1)
    assert len(on_host) >= 3  # init, its sleep, the daemon
    await cloud.manager.power_off(1)
    assert [p for p in on_host if alive(p)] == []


async def test_signal_requests_are_ignored(cloud: Cloud) -> None:
    await cloud.boot(1)
    async with cloud.connect(1) as conn:
        process = await conn.create_process("echo $$; exec sleep 1000")
        pid = int(await process.stdout.readline())
        for signame in ("TERM", "KILL", "INT", "HUP"):
            process.send_signal(signame)
        # The signals went nowhere: the process still runs, a command to the
        # same server is served after them, and an explicit kill stops it.
        assert (await conn.run(f"kill -0 {pid}")).exit_status == 0
        assert not process.is_closing()
        await conn.run(f"kill -TERM {pid}")
        result = await asyncio.wait_for(process.wait(), TIMEOUT)
    assert result.exit_signal is not None and result.exit_signal[0] == "TERM"


async def test_kill_processes_keeps_ssh(cloud: Cloud) -> None:
    await cloud.boot(1)
    cloud.require_sandbox()
    await cloud.run(1, "nohup sleep 1000 > /dev/null 2>&1 &")
    old = cloud.processes(1)
    assert len(old) >= 3
    async with cloud.connect(1) as conn:
        cloud.manager.kill_processes(1)
        assert (await conn.run("ps -eo args")).stdout.count("sleep 1000") == 0
    await eventually(lambda: not any(alive(p) for p in old), what="old processes to go")
    cloud.track(1)
    assert (await cloud.run(1, "echo still here")).stdout == "still here\n"


# -- CPU -------------------------------------------------------------------


def cgroup_of(pid: int, version: str) -> str:
    """The pid's cpu cgroup path (v1: the cpu hierarchy's line; v2: the unified one)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(",") if version == "v1" else hierarchy == "0":
            return path
    raise AssertionError(f"no cpu cgroup for {pid}")


async def test_each_server_has_its_own_cpu_group_below_the_client(cloud: Cloud) -> None:
    await cloud.boot(1)
    await cloud.boot(2)
    cloud.require_sandbox()
    cpu = cloud.manager.cpu
    if not cpu.grouped:
        pytest.skip("no writable cpu cgroup here: servers run in niced sessions")
    assert cpu.root is not None
    weight = cpu.root / ("cpu.shares" if cpu.version == "v1" else "cpu.weight")
    assert weight.read_text().strip() in ("110", "11")  # niceness 10's weight
    groups = {}
    for server_id in (1, 2):
        # A daemon in a session of its own, as `dask worker` is started: still the server's.
        await cloud.run(
            server_id, "setsid nohup sleep 1000 > /dev/null 2>&1 < /dev/null & echo started"
        )
        daemons = await eventually(
            lambda sid=server_id: [
                p
                for p in cloud.manager.processes(sid)
                if Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"sleep\x001000")
            ],
            what="the daemon",
        )
        groups[server_id] = {cgroup_of(p, cpu.version) for p in cloud.manager.processes(server_id)}
        assert groups[server_id] == {cgroup_of(daemons[0], cpu.version)}
    assert groups[1] != groups[2]
    for server_id, paths in groups.items():
        (path,) = paths
        assert path.endswith(f"/{cpu.root.name}/{server_id}")
    assert cgroup_of(os.getpid(), cpu.version) not in groups[1] | groups[2]
    # Nor can a server's root move itself out: the sandbox has the cgroup files read-only.
    escape = await cloud.run(2, f"echo $$ > {cpu.root.parent / 'cgroup.procs'}")
    assert escape.exit_status != 0 and "Read-only" in escape.stderr
    await cloud.manager.destroy(1)
    assert not (cpu.root / "1").exists()


async def test_without_cgroups_sessions_are_niced(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not exists("/proc/self/autogroup"):
        pytest.skip("no autogroups here: niceness alone orders the CPU")
    monkeypatch.setattr("dask_hetzner.sim.cpu.own_cgroup", lambda: None)
    cloud.manager.cpu.close()
    cloud.manager = HostManager(cloud.manager.root_dir)
    assert not cloud.manager.cpu.grouped
    await cloud.boot(1)
    result = await cloud.run(1, "cat /proc/self/autogroup")
    assert result.stdout.split()[-2:] == ["nice", "10"]


# -- network ---------------------------------------------------------------


async def test_local_port_forward_to_a_server_on_the_private_ip(cloud: Cloud) -> None:
    spec = await cloud.boot(1)
    private = spec.private_ips[0]
    port = random.randrange(20000, 60000)
    async with cloud.connect(1) as conn:
        start = f"nohup python3 -m http.server --bind {private} {port} > http.log 2>&1 &"
        assert (await conn.run(start)).exit_status == 0
        forward = await conn.forward_local_port("127.0.0.1", 0, private, port)

        async def get() -> bytes:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", forward.get_port())
            except OSError:
                return b""
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            data = await reader.read()
            writer.close()
            return data

        response = await eventually(get, what="http.server through the forward")
        assert response.startswith(b"HTTP/1.0 200")
        forward.close()
        # Nothing leaves the machine: non-loopback destinations are refused.
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_connection("192.0.2.1", 80)
        await conn.run("pkill -f http.server")


async def test_hosts_reach_each_other_on_private_ips(cloud: Cloud) -> None:
    spec1 = await cloud.boot(1)
    await cloud.boot(2)
    private = spec1.private_ips[0]
    port = random.randrange(20000, 60000)
    server = (
        "import socket\n"
        f"s = socket.create_server(('{private}', {port}))\n"
        "open('ready', 'w').close()\n"
        "c, _ = s.accept()\n"
        "c.sendall(b'hello from node-1')\n"
    )
    async with cloud.connect(1) as conn:
        await conn.run("cat > server.py; nohup python3 server.py > /dev/null 2>&1 &", input=server)
    ready = cloud.manager.directory(1) / "ready"
    await eventually(ready.exists, what="server on the private IP")
    client = (
        f"import socket; s = socket.create_connection(('{private}', {port})); "
        "print(s.recv(100).decode())"
    )
    result = await cloud.run(2, f'python3 -c "{client}"')
    assert result.stdout == "hello from node-1\n", result.stderr
    # Real servers listen for SSH on every interface, private ones included: reached from
    # node-2 (through its sshd), never from the client (docs/simulator.md, "The network").
    async with cloud.connect(2) as jump, asyncssh.connect(
        private, 22, tunnel=jump, username="root", client_keys=[cloud.client_key],
        known_hosts=known_hosts(private, cloud.host_keys[1]),
    ) as conn:  # fmt: skip
        assert (await conn.run("hostname")).stdout == "node-1\n"
    if cloud.manager.networked:
        with pytest.raises(OSError):
            await asyncio.wait_for(asyncio.open_connection(private, 22), 2)


# -- shims -------------------------------------------------------------------


async def test_shims_succeed_and_log(cloud: Cloud) -> None:
    await cloud.boot(1)
    commands = [
        "cloud-init status --wait",
        "apt-get update",
        "apt-get install -y python3-venv",
        "DEBIAN_FRONTEND=noninteractive apt install -y git",
        "systemctl enable --now dask-worker",
        "systemctl is-active dask-worker",
        "sudo -u root -H true",
        "hostnamectl set-hostname other",
        "timedatectl set-timezone UTC",
        "ufw allow 22/tcp",
        "dpkg --print-architecture",
        "useradd -m dask",
        "reboot",
    ]
    result = await cloud.run(1, " && ".join(commands))
    assert result.exit_status == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["status: done", "active"] and lines[-1] in ("amd64", "arm64")
    log = (cloud.manager.directory(1) / ".sim" / "shims.log").read_text()
    assert "apt-get install -y python3-venv" in log and "reboot" in log
    assert (await cloud.run(1, "hostname")).stdout == "node-1\n"
    if cloud.manager.sandboxed:
        # Its /etc and /home are its own: the user exists there, with a home, and nowhere else.
        who = await cloud.run(1, "id -un dask && stat -c %U /home/dask && sudo -u dask id -un")
        assert who.stdout == "dask\ndask\ndask\n", who.stderr
        assert "dask:" not in await asyncio.to_thread(Path("/etc/passwd").read_text)


# -- life cycle and scale ----------------------------------------------------------


async def test_power_off_keeps_the_disk_and_destroy_removes_it(cloud: Cloud) -> None:
    await cloud.boot(1)
    await cloud.run(1, "echo kept > disk.txt; echo gone > /tmp/t")
    await cloud.manager.power_off(1)
    await cloud.manager.boot(cloud.specs[1])
    cloud.track(1)
    result = await cloud.run(1, "cat disk.txt; test -e /tmp/t; echo $?")
    assert result.stdout == "kept\n1\n"
    await cloud.manager.destroy(1)
    await cloud.manager.removed()  # the disk goes in the background
    assert not cloud.manager.directory(1).exists()
    await cloud.manager.destroy(1)  # idempotent
    await cloud.manager.power_off(12345)


async def test_ssh_delay_and_ssh_never(cloud: Cloud) -> None:
    spec = await cloud.boot(1, ssh_delay=2.0)
    await cloud.boot(2, ssh_never=True)
    for server_id in (1, 2):
        with pytest.raises(OSError):
            async with cloud.connect(server_id):
                pass

    await eventually(lambda: cloud.reachable(1), what=f"SSH on {spec.public_ip} after ssh_delay")
    with pytest.raises(OSError):
        async with cloud.connect(2):
            pass


async def test_an_ended_ssh_delay_ends_that_boot_only(cloud: Cloud) -> None:
    """``end_ssh_delay`` (a test's release of a slow boot) holds for the boot it ended: after
    a power cycle, the next boot's delay runs again."""
    spec = await cloud.boot(1, ssh_delay=3600)
    assert cloud.manager.end_ssh_delay(1)

    await eventually(lambda: cloud.reachable(1), what=f"SSH on {spec.public_ip} once its delay was ended")
    assert not cloud.manager.end_ssh_delay(1)  # listening: nothing to end
    await cloud.manager.power_off(1)
    await cloud.manager.boot(spec, ssh_delay=3600)
    with pytest.raises(OSError):
        async with cloud.connect(1):
            pass
    assert cloud.manager.end_ssh_delay(1), "the new boot's delay ended with the old one"
    await eventually(lambda: cloud.reachable(1), what=f"SSH on {spec.public_ip} once the new delay was ended")


async def test_many_hosts_boot_concurrently(cloud: Cloud) -> None:
    count = 24
    started = time.monotonic()
    await asyncio.gather(*(cloud.boot(i) for i in range(1, count + 1)))
    booted = time.monotonic() - started
    results = await asyncio.gather(*(cloud.run(i, "hostname") for i in range(1, count + 1)))
    assert [r.stdout for r in results] == [f"node-{i}\n" for i in range(1, count + 1)]
    assert booted < 30, booted


async def test_unsandboxed_fallback(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def unavailable(self: HostManager) -> bool:
        return False

    monkeypatch.setattr(HostManager, "_probe_sandbox", unavailable)
    await cloud.boot(1)
    assert cloud.manager.sandboxed is False
    assert "UNSANDBOXED" in caplog.text
    result = await cloud.run(
        1, "pwd; hostname -s >/dev/null; nohup sleep 1003 > /dev/null 2>&1 & echo $!"
    )
    home, pid = result.stdout.split()
    assert home == str(cloud.manager.directory(1))
    assert running(int(pid))
    # Best effort without namespaces: a command's process group dies.
    await cloud.manager.power_off(1)
    await eventually(lambda: not running(int(pid)), what="the unsandboxed sleep to die")


# -- OpenSSH's own client ----------------------------------------------------


async def test_openssh_scp_sftp_and_a_roots_session(cloud: Cloud, tmp_path: Path) -> None:
    """OpenSSH 9's scp and sftp see exit status 0; /root, /etc and signals as sshd leaves them."""
    import signal
    import subprocess

    if shutil.which("scp") is None:
        pytest.skip("needs OpenSSH's client (Debian openssh-client)")
    # A simulator started under nohup ignores SIGHUP: its sessions must not.
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        spec = await cloud.boot(1)
        cloud.require_sandbox()
        key = tmp_path / "id"
        key.write_bytes(cloud.client_key.export_private_key())
        key.chmod(0o600)
        options = ["-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                   "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]  # fmt: skip
        local = tmp_path / "f"
        local.write_text("copied\n")

        def openssh(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

        scp = await asyncio.to_thread(openssh, "scp", *options, str(local), f"root@{spec.public_ip}:/root/f")
        assert scp.returncode == 0, scp.stderr
        assert (cloud.manager.directory(1) / "f").read_text() == "copied\n"
        sftp = await asyncio.to_thread(openssh, "ssh", *options, "-s", f"root@{spec.public_ip}", "sftp")
        assert sftp.returncode == 0, sftp.stderr
        check = "cat /etc/hostname; grep SigIgn /proc/self/status; echo $HOME"
        out = await asyncio.to_thread(openssh, "ssh", *options, f"root@{spec.public_ip}", check)
    finally:
        signal.signal(signal.SIGHUP, previous)
    hostname, ignored, home = out.stdout.split("\n")[:3]
    assert hostname == "node-1" and home == "/root"
    mask = int(ignored.split()[1], 16)
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD, signal.SIGINT):
        assert not mask & (1 << (sig - 1)), f"{sig.name} is ignored in a fresh session"
