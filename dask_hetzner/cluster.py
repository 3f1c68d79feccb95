"""``HetznerCluster``: a ``SpecCluster`` whose scheduler and workers are Hetzner servers."""

from __future__ import annotations

import asyncio
import atexit
import datetime
import html
import logging
import math
import re
import secrets
import signal
import threading
import weakref
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import dask.utils
from distributed.core import Status
from distributed.deploy.cluster import Cluster
from distributed.deploy.spec import SpecCluster
from distributed.objects import SchedulerInfo
from distributed.utils import Log, Logs

from . import __version__, config, environment, idle, manage
from .attach import AttachedScheduler, AttachedWorker, AttachError, Attachment
from .cloud import LABEL_WORKER, ConfigError, ServerTypeInfo
from .context import MAX_WORKERS, SERVERS_PER_NETWORK, ClusterContext, check_same_zone
from .manage import NAME_RE, check_name  # noqa: F401  (NAME_RE re-exported)
from .nodes import SchedulerServer, WorkerServer, _quietly, worker_defaults
from .security import ClusterCA, SSHKeyPair, TLSCert
from .state import ClusterState, Secrets, root_dir

logger = logging.getLogger(__name__)

TIMEOUT_KEYS = ("api-request", "server-create", "ssh", "bootstrap", "process-start", "close")


def _check_size(n: int, what: str) -> None:
    if n > MAX_WORKERS:
        raise ConfigError(
            f"{what} with {n} workers: a cluster's servers share one private network, and a "
            f"Hetzner network holds at most {SERVERS_PER_NETWORK} servers, so at most "
            f"{MAX_WORKERS} workers besides the scheduler (choose larger server types for more cores)"
        )


class CostLimitError(ConfigError):
    """A size whose hourly price is above ``max_hourly_cost``; raised before anything is created."""


def _price(types: dict[str, ServerTypeInfo], server_type: str, locations: list[str]) -> float:
    """Gross EUR/h of one server: the dearest of the locations it may land in (fallbacks too)."""
    info = types.get(server_type)
    if info is None:
        return 0.0
    return max((info.hourly[loc] for loc in locations if loc in info.hourly), default=0.0)


def _positive(value: Any, what: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {value!r}") from None
    if not number > 0:
        raise ConfigError(f"{what} must be positive, got {value!r}")
    return number


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


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _sigterm_cleans_up() -> None:
    """Make SIGTERM (docker stop, systemd, a batch scheduler) clean up like Ctrl-C does.

    Python's default SIGTERM ends the process at once, without atexit handlers: every paid
    server would be left behind. Only the default is replaced, never someone else's handler.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    with suppress(ValueError, OSError):
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)


def _user_options(spec: dict[str, Any]) -> dict[str, Any]:
    """A node spec's options as the user gave them (without the shared context)."""
    return {k: v for k, v in spec.get("options", {}).items() if k != "context"}


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
    max_hourly_cost:
        Refuse to scale (or start) past this many EUR per hour, gross, by the API's prices for
        the cluster's location; ``adapt``'s maximum is capped to fit.
    idle_timeout:
        Delete the whole cluster (never just power it off: Hetzner bills stopped servers) after
        this long without work and without a connected client, even if this process is gone.
        The API token then goes to the scheduler's server: see ``docs/security-idle.md``.
    """

    # Set when the scheduler's status stream ends while this object lives.
    _scheduler_gone = False
    _resubscribing: asyncio.Future[Any] | None = None

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
        # Set by from_name only: take over a running cluster instead of creating one.
        attach: Attachment | None = kwargs.pop("_attach", None)
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
        cloud = manage.make_cloud(self._token, api_endpoint)
        if attach is None:
            ca = ClusterCA.generate(name)
            client_cert = ca.issue("dask-client")
            ssh_key = SSHKeyPair.generate(comment=f"dask-hetzner-{name}")
            # Keys, pins and metadata: written in _start, once the API said the name is free.
            self._state = ClusterState(root_dir(config.get("state-dir")), name)
        else:
            keys = attach.secrets
            ca = ClusterCA.from_pem(keys.ca_cert, keys.ca_key)
            client_cert = TLSCert(keys.client_cert, keys.client_key)
            ssh_key = SSHKeyPair.from_private_openssh(keys.ssh_private, f"dask-hetzner-{name}")
            self._state = attach.state
        self._attach = attach
        # Detached: closing only disconnects. True while reattaching, so a failed reattach
        # leaves the cluster as it was; set by detach().
        self._detached = attach is not None
        self._packages = packages
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
            ssh_key=ssh_key,
            ca=ca,
            client_cert=client_cert,
            progress=progress,
        )
        self.max_hourly_cost = _positive(
            max_hourly_cost if max_hourly_cost is not None else config.get("max-hourly-cost"),
            "max_hourly_cost",
        )
        timeout = idle_timeout if idle_timeout is not None else config.get("idle-timeout")
        self.idle_timeout: float | None = None
        if timeout is not None:
            try:
                parsed = dask.utils.parse_timedelta(timeout, default="seconds")
            except (TypeError, ValueError, KeyError):
                raise ConfigError(f"idle_timeout must be a duration, got {timeout!r}") from None
            self.idle_timeout = _positive(parsed, "idle_timeout")
        if self.idle_timeout is not None:
            self._ctx.idle = idle.IdleSettings(
                timeout=self.idle_timeout,
                endpoint=cloud.endpoint,
                token=self._token,
                # A start that takes longer than these bounds has failed anyway.
                start_grace=self._ctx.start_timeout,
            )
        self._touched = False
        self._initial_pending = True
        self._teardown_task: asyncio.Future[None] | None = None
        if attach is not None:
            self._ctx.state = self._state
        scheduler = {
            "cls": SchedulerServer if attach is None else AttachedScheduler,
            "options": {"context": self._ctx, **(scheduler_options or config.get("scheduler-options") or {})},
        }
        worker = {
            "cls": WorkerServer,
            "options": {"context": self._ctx, **(worker_options or config.get("worker-options") or {})},
        }
        self._initial = count
        spec = {self._new_worker_name(i): worker for i in range(count)}
        if not asynchronous:
            # A sync start waits in this (main) thread, where a KeyboardInterrupt rolls back.
            _sigterm_cleans_up()
        try:
            super().__init__(
                workers=spec,
                scheduler=scheduler,
                worker=worker,
                asynchronous=asynchronous,
                loop=loop,
                security=self._client_security(),
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
            elif not self.asynchronous and attach is not None and self._loop_runner.is_started():
                # A failed reattach only disconnects: the cluster stays as it was.
                try:
                    self.sync(self._disconnect)
                except Exception as e:
                    logger.debug("cluster %s: disconnecting after a failed reattach: %r", name, e)
                finally:
                    self._loop_runner.stop()
            raise
        self._i = max(self._i, count)  # reattached: past the adopted workers' numbers
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
        _check_size(len(self.worker_spec), "starting the cluster")
        self._check_cost(len(self.worker_spec), "starting the cluster")
        adaptive, cap = getattr(self, "_adaptive", None), self.max_workers
        if adaptive is not None and cap is not None and adaptive.maximum > cap:
            # adapt() called before the prices were read: cap it now, before it scales.
            adaptive.maximum = cap
        existing = await ctx.cloud.cluster_resources(ctx.name)
        if len(existing):
            raise ConfigError(
                f"a cluster named {ctx.name!r} already exists in this project "
                "(reattach with HetznerCluster.from_name or delete it with dask-hetzner nuke)"
            )

    async def _start(self) -> None:
        if self.status != Status.created:
            return await super()._start()
        if self._attach is not None:
            return await self._start_attached()
        try:
            await self._check()
            self._touched = True
            await self._write_state()
            await self._ctx.setup()
            # Workers' servers are created and bootstrapped while the scheduler starts.
            self._ctx.prestart("scheduler", "scheduler", {})
            for worker_name, spec in self.worker_spec.items():
                self._ctx.prestart(worker_name, "worker", _user_options(spec))
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
            self._teardown_task = asyncio.ensure_future(self._delete_everything())
        try:
            await asyncio.shield(self._teardown_task)
        finally:
            self._ctx.cloud.close()

    async def _delete_everything(self) -> None:
        await self._ctx.teardown()
        # Only once the API confirmed: until then the state is what finds and reaches it.
        self._ctx.state = None
        await asyncio.to_thread(self._state.remove)

    async def _close(self) -> None:
        if self._detached:
            return await self._disconnect()
        if not hasattr(self, "_lock"):
            # SpecCluster never started (a failed check or setup, already rolled back by
            # _start): its _close would fail; only this process's side is left to close.
            return await self._disconnect()
        # Nodes then delete without waiting one by one: teardown waits for all at once.
        self._ctx.closing = True
        if self._resubscribing is not None and not self._resubscribing.done():
            self._resubscribing.cancel()  # the scheduler stream is being closed anyway
        if self.status == Status.running and not self._scheduler_gone and self.scheduler_comm:
            # A scheduler that is gone (its server vanished) must not hold the close for a
            # connect timeout per call: ask once, briefly; not at all while its tunnel is down
            # (every server is deleted next: a graceful goodbye is not worth the wait).
            tunnel = getattr(self.scheduler, "tunnel", None)
            try:
                if self._ctx.connect == "tunnel" and tunnel is not None and not tunnel.up:
                    raise ConnectionError("its SSH tunnel is down")
                await asyncio.wait_for(self.scheduler_comm.identity(), 10)
            except Exception as e:
                logger.warning("cluster %s: the scheduler does not answer (%r); deleting", self.name, e)
                self._scheduler_gone = True
                self.scheduler_comm.timeout = 1
        try:
            await super()._close()
        finally:
            await asyncio.shield(self._teardown())

    async def _disconnect(self) -> None:
        """Close this process's side (tunnel, SSH, API client) and leave every server running."""
        if self.status == Status.closed:
            return
        self.status = Status.closing  # the scheduler's stream ending now is expected
        with suppress(AttributeError):
            self._adaptive.stop()
        # Servers still being created for this process are not part of the cluster yet.
        await self._ctx.cancel_all()
        self._ctx.watcher.stop()
        scheduler = self.scheduler
        if isinstance(scheduler, SchedulerServer):
            if scheduler.tunnel is not None:
                await _quietly(scheduler.tunnel.close())
            if scheduler.prepared is not None:
                await _quietly(scheduler.prepared.conn.close())
        await Cluster._close(self)  # comms and callbacks; not SpecCluster's, which deletes
        exit_stack = getattr(self, "_SpecCluster__exit_stack", None)
        if exit_stack is not None:
            exit_stack.__exit__(None, None, None)
        self._ctx.cloud.close()

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

    @property
    def state_dir(self) -> str:
        """The local state directory of this cluster (keys, pinned host keys, metadata)."""
        return str(self._state.path)

    def _client_security(self) -> Any:
        from distributed import Security

        st = self._state
        # Paths into the state directory, not PEM contents: distributed would otherwise write a
        # temporary copy for every TLS context. The files exist before the first connection
        # (written by _start, or already there when reattaching).
        return Security(
            require_encryption=True,
            tls_ca_file=str(st.ca_cert),
            tls_client_cert=str(st.client_cert),
            tls_client_key=str(st.client_key),
        )

    def _metadata(self) -> dict[str, Any]:
        """What another process needs to reattach; never the token."""
        ctx = self._ctx
        return {
            "name": ctx.name,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "endpoint": ctx.cloud.endpoint,
            "location": ctx.location,
            "fallback_locations": ctx.fallback_locations,
            "image": ctx.image,
            "scheduler_type": ctx.scheduler_type,
            "worker_type": ctx.worker_type,
            "connect": ctx.connect,
            "allowed_cidrs": ctx.allowed_cidrs,
            "network_ip_range": ctx.network_ip_range,
            "ssh_port": ctx.ssh_port,
            "scheduler_port": ctx.scheduler_port,
            "dashboard_port": ctx.dashboard_port,
            "packages": self._packages,
            "worker_options": _user_options(self.new_spec),
            "scheduler_options": _user_options(self.scheduler_spec),
            "max_hourly_cost": self.max_hourly_cost,
            "idle_timeout": self.idle_timeout,
            "versions": ctx.versions,
            "dask_hetzner_version": __version__,
        }

    async def _write_state(self) -> None:
        ctx = self._ctx
        keys = Secrets(
            ca_cert=ctx.ca.cert_pem,
            ca_key=ctx.ca.key_pem,
            client_cert=ctx.client_cert.cert_pem,
            client_key=ctx.client_cert.key_pem,
            ssh_private=ctx.ssh_key.private_openssh,
            ssh_public=ctx.ssh_key.public_openssh,
        )
        await asyncio.to_thread(self._state.create, self._metadata(), keys)
        ctx.state = self._state

    # Reattaching ------------------------------------------------------------------------------

    @classmethod
    def from_name(
        cls,
        name: str,
        *,
        token: str | None = None,
        api_endpoint: str | None = None,
        asynchronous: bool = False,
        loop: Any = None,
        progress: Callable[[str, str], None] | None = None,
        **kwargs: Any,
    ) -> HetznerCluster:
        """Reattach to the running cluster ``name``, created by this or another process.

        Its servers are found by label; the scheduler is reached with the pinned host key
        (SSH tunnel reopened); the workers are rebuilt from the servers labelled
        ``dask-hetzner/role=worker``. Then ``scale``, ``adapt``, ``get_client`` and ``close``
        (which deletes everything) work as on the original; ``detach()`` leaves it running.
        Needs the local state written when it was created (``hetzner.state-dir``); the
        cluster's choices come from there, and keyword arguments override them (a new
        ``max_hourly_cost``, ``worker_options`` for new workers, ...).
        """
        import dask.config

        check_name(name)
        state = ClusterState(root_dir(config.get("state-dir")), name)
        # A few small files: read here even when called on a running event loop.
        metadata = state.metadata()
        keys = state.secrets()
        if api_endpoint is None and not manage.default_endpoint_configured():
            api_endpoint = metadata.get("endpoint")  # where it was created
        local = environment.local_versions()
        for package in ("dask", "distributed"):
            theirs = metadata.get("versions", {}).get(package)
            if theirs and theirs != local.get(package):
                logger.warning(
                    "cluster %s runs %s %s, this process has %s: new workers will not match",
                    name,
                    package,
                    theirs,
                    local.get(package),
                )
        ports = {
            "hetzner.ssh-port": metadata["ssh_port"],
            "hetzner.scheduler-port": metadata["scheduler_port"],
            "hetzner.dashboard-port": metadata["dashboard_port"],
            "hetzner.network-ip-range": metadata["network_ip_range"],
        }
        stored: dict[str, Any] = {
            "scheduler_server_type": metadata["scheduler_type"],
            "worker_server_type": metadata["worker_type"],
            "location": metadata["location"],
            "fallback_locations": metadata.get("fallback_locations") or [],
            "image": metadata["image"],
            "packages": metadata.get("packages") or [],
            "connect": metadata["connect"],
            "allowed_cidrs": metadata.get("allowed_cidrs"),
            "worker_options": metadata.get("worker_options") or {},
            "scheduler_options": metadata.get("scheduler_options") or {},
            "max_hourly_cost": metadata.get("max_hourly_cost"),
            "idle_timeout": metadata.get("idle_timeout"),
        }
        # What the caller passes wins (a new max_hourly_cost, worker_options for new workers).
        stored.update(kwargs)
        with dask.config.set(ports):
            return cls(
                0,
                name=name,
                token=token,
                api_endpoint=api_endpoint,
                asynchronous=asynchronous,
                loop=loop,
                progress=progress,
                _attach=Attachment(state, metadata, keys),
                **stored,
            )

    async def _start_attached(self) -> None:
        """The servers the API lists become this cluster's scheduler and workers."""
        ctx = self._ctx
        try:
            found = await ctx.cloud.cluster_resources(ctx.name)
            if not len(found):
                raise manage.UnknownCluster(
                    f"no cluster named {ctx.name!r} in this project (nothing carries its label; "
                    f"remove its stale local state with dask-hetzner nuke {ctx.name})"
                )
            schedulers = [s for s in found.servers if s.role == "scheduler"]
            if not schedulers:
                raise AttachError(
                    f"cluster {ctx.name!r} has no scheduler server: delete it with "
                    f"dask-hetzner nuke {ctx.name}"
                )
            await ctx.cloud.server_types()  # prices for hourly_cost and max_hourly_cost
            pins = await asyncio.to_thread(self._state.host_keys)
            keys = {n: key for n, (sid, key) in pins.items() if any(s.id == sid for s in found.servers)}
            await ctx.adopt(found)
            ctx.host_keys.update(keys)
            (scheduler_server,) = schedulers[:1]
            if scheduler_server.name not in keys:
                raise AttachError(
                    f"no pinned host key for {scheduler_server.name} in {self._state.path}: "
                    "refusing to trust its server"
                )
            numbers = [-1]
            for server in found.servers:
                worker_name = server.labels.get(LABEL_WORKER)
                if server.role != "worker" or not worker_name:
                    continue
                options = {k: v for k, v in self.new_spec["options"].items()}
                options.update(server=server, host_key=keys.get(server.name, ""))
                self.worker_spec[worker_name] = {"cls": AttachedWorker, "options": options}
                match = re.fullmatch(r"worker-(\d+)", worker_name)
                if match:
                    numbers.append(int(match[1]))
            self._i = max(numbers) + 1
            self._initial = len(self.worker_spec)
            # Created here, not by SpecCluster._start, so its errors reach the caller unwrapped.
            scheduler = AttachedScheduler(
                server=scheduler_server,
                host_key=keys[scheduler_server.name],
                **self.scheduler_spec["options"],
            )
            self.scheduler = await scheduler
            await super()._start()
        except BaseException:
            await asyncio.shield(self._disconnect())
            raise
        # Ours now: closing deletes it, as on the original.
        self._detached = False
        self._touched = True

    # Logs ---------------------------------------------------------------------------------------

    async def _get_logs(
        self, cluster: bool = True, scheduler: bool = True, workers: Any = True
    ) -> Logs:
        """The cluster manager's log, and each server's dask and bootstrap logs (over SSH).

        Keys: ``Cluster``, ``scheduler``, ``scheduler bootstrap``, ``worker-N``,
        ``worker-N bootstrap``. ``workers``: True, False, or worker names or addresses.
        """
        logs = Logs()
        if cluster:
            logs["Cluster"] = Log("\n".join(line[1] for line in self._cluster_manager_logs))
        servers = list(self._ctx.servers.values())
        targets = [s for s in servers if scheduler and s.role == "scheduler"]
        if workers:
            wanted = None if workers is True else self._worker_names(workers)
            targets += [
                s
                for s in servers
                if s.role == "worker" and (wanted is None or s.labels.get(LABEL_WORKER) in wanted)
            ]

        def connect(host: str, host_key: str) -> Any:
            return self._ctx.ssh(host, host_key, retry_for=15)

        fetched = await manage.node_logs(connect, targets, dict(self._ctx.host_keys))
        for key, text in fetched.items():
            logs[key] = Log(text)
        return logs

    def _worker_names(self, workers: Any) -> set[str]:
        known = self.scheduler_info.get("workers", {})
        return {str(known[w]["name"]) if w in known else str(w) for w in workers}

    async def _correct_state_internal(self) -> None:
        to_close = set(self.workers) - set(self.worker_spec)
        # Closing deletes every server: moving data among them first would be wasted time.
        unreachable = self._scheduler_gone or self._ctx.closing
        if (
            to_close
            and not unreachable
            and self.scheduler is not None
            and self.scheduler.status == Status.running
        ):
            # SpecCluster retires by address with our names, which retires nobody; by name,
            # the scheduler moves their data away before the servers are deleted.
            try:
                await self.scheduler_comm.retire_workers(names=sorted(to_close))
            except OSError as e:
                logger.warning(
                    "cluster %s: the scheduler is unreachable (%r): deleting workers %s without "
                    "moving their data",
                    self.name,
                    e,
                    sorted(to_close),
                )
                unreachable = True
        if to_close and unreachable:
            # No scheduler to retire them with (idle shutdown, or it died): just delete them.
            await asyncio.gather(*(self.workers[w].close() for w in to_close if w in self.workers))
            for w in to_close:
                self.workers.pop(w, None)
        initial, self._initial_pending = self._initial_pending, False
        try:
            await super()._correct_state_internal()
            if initial and self._ctx.idle is not None:
                await self._idle_started()
        except Exception as e:
            # The initial workers failing fails the start (and rolls back everything).
            if initial or self.status != Status.running:
                raise
            # A worker that failed to start after the cluster was up: its node deleted its
            # server; drop it from the plan instead of retrying it forever.
            failed = [n for n, w in self.workers.items() if w.status != Status.running]
            for n in failed:
                w = self.workers.pop(n, None)
                if w is not None and w.status == Status.created:
                    w.status = Status.failed  # SpecCluster's close checks every node it made
                self.worker_spec.pop(n, None)
            logger.error("cluster %s: workers %s failed to start: %s", self.name, failed, e)

    def _update_worker_status(self, op: str, msg: Any) -> None:
        super()._update_worker_status(op, msg)
        if op == "remove" and self.status == Status.running:
            # SpecCluster drops a lost worker after lost-worker-timeout; then start its successor.
            import dask

            delay = dask.utils.parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout"))
            asyncio.get_running_loop().call_later(delay + 0.5, self._replace_lost)

    async def _idle_started(self) -> None:
        """Tell the scheduler's idle watch that the start is over: idleness counts from now."""
        try:
            await asyncio.wait_for(self.scheduler_comm.dask_hetzner_idle(action="started"), 30)
        except Exception as e:
            # Not fatal: the start grace ends by itself, only later.
            logger.warning("cluster %s: telling the idle watch the start is over failed: %r", self.name, e)

    # Cost -------------------------------------------------------------------------------------

    def _prices(self) -> tuple[float, float] | None:
        """Gross EUR/h of the scheduler's server and of one worker's; None before the catalog is read."""
        types = self._ctx.cloud._types
        if types is None:
            return None
        locations = [self._ctx.location, *self._ctx.fallback_locations]
        return (
            _price(types, self._ctx.scheduler_type, locations),
            _price(types, self._ctx.worker_type, locations),
        )

    def planned_hourly_cost(self, n_workers: int) -> float | None:
        """Gross EUR/h of a scheduler and ``n_workers`` workers; None before the catalog is read."""
        prices = self._prices()
        return None if prices is None else prices[0] + n_workers * prices[1]

    @property
    def max_workers(self) -> int | None:
        """The most workers ``max_hourly_cost`` allows (None: no limit, or prices not read yet)."""
        prices = self._prices()
        if self.max_hourly_cost is None or prices is None:
            return None
        scheduler, worker = prices
        if worker <= 0:
            return None
        # The epsilon keeps 0.3/0.1 from flooring to 2.
        return max(0, math.floor((self.max_hourly_cost - scheduler) / worker + 1e-9))

    def _check_cost(self, n: int, what: str) -> None:
        limit, prices = self.max_hourly_cost, self._prices()
        if limit is None or prices is None:
            return
        cost = prices[0] + n * prices[1]
        if cost <= limit + 1e-9:
            return
        where = ", ".join([self._ctx.location, *self._ctx.fallback_locations])
        fit = self.max_workers
        raise CostLimitError(
            f"{what} with {n} workers would cost {cost:.4f} EUR/h gross (scheduler "
            f"{self._ctx.scheduler_type} {prices[0]:.4f} + {n} x {self._ctx.worker_type} "
            f"{prices[1]:.4f} EUR/h in {where}), above max_hourly_cost {limit:.4f} EUR/h"
            + (f"; at most {fit} workers fit" if prices[0] <= limit else "; not even the scheduler fits")
        )

    def _worker_options(self) -> dict[str, Any]:
        """A new worker's options as it will start: the server type's defaults, then the user's."""
        types = self._ctx.cloud._types
        if types is None or self._ctx.worker_type not in types:
            raise ValueError("scaling by cores= or memory= needs the server types: start the cluster first")
        return {**worker_defaults(types[self._ctx.worker_type]), **self.new_spec["options"]}

    def _threads_per_worker(self) -> int:
        return int(self._worker_options()["nthreads"])

    def _memory_per_worker(self) -> int:
        return int(dask.utils.parse_bytes(self._worker_options()["memory_limit"]))

    def scale(self, n: int = 0, memory: str | None = None, cores: int | None = None) -> Any:
        """Like ``SpecCluster.scale``, refusing (``CostLimitError``) a size above ``max_hourly_cost``."""
        if memory is not None:
            n = max(n, math.ceil(dask.utils.parse_bytes(memory) / self._memory_per_worker()))
        if cores is not None:
            n = max(n, math.ceil(cores / self._threads_per_worker()))
        _check_size(n, "scaling")
        self._check_cost(n, "scaling")
        return super().scale(n)

    def adapt(self, *args: Any, minimum: float = 0, maximum: float = math.inf, **kwargs: Any) -> Any:
        """Like ``SpecCluster.adapt``, with ``maximum`` capped so adaptivity stays under
        ``max_hourly_cost`` and within one private network (``MAX_WORKERS``)."""
        _check_size(math.ceil(minimum), "adapting (minimum)")
        if maximum > MAX_WORKERS:
            logger.info(
                "cluster %s: adaptive maximum %s capped to %d workers (a Hetzner network holds %d servers)",
                self.name,
                maximum,
                MAX_WORKERS,
                SERVERS_PER_NETWORK,
            )
            maximum = MAX_WORKERS
        cap = self.max_workers
        if cap is not None:
            if minimum > cap:
                self._check_cost(math.ceil(minimum), "adapting (minimum)")
            if maximum > cap:
                logger.info(
                    "cluster %s: adaptive maximum %s capped to %d workers by max_hourly_cost %.4f EUR/h",
                    self.name,
                    maximum,
                    cap,
                    self.max_hourly_cost,
                )
                maximum = cap
        return super().adapt(*args, minimum=minimum, maximum=maximum, **kwargs)

    async def _watch_worker_status(self, comm: Any) -> None:
        while True:
            await super()._watch_worker_status(comm)
            if self.status != Status.running:
                return  # closing: the stream was closed on purpose
            # The stream ended while running: the scheduler stopped (idle shutdown, a crash),
            # or only the SSH tunnel dropped and reconnected. Ask before concluding; a close
            # meanwhile cancels the question (Cluster._close waits for this task).
            self._resubscribing = probe = asyncio.ensure_future(self._resubscribe())
            await asyncio.wait({probe})
            if probe.cancelled():
                return
            try:
                comm, info = probe.result()
            except Exception as e:
                self._scheduler_gone = True
                self.scheduler_comm.timeout = 5  # nothing answers there any more: fail fast
                logger.warning(
                    "cluster %s: the scheduler went away (idle shutdown, or it stopped: %r); "
                    "lost workers are not replaced, close this cluster object",
                    self.name,
                    e,
                )
                return
            self.scheduler_info = SchedulerInfo(info)
            self._watch_worker_status_comm = comm

    async def _resubscribe(self) -> tuple[Any, Any]:
        await asyncio.wait_for(self.scheduler_comm.identity(), 30)
        comm = await asyncio.wait_for(self.scheduler_comm.live_comm(), 30)
        comm.name = "Cluster worker status"
        await comm.write({"op": "subscribe_worker_status"})
        return comm, await asyncio.wait_for(comm.read(), 30)

    def _replace_lost(self) -> None:
        if self.status == Status.running and not self._scheduler_gone and set(self.worker_spec) - set(self.workers):
            asyncio.ensure_future(self._replace_lost_if_scheduler_alive())

    async def _replace_lost_if_scheduler_alive(self) -> None:
        # A scheduler that stopped itself (idle shutdown) reports its workers lost first:
        # replacing them would create servers its watchdog is deleting.
        try:
            await asyncio.wait_for(self.scheduler_comm.identity(), 30)
        except Exception as e:
            logger.warning("cluster %s: scheduler unreachable (%r): lost workers not replaced", self.name, e)
            return
        # The lost workers' closes (SpecCluster's timer) delete their servers: a successor
        # of the same name is created once they are gone.
        pending = [f for f in self._futures if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=self._ctx.timeouts["close"])
        if self.status == Status.running and not self._scheduler_gone:
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
        limit = f" (max {self.max_hourly_cost:.4f})" if self.max_hourly_cost is not None else ""
        return (
            f"HetznerCluster({self.name!r}, workers={len(self.workers)}, "
            f"location={self._ctx.location!r}, {self.hourly_cost:.4f} EUR/h{limit}, "
            f"status={self.status.name})"
        )

    def _server_rows(self) -> list[dict[str, str]]:
        types = self._ctx.cloud._types or {}
        latest = self._ctx.watcher.last  # the poller's last list: fresher statuses
        rows = []
        for known in sorted(self._ctx.servers.values(), key=lambda s: (s.role != "scheduler", s.name)):
            s = latest.get(known.id, known)
            price = types[s.server_type].hourly.get(s.location) if s.server_type in types else None
            rows.append(
                {
                    "name": s.name,
                    "role": s.role or "",
                    "type": s.server_type,
                    "location": s.location,
                    "status": s.status,
                    "ip": s.public_ip or "",
                    "private ip": s.private_ip or "",
                    "EUR/h": f"{price:.4f}" if price is not None else "?",
                }
            )
        return rows

    def _repr_html_(self, cluster_status: str | None = None) -> str:
        """Dask's cluster widget plus the servers, their types and the hourly cost."""
        e = html.escape
        types = self._ctx.cloud._types or {}
        rows = self._server_rows()
        cost = f"{self.hourly_cost:.4f} EUR/h"
        if self.max_hourly_cost is not None:
            cost += f" (max {self.max_hourly_cost:.4f} EUR/h)"
        used = sorted({r["type"] for r in rows} | {self._ctx.scheduler_type, self._ctx.worker_type})
        kinds = "; ".join(
            f"{e(t)}: {types[t].cores} vCPU, {types[t].memory_gb:g} GB, "
            f"{types[t].hourly.get(self._ctx.location, 0.0):.4f} EUR/h in {e(self._ctx.location)}"
            if t in types
            else e(t)
            for t in used
        )
        columns = ["name", "role", "type", "location", "status", "ip", "private ip", "EUR/h"]
        head = "".join(f'<th style="text-align: left;">{e(c)}</th>' for c in columns)
        body = "".join(
            "<tr>" + "".join(f'<td style="text-align: left;">{e(r[c])}</td>' for c in columns) + "</tr>"
            for r in rows
        )
        idle_text = f"{self.idle_timeout:g} s" if self.idle_timeout is not None else "off"
        section = (
            f'<tr><td style="text-align: left;"><strong>Hourly cost:</strong> {e(cost)}</td>'
            f'<td style="text-align: left;"><strong>Location:</strong> {e(self._ctx.location)}'
            f" &middot; <strong>Idle timeout:</strong> {e(idle_text)}</td></tr>"
            f'<tr><td colspan="2" style="text-align: left;"><strong>Server types:</strong> {kinds}</td></tr>'
            f'<tr><td colspan="2"><table class="dask-hetzner-servers" style="width: 100%;">'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></td></tr>"
        )
        return super()._repr_html_(cluster_status=section + (cluster_status or ""))
