"""``HetznerCluster``: a ``SpecCluster`` whose scheduler and workers are Hetzner servers."""

from __future__ import annotations

import asyncio
import atexit
import logging
import re
import secrets
import tempfile
import weakref
from collections.abc import Callable
from typing import Any

from distributed.core import Status
from distributed.deploy.spec import SpecCluster

from . import config, environment
from .cloud import Cloud, ConfigError
from .context import ClusterContext, check_same_zone
from .nodes import SchedulerServer, WorkerServer
from .security import ClusterCA, SSHKeyPair, client_security

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
TIMEOUT_KEYS = ("api-request", "server-create", "ssh", "bootstrap", "process-start", "close")


def check_name(name: str) -> str:
    # Server names are "<name>-worker-<n>": the name must leave room in a 63-character hostname.
    if not NAME_RE.match(name):
        raise ConfigError(
            f"invalid cluster name {name!r}: use 1 to 40 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit (it becomes part of RFC 1123 hostnames)"
        )
    return name


_open_clusters: weakref.WeakSet[HetznerCluster] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    """Delete what is still open when Python exits.

    Registered after distributed's own handler, so it runs first: that one gives each
    cluster only 10 s, which a graceful close of many servers may not fit in.
    """
    for cluster in list(_open_clusters):
        if cluster.status in (Status.closed, Status.closing) or getattr(cluster, "_detached", False):
            continue
        if cluster.asynchronous:
            logger.warning("cluster %s: still open at exit; close it or run dask-hetzner nuke", cluster.name)
            continue
        try:
            cluster.close(timeout=cluster.context.timeouts["close"])
        except Exception as e:
            logger.error("cluster %s: closing at exit failed: %s (run dask-hetzner nuke %s)", cluster.name, e, cluster.name)


class HetznerCluster(SpecCluster):
    """A Dask cluster on Hetzner Cloud servers.

    >>> with HetznerCluster(workers=8) as cluster:          # doctest: +SKIP
    ...     client = cluster.get_client()

    Every argument defaults from ``dask.config`` (``hetzner.*``); the token and the API
    endpoint also from ``HCLOUD_TOKEN`` and ``HCLOUD_ENDPOINT``.

    Parameters
    ----------
    workers, n_workers:
        Number of workers to start with.
    name:
        Cluster name; every resource is labelled with it (``dask-hetzner/cluster``).
    scheduler_server_type, worker_server_type, location, image:
        Checked against the API's catalog before anything is created.
    fallback_locations:
        Locations of the same network zone to try when a type is sold out.
    packages:
        Extra pip requirements for the servers.
    connect:
        ``"tunnel"`` (default: the client reaches the scheduler through SSH) or ``"public"``.
    allowed_cidrs:
        Sources allowed to reach SSH (and the scheduler with ``connect="public"``).
    worker_options, scheduler_options:
        Passed to ``dask worker`` / ``dask scheduler`` (``nthreads``, ``memory_limit``, ...).
    security:
        TLS is always on with keys made for this cluster; ``False`` is refused.
    progress:
        Called as ``progress(node, phase)`` while servers are created.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        n_workers: int | None = None,
        name: str | None = None,
        scheduler_server_type: str | None = None,
        worker_server_type: str | None = None,
        location: str | None = None,
        fallback_locations: list[str] | None = None,
        image: str | None = None,
        packages: list[str] | None = None,
        token: str | None = None,
        api_endpoint: str | None = None,
        connect: str | None = None,
        allowed_cidrs: list[str] | None = None,
        worker_options: dict[str, Any] | None = None,
        scheduler_options: dict[str, Any] | None = None,
        security: Any = None,
        asynchronous: bool = False,
        loop: Any = None,
        progress: Callable[[str, str], None] | None = None,
        **kwargs: Any,
    ) -> None:
        if workers is not None and n_workers is not None and workers != n_workers:
            raise ValueError("give the worker count once: workers= or n_workers=")
        count = workers if workers is not None else n_workers
        if count is None:
            count = config.get("n-workers")
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"workers must be a non-negative integer, got {count!r}")
        if security not in (None, True):
            raise ValueError("TLS cannot be replaced or turned off: every cluster makes its own CA")

        name = check_name(name or config.get("name") or f"dask-{secrets.token_hex(3)}")
        connect = connect or config.get("connect")
        if connect not in ("tunnel", "public"):
            raise ConfigError(f"connect must be 'tunnel' or 'public', got {connect!r}")
        scheduler_port = int(config.get("scheduler-port"))
        if connect == "public" and scheduler_port == 0:
            raise ConfigError("connect='public' needs a fixed hetzner.scheduler-port for the firewall")
        packages = list(packages if packages is not None else config.get("packages") or [])
        versions = environment.local_versions()
        scripts = {
            role: environment.bootstrap_script(
                role,
                environment.requirements(role, versions, packages),
                python=versions["python"],
                uv_version=config.get("uv-version"),
                index_url=config.get("index-url"),
            )
            for role in ("scheduler", "worker")
        }
        self._token = config.token(token)
        if not self._token:
            raise ConfigError(
                "no Hetzner Cloud API token: pass token=, set HCLOUD_TOKEN or hetzner.token"
            )
        cloud = Cloud(
            self._token,
            config.endpoint(api_endpoint),
            threads=int(config.get("api.threads")),
            request_timeout=config.seconds("timeouts.api-request"),
            max_retries=int(config.get("api.max-retries")),
            poll_interval=config.seconds("api.poll-interval"),
        )
        ca = ClusterCA.generate(name)
        client_cert = ca.issue("dask-client")
        # The client's TLS files, 0600 in a private directory removed at close.
        self._tls_dir = tempfile.TemporaryDirectory(prefix=f"dask-hetzner-{name}-")
        self._ctx = ClusterContext(
            name=name,
            cloud=cloud,
            location=location or config.get("location"),
            fallback_locations=list(
                fallback_locations
                if fallback_locations is not None
                else config.get("fallback-locations") or []
            ),
            image=image or config.get("image"),
            scheduler_type=scheduler_server_type or config.get("scheduler-server-type"),
            worker_type=worker_server_type or config.get("worker-server-type"),
            connect=connect,
            allowed_cidrs=list(allowed_cidrs or config.get("allowed-cidrs")),
            network_ip_range=config.get("network-ip-range"),
            ssh_port=int(config.get("ssh-port")),
            scheduler_port=scheduler_port,
            dashboard_port=int(config.get("dashboard-port")),
            timeouts={key: config.seconds(f"timeouts.{key}") for key in TIMEOUT_KEYS},
            versions=versions,
            bootstrap_scripts=scripts,
            ssh_key=SSHKeyPair.generate(comment=f"dask-hetzner-{name}"),
            ca=ca,
            client_cert=client_cert,
            progress=progress,
        )
        self._touched = False
        self._initial_pending = True
        self._teardown_task: asyncio.Future[None] | None = None
        scheduler = {
            "cls": SchedulerServer,
            "options": {"context": self._ctx, **(scheduler_options or config.get("scheduler-options") or {})},
        }
        worker = {
            "cls": WorkerServer,
            "options": {"context": self._ctx, **(worker_options or config.get("worker-options") or {})},
        }
        self._initial = count
        spec = {self._new_worker_name(i): worker for i in range(count)}
        try:
            super().__init__(
                workers=spec,
                scheduler=scheduler,
                worker=worker,
                asynchronous=asynchronous,
                loop=loop,
                security=client_security(ca.cert_pem, client_cert, self._tls_dir.name),
                name=name,
                **kwargs,
            )
        except BaseException:
            # Sync start interrupted (Ctrl-C) or failed: wait for the rollback before raising
            # (SpecCluster may have done it already and stopped its loop).
            if not self.asynchronous and self._touched and self._loop_runner.is_started():
                try:
                    self.sync(self._teardown)
                except Exception as e:
                    logger.error("cluster %s: rollback failed: %s", name, e)
                finally:
                    self._loop_runner.stop()
            raise
        self._i = count
        _open_clusters.add(self)

    # Start and stop -----------------------------------------------------------------------

    def _new_worker_name(self, worker_number: int) -> str:
        return f"worker-{worker_number}"

    @property
    def context(self) -> ClusterContext:
        return self._ctx

    async def _check(self) -> None:
        """Every user choice checked against the API before anything is created."""
        ctx = self._ctx
        await ctx.cloud.check_token()
        await ctx.cloud.check_choices([ctx.scheduler_type, ctx.worker_type], ctx.location, ctx.image)
        check_same_zone(await ctx.cloud.locations(), ctx.location, ctx.fallback_locations)
        existing = await ctx.cloud.cluster_resources(ctx.name)
        if len(existing):
            raise ConfigError(
                f"a cluster named {ctx.name!r} already exists in this project "
                "(reattach with HetznerCluster.from_name or delete it with dask-hetzner nuke)"
            )

    async def _start(self) -> None:
        if self.status != Status.created:
            return await super()._start()
        try:
            await self._check()
            self._touched = True
            await self._ctx.setup()
            # Workers' servers are created and bootstrapped while the scheduler starts.
            self._ctx.prestart("scheduler", "scheduler")
            for worker_name in self.worker_spec:
                self._ctx.prestart(worker_name, "worker")
            await super()._start()
        except BaseException:
            self.status = Status.failed
            await asyncio.shield(self._teardown())
            raise

    async def _teardown(self) -> None:
        """Delete everything of this cluster once, however many callers ask."""
        if not self._touched:
            self._ctx.cloud.close()
            return
        if self._teardown_task is None:
            self._teardown_task = asyncio.ensure_future(self._ctx.teardown())
        try:
            await asyncio.shield(self._teardown_task)
        finally:
            self._ctx.cloud.close()

    async def _close(self) -> None:
        try:
            await super()._close()
        finally:
            await asyncio.shield(self._teardown())
            self._tls_dir.cleanup()

    async def _correct_state_internal(self) -> None:
        to_close = set(self.workers) - set(self.worker_spec)
        if to_close and self.scheduler is not None and self.scheduler.status == Status.running:
            # SpecCluster retires by address with our names, which retires nobody; by name,
            # the scheduler moves their data away before the servers are deleted.
            await self.scheduler_comm.retire_workers(names=sorted(to_close))
        initial, self._initial_pending = self._initial_pending, False
        try:
            await super()._correct_state_internal()
        except Exception as e:
            # The initial workers failing fails the start (and rolls back everything).
            if initial or self.status != Status.running:
                raise
            # A worker that failed to start after the cluster was up: its node deleted its
            # server; drop it from the plan instead of retrying it forever.
            failed = [n for n, w in self.workers.items() if w.status != Status.running]
            for n in failed:
                self.workers.pop(n, None)
                self.worker_spec.pop(n, None)
            logger.error("cluster %s: workers %s failed to start: %s", self.name, failed, e)

    def _update_worker_status(self, op: str, msg: Any) -> None:
        super()._update_worker_status(op, msg)
        if op == "remove" and self.status == Status.running:
            # SpecCluster drops a lost worker after lost-worker-timeout; then start its successor.
            import dask

            delay = dask.utils.parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout"))
            asyncio.get_running_loop().call_later(delay + 0.5, self._replace_lost)

    def _replace_lost(self) -> None:
        if self.status == Status.running and set(self.worker_spec) - set(self.workers):
            self._correct_state()

    # What users look at ---------------------------------------------------------------------

    @property
    def dashboard_link(self) -> str:
        return self._ctx.dashboard_link or ""

    @property
    def hourly_cost(self) -> float:
        """Gross EUR per hour of the servers that exist now, from the API's prices."""
        types = self._ctx.cloud._types or {}
        return sum(
            types[s.server_type].hourly.get(s.location, 0.0)
            for s in self._ctx.servers.values()
            if s.server_type in types
        )

    def __repr__(self) -> str:
        return (
            f"HetznerCluster({self.name!r}, workers={len(self.workers)}, "
            f"location={self._ctx.location!r}, {self.hourly_cost:.4f} EUR/h, status={self.status.name})"
        )
