"""``HetznerCluster``: a ``SpecCluster`` whose scheduler and workers are Hetzner servers."""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections.abc import Callable
from typing import Any

import dask.config
import dask.utils
from distributed.deploy.adaptive import Adaptive as DaskAdaptive

from . import config, cost, display, environment, exits, inputs, manage, reattach
from .attach import AttachedScheduler, Attachment
from .cost import CostLimitError
from .idle import IdleSettings
from .launch import worker_defaults
from .lifecycle import ClusterLifecycle
from .nodes import SchedulerServer, WorkerServer, user_options
from .provision.context import ClusterContext, ClusterKeys
from .provision.tasks import Provisioner
from .settings import (
    MAX_WORKERS,
    SERVERS_PER_NETWORK,
    ClusterSettings,
    check_size,
    worker_count,
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
    max_hourly_cost:
        Refuse to scale (or start) past this many EUR per hour, gross, by the API's prices for
        the cluster's location; ``adapt``'s maximum is capped to fit.
    idle_timeout:
        Delete the whole cluster (never just power it off: Hetzner bills stopped servers) after
        this long without work and without a connected client, even if this process is gone.
        The API token then goes to the scheduler's server: see ``docs/security-idle.md``.
    """

    # Over 60 lines only by its signature: the public keyword arguments, one a line.
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
        max_hourly_cost: float | None = None,
        idle_timeout: str | float | None = None,
        **kwargs: Any,
    ) -> None:
        # Set by from_name only: take over a running cluster with its stored settings.
        attach: Attachment | None = kwargs.pop("_attach", None)
        settings: ClusterSettings | None = kwargs.pop("_settings", None)
        count = worker_count(workers, n_workers)
        if security not in (None, True):
            raise ValueError("TLS cannot be replaced or turned off: every cluster makes its own CA")
        if settings is None:
            settings = ClusterSettings.build(
                name=name, location=location, fallback_locations=fallback_locations, image=image,
                scheduler_server_type=scheduler_server_type, worker_server_type=worker_server_type,
                packages=packages, connect=connect, allowed_cidrs=allowed_cidrs,
                worker_options=worker_options, scheduler_options=scheduler_options,
                max_hourly_cost=max_hourly_cost, idle_timeout=idle_timeout,
            )  # fmt: skip
        self._token = config.token(token) or ""  # a missing one: the Cloud refuses it
        self._ctx = self._context(settings, attach, api_endpoint, progress)
        self._provisioner = Provisioner(self._ctx)
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
        if settings.idle_timeout is not None:
            # A start that takes longer than start_grace has failed anyway.
            idle = IdleSettings(settings.idle_timeout, cloud.endpoint, self._token, settings.start_timeout)
        # A new start id, or the one of the cluster reattached to (LABEL_START).
        start = secrets.token_hex(6) if attach is None else attach.start
        ctx = ClusterContext(
            settings, cloud, keys, versions=environment.local_versions(), start=start, idle=idle, progress=progress
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
        cls, name: str, *, token: str | None = None, api_endpoint: str | None = None, **kwargs: Any
    ) -> HetznerCluster:
        """Reattach to the running cluster ``name``, created by this or another process.

        Its servers are found by label; the scheduler is reached with the pinned host key
        (SSH tunnel reopened); the workers are rebuilt from the servers labelled
        ``dask-hetzner/role=worker``. Then ``scale``, ``adapt``, ``get_client`` and ``close``
        (which deletes everything) work as on the original; ``detach()`` leaves it running.
        Needs the local state written when it was created (``hetzner.state-dir``); the
        cluster's settings come from there, and keyword arguments override them (a new
        ``max_hourly_cost``, ``worker_options`` for new workers, ...).
        """
        settings, attachment, stored_endpoint = reattach.read(name, kwargs)
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
        """Gross EUR per hour of the servers that exist now, from the API's prices."""
        return cost.hourly(self._ctx.servers.values(), self._server_types)

    def _worker_options(self) -> dict[str, Any]:
        """A new worker's options as it will start: the server type's defaults, then the user's."""
        types, wanted = self._server_types, self.settings.worker_server_type
        if types is None or wanted not in types:
            raise ValueError("scaling by cores= or memory= needs the server types: start the cluster first")
        return {**worker_defaults(types[wanted]), **user_options(self.new_spec["options"])}

    def scale(self, n: int = 0, memory: str | None = None, cores: int | None = None) -> Any:
        """Like ``SpecCluster.scale``, refusing (``CostLimitError``) a size above ``max_hourly_cost``."""
        inputs.count(n, "scale: the number of workers")
        inputs.optional_positive(memory, "scale: memory")
        inputs.optional_positive(cores, "scale: cores")
        if memory is not None:
            per_worker = dask.utils.parse_bytes(self._worker_options()["memory_limit"])
            n = max(n, math.ceil(dask.utils.parse_bytes(memory) / per_worker))
        if cores is not None:
            n = max(n, math.ceil(cores / int(self._worker_options()["nthreads"])))
        check_size(n, "scaling")
        cost.check(self.settings, self._server_types, n, "scaling")
        return super().scale(n)

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

    # What users look at ---------------------------------------------------------------------

    def __repr__(self) -> str:
        return display.text(
            self.name, len(self.workers), self.settings.location, self.hourly_cost,
            self.max_hourly_cost, self.status.name,
        )  # fmt: skip

    def _repr_html_(self, cluster_status: str | None = None) -> str:
        """Dask's cluster widget plus the servers, their types and the hourly cost."""
        types = self._server_types
        rows = display.server_rows(self._ctx.servers.values(), self._ctx.watcher.last, types)
        section = display.html_section(self.settings, rows, types, self.hourly_cost)
        return super()._repr_html_(cluster_status=section + (cluster_status or ""))

