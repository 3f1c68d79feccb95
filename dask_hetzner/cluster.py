"""``HetznerCluster``: a ``SpecCluster`` whose scheduler and workers are Hetzner servers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable
from secrets import token_hex
from typing import Any

import dask.config
import dask.utils
from distributed.core import Status
from distributed.deploy.adaptive import Adaptive as DaskAdaptive

from . import address, config, cost, display, exits, inputs, manage, reattach
from . import progress as progress_display
from .attach import AttachedScheduler, Attachment
from .cost import CostLimitError
from .environment import local_versions
from .idle import IdleSettings
from .jobenv import SecretEnv, check_env
from .late import LateWorkers, Replacements
from .launch import worker_defaults
from .lifecycle import ClusterLifecycle
from .nodes import SchedulerServer, SchedulerUnreachable, WorkerServer, user_options
from .payload import Payload
from .provision.context import ClusterContext, ClusterKeys
from .provision.tasks import Provisioner
from .settings import (
    MAX_WORKERS,
    SERVERS_PER_NETWORK,
    ClusterSettings,
    check_server_limit,
    check_size,
    worker_count,
    workers_to_wait_for,
)
from .state import ClusterState, root_dir

__all__ = ["CostLimitError", "HetznerCluster"]

logger = logging.getLogger(__name__)


class HetznerCluster(ClusterLifecycle):
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
    scheduler_server_type, worker_server_type:
        A server type, or a preference list of them (``["cx33", "cpx32"]``, one architecture),
        tried in order in the location, then in each fallback location, when one is sold out;
        a worker's threads and memory limit follow the type it got.
    location, image:
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
        Called as ``progress(node, phase)`` while servers are created. Without it, a sync
        start shows a live table in a terminal or a notebook (``hetzner.progress: false``
        turns that off); every phase is also logged at INFO.
    max_hourly_cost:
        Refuse to scale (or start) past this many EUR per hour, gross, by the API's prices for
        the cluster's location; ``adapt``'s maximum is capped to fit.
    environment:
        ``"sync"`` (default): every package installed here, at its version, on every server;
        ``"minimal"``: only the dask stack; or a requirements file. See
        ``docs/your-code-and-data.md``.
    upload:
        Local files and directories copied to every server, on the processes' import path.
    env, secret_env:
        Environment variables of the dask processes; secret ones travel only in 0600 files.
    object_storage:
        ``True``: the usual S3 credentials (as secrets) and the location's Hetzner Object
        Storage endpoint; or an endpoint URL.
    apt_packages, setup_commands:
        Debian packages and root shell commands for every server, before the environment.
    idle_timeout:
        Delete the whole cluster (never just power it off: Hetzner bills stopped servers) after
        this long without work and without a connected client, even if this process is gone.
        The API token then goes to the scheduler's server: see ``docs/security-idle.md``.
    server_limit:
        The account's server limit, as the Hetzner Cloud Console shows it (the API cannot tell
        it): a start or scale that needs more servers is refused before anything is created.
    allow_fewer_workers:
        When a start meets the account's server limit (``403 resource_limit_exceeded``), go on
        with the workers that fit instead of failing (the scheduler is then created first).
    no_client_timeout:
        Delete the whole cluster after this long without a connected ``Client`` (the cluster
        object alone does not count), enforced on the scheduler's server like ``idle_timeout``.
    max_lifetime:
        Delete the whole cluster this long after its scheduler started, whatever happens;
        enforced on the scheduler's server too.
    wait_for_workers:
        Return once the scheduler and this many workers (an int, or a fraction of the workers
        asked for) are up, whichever are first; the others keep starting (they were
        provisioned from the start) and join in the background. One that fails (or a
        scale-up's) is replaced once, under a new name, with a warning; one that cannot be
        (it replaced one already, the account's server limit, ``max_hourly_cost``) is named
        in an error log and dropped.
    """

    # Over 60 lines only by its signature: the public keyword arguments, one a line.
    def __init__(
        self,
        workers: int | None = None,
        *,
        n_workers: int | None = None,
        name: str | None = None,
        scheduler_server_type: str | list[str] | None = None,
        worker_server_type: str | list[str] | None = None,
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
        max_hourly_cost: float | None = None,
        idle_timeout: str | float | None = None,
        environment: str | None = None,
        upload: list[str] | None = None,
        env: dict[str, str] | None = None,
        secret_env: dict[str, str] | None = None,
        object_storage: bool | str | None = None,
        apt_packages: list[str] | None = None,
        setup_commands: list[str] | None = None,
        server_limit: int | None = None,
        allow_fewer_workers: bool | None = None,
        no_client_timeout: str | float | None = None,
        max_lifetime: str | float | None = None,
        wait_for_workers: int | float | None = None,
        **kwargs: Any,
    ) -> None:
        # Set by from_name only: take over a running cluster with its stored settings.
        attach: Attachment | None = kwargs.pop("_attach", None)
        settings: ClusterSettings | None = kwargs.pop("_settings", None)
        count = worker_count(workers, n_workers)
        # Without a callback, a sync start shows its progress where there is a place for it.
        quiet = progress is not None or asynchronous or attach is not None  # reattaching creates nothing
        display = None if quiet else progress_display.default()
        progress = progress or display
        # The constructor returns once this many are up; the others join in the background.
        self._wait_for = workers_to_wait_for(wait_for_workers, count)
        if security not in (None, True):
            raise ValueError("TLS cannot be replaced or turned off: every cluster makes its own CA")
        if settings is None:
            settings = ClusterSettings.build(
                name=name, location=location, fallback_locations=fallback_locations, image=image,
                scheduler_server_type=scheduler_server_type, worker_server_type=worker_server_type,
                packages=packages, connect=connect, allowed_cidrs=allowed_cidrs,
                worker_options=worker_options, scheduler_options=scheduler_options,
                max_hourly_cost=max_hourly_cost, idle_timeout=idle_timeout,
                environment=environment, upload=upload, env=env, object_storage=object_storage,
                apt_packages=apt_packages, setup_commands=setup_commands,
                server_limit=server_limit, allow_fewer_workers=allow_fewer_workers,
                no_client_timeout=no_client_timeout, max_lifetime=max_lifetime,
            )  # fmt: skip
        secrets = SecretEnv(check_env(secret_env, "secret_env"))
        self._token = config.token(token) or ""  # a missing one: the Cloud refuses it
        self._ctx = self._context(settings, attach, api_endpoint, progress, secrets)
        self._provisioner = Provisioner(self._ctx)
        self._replacements = Replacements()
        self._late = LateWorkers(self._provisioner, self._late_done)
        self._attach = attach
        # Detached: closing only disconnects. True while reattaching, so a failed reattach
        # leaves the cluster as it was; set by detach().
        self._detached = attach is not None
        self._touched = False
        self._initial_pending = True
        self._teardown_task: asyncio.Future[None] | None = None
        shared = {"context": self._ctx, "provisioner": self._provisioner}
        scheduler_cls = SchedulerServer if attach is None else AttachedScheduler
        scheduler = {"cls": scheduler_cls, "options": {**shared, **settings.scheduler_options}}
        worker = {"cls": WorkerServer, "options": {**shared, **settings.worker_options}}
        if not asynchronous:
            # A sync start waits in this (main) thread, where a KeyboardInterrupt rolls back.
            exits.sigterm_cleans_up()
        try:
            # The display ends once the start did (a sync start happens in this call).
            with display or contextlib.nullcontext():
                super().__init__(
                    workers={self._new_worker_name(i): worker for i in range(count)},
                    scheduler=scheduler,
                    worker=worker,
                    asynchronous=asynchronous,
                    loop=loop,
                    security=self._client_security(),
                    name=settings.name,
                    **kwargs,
                )
        except BaseException:
            self._after_failed_sync_start()
            raise
        self._i = max(self._i, count)  # reattached: past the adopted workers' numbers
        exits.register(self)

    def _context(
        self,
        settings: ClusterSettings,
        attach: Attachment | None,
        api_endpoint: str | None,
        progress: Callable[[str, str], None] | None,
        secrets: SecretEnv,
    ) -> ClusterContext:
        """The cluster's keys (made here, or the stored ones when reattaching) and context."""
        cloud = manage.make_cloud(self._token, api_endpoint)
        if attach is None:
            keys = ClusterKeys.generate(settings.name)
            # Keys, pins and metadata: written in _start, once the API said the name is free.
            self._state = ClusterState(root_dir(config.get("state-dir")), settings.name)
        else:
            keys = ClusterKeys.from_secrets(settings.name, attach.secrets)
            self._state = attach.state
        idle = None
        if settings.self_deleting:
            # A start that takes longer than start_grace has failed anyway.
            idle = IdleSettings(
                settings.idle_timeout, cloud.endpoint, self._token, settings.start_timeout,
                no_client_timeout=settings.no_client_timeout, max_lifetime=settings.max_lifetime,
                # Kept servers of a client that is gone: deleted within their paid hour.
                kept_grace=settings.keep_margin / 2 if settings.keep_paid_servers else None,
            )  # fmt: skip
        versions = local_versions()
        # A new start id, or the one of the cluster reattached to (LABEL_START).
        start = token_hex(6) if attach is None else attach.start
        ctx = ClusterContext(
            settings, cloud, keys, versions=versions, start=start, idle=idle, progress=progress,
            payload=Payload(settings, secrets, versions),
        )
        if attach is not None:
            ctx.pins.follow(self._state)
        return ctx

    def _after_failed_sync_start(self) -> None:
        """A sync start interrupted (Ctrl-C) or failed: wait for the rollback before raising
        (SpecCluster may have done it already and stopped its loop)."""
        # A refused keyword fails SpecCluster's constructor before it made its loop runner.
        runner = getattr(self, "_loop_runner", None)
        if runner is None:
            self._ctx.cloud.close()  # its threads: nothing else was made
            return
        if self.asynchronous or not runner.is_started():
            return
        if self._touched:
            try:
                self.sync(self._teardown)
            except Exception as e:
                logger.error("cluster %s: rollback failed: %s", self.name, e)
            finally:
                self._loop_runner.stop()
        elif self._attach is not None:
            try:
                self.sync(self._disconnect)  # a failed reattach only disconnects
            except Exception as e:
                logger.debug("cluster %s: disconnecting after a failed reattach: %r", self.name, e)
            finally:
                self._loop_runner.stop()

    # Public attributes ------------------------------------------------------------------------

    @property
    def context(self) -> ClusterContext:
        return self._ctx

    @property
    def max_hourly_cost(self) -> float | None:
        return self.settings.max_hourly_cost

    @property
    def idle_timeout(self) -> float | None:
        return self.settings.idle_timeout

    @property
    def detached(self) -> bool:
        return self._detached

    @property
    def close_timeout(self) -> float:
        return self.settings.timeouts["close"]

    @property
    def state_dir(self) -> str:
        """The local state directory of this cluster (keys, pinned host keys, metadata)."""
        return str(self._state.path)

    @property
    def dashboard_link(self) -> str:
        return getattr(self.scheduler, "dashboard_link", None) or ""

    @property
    def scheduler_address(self) -> str:
        """``hetzner://HOST:PORT/NAME``: connects as it is from any process of this user here.

        ``Client(cluster.scheduler_address)`` needs no ``security=``: the ``hetzner`` scheme
        (``address.py``) takes the client certificate from the local state. The plain TLS
        address is ``cluster.scheduler_comm.address``.
        """
        tls_address = super().scheduler_address
        if not tls_address.startswith(address.TLS_PREFIX):
            return tls_address  # "<Not Connected>"
        return address.cluster_address(tls_address, self.name)

    def detach(self) -> Any:
        """Disconnect this process and leave the cluster running (and billed).

        Nothing is deleted, now or at exit; the local state stays. Reattach from any process
        with :meth:`from_name`, delete with ``close()`` there, ``dask-hetzner destroy`` or
        ``dask-hetzner nuke``. Returns an awaitable for an asynchronous cluster.
        """
        if not self._touched:
            raise RuntimeError(f"cluster {self.name} was never started: nothing to detach")
        self._detached = True
        self.shutdown_on_close = False  # distributed's atexit handler skips it too
        return self.close()

    # Reattaching ------------------------------------------------------------------------------

    # SpecCluster.from_name is annotated to return a ProcessInterface, not the cluster's class.
    @classmethod
    def from_name(  # type: ignore[override]
        cls,
        name: str,
        *,
        token: str | None = None,
        api_endpoint: str | None = None,
        take_over: bool = True,
        **kwargs: Any,
    ) -> HetznerCluster:
        """Reattach to the running cluster ``name``, created by this or another process.

        Its servers are found by label; the scheduler is reached with the pinned host key
        (SSH tunnel reopened); the workers are rebuilt from the servers labelled
        ``dask-hetzner/role=worker``. Then ``scale``, ``adapt``, ``get_client`` and ``close``
        (which deletes everything) work as on the original; ``detach()`` leaves it running.
        Needs the local state written when it was created (``hetzner.state-dir``); the
        cluster's settings come from there, and keyword arguments override them (a new
        ``max_hourly_cost``, ``worker_options`` for new workers, ...). ``take_over=False``
        gives a view: ``close()`` and exiting only disconnect, as after ``detach()``.
        """
        settings, attachment, stored_endpoint = reattach.read(name, kwargs)
        attachment = dataclasses.replace(attachment, take_over=take_over)
        return cls(
            0,
            token=token,
            api_endpoint=api_endpoint or stored_endpoint,
            _settings=settings,
            _attach=attachment,
            **kwargs,
        )

    # Size and cost ------------------------------------------------------------------------------

    def planned_hourly_cost(self, n_workers: int) -> float | None:
        """Gross EUR/h of a scheduler and ``n_workers`` workers; None before the catalog is read."""
        return cost.planned(self.settings, self._server_types, n_workers)

    @property
    def hourly_cost(self) -> float:
        """Gross EUR per hour of the servers that exist now, their Primary IPv4s included,
        from the API's prices (``GET /server_types``, ``GET /pricing``)."""
        return cost.hourly(self._ctx.servers.values(), self._server_types)

    @property
    def cost(self) -> float:
        """EUR gross billed so far: every started hour of every server this cluster created,
        deleted ones included, each with its Primary IPv4 (a reattached cluster counts the
        servers it created itself)."""
        return self._ctx.factory.bill.total

    @property
    def server_hours(self) -> int:
        """Started server-hours billed so far (see :attr:`cost`)."""
        return self._ctx.factory.bill.server_hours

    def _worker_options(self) -> dict[str, Any]:
        """A new worker's options as it will start: the server type's defaults, then the user's."""
        types = self._server_types
        # The first type of the list: what a new worker gets unless it is sold out.
        wanted = next((t for t in self.settings.worker_server_type if t in (types or {})), None)
        if types is None or wanted is None:
            raise ValueError("scaling by cores= or memory= needs the server types: start the cluster first")
        return {**worker_defaults(types[wanted]), **user_options(self.new_spec["options"])}

    def scale(self, n: int = 0, memory: str | None = None, cores: int | None = None) -> Any:
        """Like ``SpecCluster.scale``, refusing (``CostLimitError``) a size above ``max_hourly_cost``."""
        self._check_reachable()
        inputs.count(n, "scale: the number of workers")
        inputs.optional_positive(memory, "scale: memory")
        inputs.optional_positive(cores, "scale: cores")
        if memory is not None:
            per_worker = dask.utils.parse_bytes(self._worker_options()["memory_limit"])
            n = max(n, math.ceil(dask.utils.parse_bytes(memory) / per_worker))
        if cores is not None:
            n = max(n, math.ceil(cores / int(self._worker_options()["nthreads"])))
        check_size(n, "scaling")
        check_server_limit(self.settings, n, "scaling")
        cost.check(self.settings, self._server_types, n, "scaling", self._kept_hourly(n))
        # Workers still joining count; a scale-down drops them first (nothing runs there yet).
        dropped = self._late.drop(self._late.newest(len(self.worker_spec) + len(self._late) - n))
        if dropped and self.loop is not None:
            self.loop.add_callback(self._late.cancel, dropped)
        return super().scale(n - len(self._late))

    async def scale_down(self, workers: Any) -> None:
        """Adaptive's scale-down: workers still joining are dropped with their provisioning."""
        dropped = self._late.drop(list(workers))
        await self._late.cancel(dropped)
        await super().scale_down([w for w in workers if w not in dropped])

    @property
    def plan(self) -> set[Any]:
        """SpecCluster's, with the workers still joining (adapt counts them as asked for)."""
        return set(super().plan) | set(self._late.specs)

    @property
    def requested(self) -> set[Any]:
        return set(super().requested) | set(self._late.specs)

    def _kept_hourly(self, n: int) -> float:
        """EUR/h of the kept servers a scale to ``n`` workers leaves kept (new workers take
        the ones paid longest first)."""
        current = len(self.worker_spec) + len(self._late)
        kept = sorted(self._ctx.kept.kept.values(), key=lambda k: -k.until)[max(0, n - current) :]
        return sum(cost.server_price(k.server, self._server_types) or 0.0 for k in kept)

    def adapt(
        self,
        Adaptive: type[DaskAdaptive] = DaskAdaptive,  # SpecCluster's signature, names and order
        minimum: float = 0,
        maximum: float = math.inf,
        minimum_cores: int | None = None,
        maximum_cores: int | None = None,
        minimum_memory: str | None = None,
        maximum_memory: str | None = None,
        **kwargs: Any,
    ) -> DaskAdaptive:
        """Like ``SpecCluster.adapt``, with ``maximum`` capped so adaptivity stays under
        ``max_hourly_cost`` and within one private network (``MAX_WORKERS``)."""
        self._check_reachable()
        inputs.bounds(minimum, maximum)
        check_size(math.ceil(minimum), "adapting (minimum)")
        if maximum > MAX_WORKERS:
            logger.info(
                "cluster %s: adaptive maximum %s capped to %d workers (a Hetzner network holds %d servers)",
                self.name, maximum, MAX_WORKERS, SERVERS_PER_NETWORK,
            )  # fmt: skip
            maximum = MAX_WORKERS
        cap = self.max_workers
        if cap is not None and minimum > cap:
            cost.check(self.settings, self._server_types, math.ceil(minimum), "adapting (minimum)")
        if cap is not None and maximum > cap:
            logger.info(
                "cluster %s: adaptive maximum %s capped to %d workers by max_hourly_cost %.4f EUR/h",
                self.name, maximum, cap, self.max_hourly_cost,
            )  # fmt: skip
            maximum = cap
        return super().adapt(
            Adaptive, minimum=minimum, maximum=maximum,
            minimum_cores=minimum_cores, maximum_cores=maximum_cores,
            minimum_memory=minimum_memory, maximum_memory=maximum_memory, **kwargs,
        )  # fmt: skip

    def _check_reachable(self) -> None:
        """Refuse (``SchedulerUnreachable``) what needs the scheduler once it cannot be reached
        (not a close's own ``scale(0)``: a close deletes through the API)."""
        reason = self.unreachable
        if reason is not None and self.status not in (Status.closing, Status.closed):
            raise SchedulerUnreachable(f"cluster {self.name}: {reason}")

    @property
    def unreachable(self) -> str | None:
        """Why this object can no longer reach its scheduler (a changed host key), or None."""
        return self.scheduler.unreachable if isinstance(self.scheduler, SchedulerServer) else None

    # What users look at ---------------------------------------------------------------------

    def __repr__(self) -> str:
        return display.text(
            self.name, len(self.workers), self.settings.location, self.hourly_cost,
            self.max_hourly_cost, "unreachable" if self.unreachable else self.status.name, display.type_mix(self._ctx.servers.values()),
            self.cost, display.kept_summary(self._ctx.servers.values()),
        )  # fmt: skip

    def _repr_html_(self, cluster_status: str | None = None) -> str:
        """Dask's cluster widget plus the servers, their types and the hourly cost."""
        types = self._server_types
        rows = display.server_rows(self._ctx.servers.values(), self._ctx.watcher.last, types)
        section = display.html_section(self.settings, rows, types, self.hourly_cost, (self.cost, self.server_hours))
        return super()._repr_html_(cluster_status=section + (cluster_status or ""))

