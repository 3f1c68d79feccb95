"""The scheduler and workers as ``ProcessInterface`` objects: one Hetzner server each.

A node's life: create its server (with a host key made here and handed over in
cloud-init), log in over SSH with that pinned key as soon as it answers (one lazy poller
for the whole cluster confirms it and brings its private IP), build the environment, copy
its own TLS key and certificate, and start the dask process detached from the SSH session.
``close`` stops the process explicitly and deletes the server, returning once the API has
accepted the delete (the context confirms it in the background).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shlex
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distributed.core import Status
from distributed.deploy.spec import ProcessInterface

from . import early_start, environment, idle, remote
from .cloud import LABEL_CLUSTER, LABEL_ROLE, LABEL_WORKER, CloudError, ServerInfo, ServerTypeInfo
from .security import HostKey, cloud_config

if TYPE_CHECKING:
    from .context import ClusterContext, Reached

logger = logging.getLogger(__name__)

REMOTE_DIR = ".dask-hetzner"  # relative to root's home on the server


class BootstrapError(RuntimeError):
    """Building a server's environment failed; the message quotes the end of its log."""


@dataclass
class Prepared:
    """A server that is running, reachable over SSH and has its environment built."""

    server: ServerInfo
    host_key_public: str
    conn: remote.Remote
    # Phase -> seconds since ``started_at`` (created, running, ssh, bootstrap, process, ready).
    timings: dict[str, float] = field(default_factory=dict)
    started_at: float = 0.0  # time.time() when provisioning began

    def mark(self, phase: str) -> None:
        self.timings[phase] = time.time() - self.started_at


async def provision(ctx: ClusterContext, name: str, role: str, options: dict[str, Any]) -> Prepared:
    """Create one server and make it ready to run ``role``; on any failure delete it.

    A worker's process is started here too (with ``options``), as soon as its environment is
    built and the scheduler's address is known, even before the scheduler answers.
    """
    t0 = time.monotonic()
    started_at = time.time()
    timings: dict[str, float] = {}
    host_key = HostKey.generate()
    labels = {LABEL_CLUSTER: ctx.name, LABEL_ROLE: role}
    if role == "worker":
        labels[LABEL_WORKER] = name
    server_type = ctx.scheduler_type if role == "scheduler" else ctx.worker_type
    reached: Reached | None = None
    announce: asyncio.Future[None] | None = None
    try:
        ctx.report(name, "creating")

        async def created(new: ServerInfo) -> None:
            await ctx.pin_host_key(new, host_key.public_openssh)
            timings["created"] = time.monotonic() - t0
            ctx.report(name, "booting")

        # Deletes its server itself on failure (and retries a create action that failed).
        reached = await ctx.create_reachable_server(
            name=f"{ctx.name}-{name}" if role == "worker" else f"{ctx.name}-scheduler",
            server_type=server_type,
            user_data=cloud_config(host_key),
            labels=labels,
            host_key=host_key.public_openssh,
            on_created=created,
        )
        ctx.servers[reached.server.name] = reached.server
        timings["ssh"] = time.monotonic() - t0
        if role == "scheduler" and ctx.scheduler_port:
            # A fixed port: workers know where to go before the scheduler runs, as soon as the
            # API shows its private IP (while this server's environment is being built).
            ctx.scheduler_reached = reached  # a worker ready for the address hurries it
            announce = asyncio.ensure_future(_announce_scheduler(ctx, reached))
        ctx.report(name, "installing")
        try:
            await bootstrap(ctx, reached.conn, role, reached.server)
        except BootstrapError as e:
            # A mirror or DNS blip on one server; the script is idempotent: once more.
            # The whole message: it quotes the end of the log, the only record of the cause.
            logger.warning("%s: bootstrap failed, trying once more: %s", reached.server.name, e)
            await bootstrap(ctx, reached.conn, role, reached.server)
        timings["bootstrap"] = time.monotonic() - t0
        # Now with its private IP and status: what the cluster's repr shows.
        server = await reached.located()
        ctx.servers[server.name] = server
        if announce is not None:
            await announce
        prepared = Prepared(server, host_key.public_openssh, reached.conn, timings, started_at)
        if role == "worker":
            await launch_worker(ctx, prepared, name, options)
        return prepared
    except BaseException:
        if announce is not None:
            announce.cancel()
            with contextlib.suppress(BaseException):  # its failure is ours, raised below
                await announce
        if reached is not None:
            await _quietly(reached.conn.close())
            await reached.abandon()
            # Shielded: a Ctrl-C while starting must still delete what was created.
            await asyncio.shield(ctx.delete_server(reached.server))
        raise


async def _announce_scheduler(ctx: ClusterContext, reached: Reached) -> None:
    server = await reached.located(hurry=False)
    assert server.private_ip, f"server {server.name} has no private network address"
    ctx.set_scheduler_address(f"tls://{server.private_ip}:{ctx.scheduler_port}")


async def bootstrap(ctx: ClusterContext, conn: remote.Remote, role: str, server: ServerInfo) -> None:
    """Build the environment (idempotent) and refuse versions that differ from the client's."""
    await conn.put(f"{REMOTE_DIR}/bootstrap.sh", ctx.bootstrap_scripts[role], mode=0o700)
    result = await conn.run(
        f"bash {REMOTE_DIR}/bootstrap.sh", check=False, timeout=ctx.timeouts["bootstrap"]
    )
    if result.exit_status != 0:
        log = await conn.run(f"tail -n 25 {REMOTE_DIR}/bootstrap.log", check=False, timeout=30)
        raise BootstrapError(
            f"bootstrap of server {server.name} ({server.public_ip}) failed with exit status "
            f"{result.exit_status}; last lines of ~/{REMOTE_DIR}/bootstrap.log:\n{log.stdout.rstrip()}"
        )
    # The script's standard output is the environment's versions as JSON.
    environment.check_versions(ctx.versions, json.loads(result.stdout), where=server.name)


async def _quietly(aw: Any) -> None:
    try:
        await aw
    except Exception as e:  # cleanup must go on
        logger.debug("ignored during cleanup: %r", e)


async def write_tls(ctx: ClusterContext, conn: remote.Remote, common_name: str, ips: list[str]) -> None:
    """Copy the CA certificate and a key and certificate made for this node alone."""
    cert = ctx.ca.issue(common_name, ips=ips)
    await conn.put(f"{REMOTE_DIR}/tls/ca.pem", ctx.ca.cert_pem, mode=0o600)
    await conn.put(f"{REMOTE_DIR}/tls/node.pem", cert.cert_pem, mode=0o600)
    await conn.put(f"{REMOTE_DIR}/tls/node.key", cert.key_pem, mode=0o600)


TLS_ARGS = (
    f"--tls-ca-file {REMOTE_DIR}/tls/ca.pem --tls-cert {REMOTE_DIR}/tls/node.pem "
    f"--tls-key {REMOTE_DIR}/tls/node.key"
)
# Plain TCP is refused by the processes themselves, not only by the firewall.
PROCESS_ENV = "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION=True"


def worker_defaults(server_type: ServerTypeInfo) -> dict[str, Any]:
    """``dask worker`` options that fit the server: all its cores, most of its memory."""
    return {
        "nthreads": server_type.cores,
        # Leave room for the operating system and the nanny.
        "memory_limit": f"{int(server_type.memory_gb * 0.9 * 1024)}MiB",
    }


async def launch_worker(ctx: ClusterContext, p: Prepared, name: str, options: dict[str, Any]) -> None:
    """Start ``dask worker`` detached on a prepared server, then close its SSH connection.

    It starts as soon as the scheduler's address is known: with a fixed scheduler port that
    is when the scheduler's server runs, so the worker's own start (imports, fork server)
    overlaps the scheduler's, and a nanny preload waits until the scheduler answers.
    """
    ip = p.server.private_ip
    assert ip, f"server {p.server.name} has no private network address"
    await write_tls(ctx, p.conn, f"dask-worker-{name}", [ip])
    preload = await early_start.install(p.conn)
    server_type = (await ctx.cloud.server_types())[ctx.worker_type]
    options = {**worker_defaults(server_type), **options}
    ctx.report(name, "waiting for the scheduler")
    scheduler = await ctx.wait_scheduler_address(f"worker {name}")
    args = [
        f"{REMOTE_DIR}/env/bin/dask",
        "worker",
        shlex.quote(scheduler),
        f"--name {shlex.quote(name)}",
        f"--host {ip}",
        "--no-dashboard",
        f"--local-directory {REMOTE_DIR}/work",
        f"--preload-nanny {preload}",
        TLS_ARGS,
    ]
    for key, value in options.items():
        args.append(f"--{key.replace('_', '-')} {shlex.quote(str(value))}")
    env = f"{PROCESS_ENV} {early_start.PROCESS_ENV} {early_start.WAIT_ENV}={int(ctx.start_timeout)}"
    p.mark("process")
    await p.conn.start_detached(
        f"env {env} " + " ".join(args),
        log=f"{REMOTE_DIR}/worker.log",
        pidfile=f"{REMOTE_DIR}/worker.pid",
    )
    # Workers keep no SSH connection open: 200 idle sessions help nobody.
    await _quietly(p.conn.close())


class HetznerNode(ProcessInterface):
    role = ""

    def __init__(self, *, context: ClusterContext, name: str) -> None:
        super().__init__()
        self.context = context
        self.name = name
        self.prepared: Prepared | None = None
        self._close_task: asyncio.Future[None] | None = None

    @property
    def server(self) -> ServerInfo | None:
        return self.prepared.server if self.prepared else None

    async def _stop_process(self) -> None:
        if self.prepared is not None:
            await _quietly(
                asyncio.wait_for(self.prepared.conn.stop(f"{REMOTE_DIR}/{self.role}.pid", timeout=10), 20)
            )

    async def close(self) -> None:
        if self.status == Status.closed:
            return
        # SpecCluster asks again (a lost worker's timer) while a close runs: wait for that one,
        # instead of a second stop over SSH to a server being deleted.
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close_once())
        await asyncio.shield(self._close_task)

    async def _close_once(self) -> None:
        self.status = Status.closing
        try:
            await self._stop_process()
            if self.prepared is not None:
                await _quietly(self.prepared.conn.close())
                # Not waiting for it to go: the DELETE was accepted, and the context confirms
                # it in the background (or the teardown deletes what is left).
                await self.context.delete_server(self.prepared.server, wait=False)
            else:
                # Closed before start finished: whatever was being provisioned goes too.
                await self.context.cancel_provision(self.name)
        finally:
            await super().close()

    def __repr__(self) -> str:
        where = f" {self.server.name} {self.server.public_ip}" if self.server else ""
        return f"<{type(self).__name__} {self.name}{where}: status={self.status.name}>"


class SchedulerServer(HetznerNode):
    role = "scheduler"

    def __init__(self, *, context: ClusterContext, name: str = "scheduler", **kwargs: Any) -> None:
        super().__init__(context=context, name=name)
        self.options = kwargs
        self.contact_address: str | None = None
        self.dashboard_port: int | None = None
        self.tunnel: remote.Tunnel | None = None

    async def start(self) -> None:
        ctx = self.context
        self.prepared = p = await ctx.take_or_provision(self.name, self.role, {})
        try:
            ip = p.server.private_ip
            assert ip, f"server {p.server.name} has no private network address"
            await write_tls(ctx, p.conn, "dask-scheduler", [ip])
            args = [
                f"{REMOTE_DIR}/env/bin/dask",
                "scheduler",
                "--protocol tls",
                # Public: also reachable on the public address (the firewall limits who may).
                f"--host {'0.0.0.0' if ctx.connect == 'public' else ip}",
                f"--port {ctx.scheduler_port}",
                f"--dashboard-address {ip}:{ctx.dashboard_port}",
                f"--scheduler-file {REMOTE_DIR}/scheduler.json",
                TLS_ARGS,
            ]
            if ctx.idle is not None:
                # Only the scheduler's server gets the token, and only with idle_timeout on.
                preload = await idle.install(p.conn, ctx.idle, cluster=ctx.name, server_id=p.server.id)
                args.append(f"--preload {preload}")
            for key, value in self.options.items():
                args.append(f"--{key.replace('_', '-')} {shlex.quote(str(value))}")
            p.mark("process")
            await p.conn.run(f"rm -f {REMOTE_DIR}/scheduler.json", timeout=30)
            await p.conn.start_detached(
                f"env {PROCESS_ENV} " + " ".join(args),
                log=f"{REMOTE_DIR}/scheduler.log",
                pidfile=f"{REMOTE_DIR}/scheduler.pid",
            )
            info = await wait_for_file(
                p.conn,
                f"{REMOTE_DIR}/scheduler.json",
                timeout=ctx.timeouts["process-start"],
                what=f"dask scheduler on {p.server.name}",
                log=f"{REMOTE_DIR}/scheduler.log",
            )
            p.mark("ready")
            await self._connect(p, info)
            ctx.report(self.name, "running")
        except BaseException:
            await asyncio.shield(self._fail())
            raise
        await super().start()

    async def _connect(self, p: Prepared, info: dict[str, Any]) -> None:
        """Addresses and tunnels to a running scheduler (``info``: its scheduler file).

        Also used when reattaching from another process to a scheduler already running.
        """
        ctx = self.context
        ip = p.server.private_ip
        assert ip, f"server {p.server.name} has no private network address"
        port = int(info["address"].rsplit(":", 1)[1])
        # Workers always reach the scheduler over the private network.
        self.contact_address = f"tls://{ip}:{port}"
        self.dashboard_port = info.get("services", {}).get("dashboard")
        ctx.set_scheduler_address(self.contact_address)
        reconnect = lambda: ctx.ssh(p.server.public_ip or "", p.host_key_public)  # noqa: E731
        if ctx.connect == "tunnel":
            self.tunnel = remote.Tunnel(p.conn, reconnect)
            local = await self.tunnel.forward(ip, port)
            self.address = f"tls://127.0.0.1:{local}"
            if self.dashboard_port:
                dash = await self.tunnel.forward(ip, self.dashboard_port)
                ctx.dashboard_link = f"http://127.0.0.1:{dash}/status"
        else:
            self.address = f"tls://{p.server.public_ip}:{port}"
            if self.dashboard_port:
                # The dashboard is never opened to the internet: it goes through SSH.
                self.tunnel = remote.Tunnel(p.conn, reconnect)
                dash = await self.tunnel.forward(ip, self.dashboard_port)
                ctx.dashboard_link = f"http://127.0.0.1:{dash}/status"
        self.external_address = self.address

    async def _stop_process(self) -> None:
        if self.prepared is not None and self.context.idle is not None:
            # First the watchdog: an orderly close must not race a self-deletion.
            await _quietly(asyncio.wait_for(idle.stop(self.prepared.conn), 20))
        await super()._stop_process()

    async def _fail(self) -> None:
        if self.prepared is not None:
            await _quietly(self.prepared.conn.close())
            await self.context.delete_server(self.prepared.server, wait=False)

    async def close(self) -> None:
        if self.tunnel is not None:
            await _quietly(self.tunnel.close())
        await super().close()


class WorkerServer(HetznerNode):
    role = "worker"

    def __init__(self, scheduler: str, *, context: ClusterContext, name: str, **kwargs: Any) -> None:
        # ``scheduler`` (SpecCluster's address for it, the tunnel's) is not where a worker
        # goes: it gets the scheduler's private address from the context.
        super().__init__(context=context, name=name)
        self.options = kwargs

    async def start(self) -> None:
        # Its process was started with its server (see launch_worker).
        self.prepared = await self.context.take_or_provision(self.name, self.role, self.options)
        self.context.report(self.name, "running")
        await super().start()

    async def _stop_process(self) -> None:
        p = self.prepared
        if p is None or self.context.closing:
            return  # closing the cluster: its server is deleted, no need to log in first
        # The worker's connection was closed after start: a short one to stop it explicitly.
        try:
            conn = await self.context.ssh(p.server.public_ip or "", p.host_key_public, retry_for=10)
        except Exception as e:
            logger.debug("worker %s unreachable for a clean stop: %r", self.name, e)
            return
        try:
            await asyncio.wait_for(conn.stop(f"{REMOTE_DIR}/worker.pid", timeout=10), 20)
        except Exception as e:
            logger.debug("stopping worker %s: %r", self.name, e)
        finally:
            await _quietly(conn.close())


async def wait_for_file(conn: remote.Remote, path: str, *, timeout: float, what: str, log: str) -> dict[str, Any]:
    """Wait on the server itself (one SSH command, bounded) for a JSON file to appear."""
    q = shlex.quote(path)
    script = (
        f"end=$(( $(date +%s) + {int(timeout)} )); "
        f"until [ -s {q} ] && python3 -c 'import json,sys; json.load(open(sys.argv[1]))' {q} 2>/dev/null; do "
        f"  [ $(date +%s) -ge $end ] && exit 124; sleep 0.2; done; cat {q}"
    )
    result = await conn.run(script, check=False, timeout=timeout + 30)
    if result.exit_status != 0:
        tail = await conn.run(f"tail -n 25 {shlex.quote(log)}", check=False, timeout=30)
        raise TimeoutError(
            f"{what} did not start within {timeout:.0f} s; last lines of ~/{log}:\n{tail.stdout.rstrip()}"
        )
    return json.loads(result.stdout)


__all__ = ["BootstrapError", "CloudError", "SchedulerServer", "WorkerServer", "provision"]
