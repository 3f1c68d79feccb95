"""The cluster's life as ``SpecCluster`` drives it: start, rollback, close, reattach, repair.

``HetznerCluster`` (cluster.py) is the public face; this base class holds how it plugs into
``SpecCluster``'s private lifecycle. Overrides of SpecCluster's and Cluster's private
members are together at the end, each with a line saying why it is needed.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
from collections.abc import Generator
from typing import Any

import dask.config
import dask.utils
from distributed.core import Status, rpc
from distributed.deploy.cluster import Cluster
from distributed.deploy.spec import SpecCluster
from distributed.objects import SchedulerInfo
from distributed.utils import Log, Logs

from . import __version__, clients, cost, late, manage, reattach
from .aio import cancelled
from .attach import AttachedScheduler, AttachedWorker, Attachment, half_built
from .cloud import LABEL_JOINED, LABEL_WORKER, CloudError, ConfigError, ServerTypeInfo, preferences
from .nodes import SchedulerServer, user_options
from .provision.context import ClusterContext
from .provision.limits import WHERE_TO_RAISE, is_limit
from .provision.tasks import Provisioner
from .settings import ClusterSettings, check_same_zone, check_server_limit, check_size
from .state import ClusterState

logger = logging.getLogger(__name__)


class ClusterLifecycle(SpecCluster):
    """What HetznerCluster sets in its constructor, and the lifecycle built on it."""

    _ctx: ClusterContext
    _provisioner: Provisioner
    _state: ClusterState
    _attach: Attachment | None
    _detached: bool  # closing only disconnects (reattaching, or after detach())
    _touched: bool  # this process created something: a failure rolls it back
    _initial_pending: bool  # the initial workers' start is still to come
    _wait_for: int | None = None  # initial workers the start waits for (None: all)
    _late: late.LateWorkers  # workers provisioned outside the plan, joining when ready
    _replacements: late.Replacements  # failed workers' successors
    _teardown_task: asyncio.Future[None] | None
    _token: str
    # Set when the scheduler's status stream ends while this object lives.
    _scheduler_gone = False
    # The local state is this object's: written by its start, or the one it reattached with.
    # A start that lost the name to another never removes that one's state.
    _state_ours = False
    _resubscribing: asyncio.Future[Any] | None = None

    @property
    def settings(self) -> ClusterSettings:
        """The cluster's settings, as built from the arguments and ``hetzner.*``."""
        return self._ctx.settings

    @property
    def _scheduler_rpc(self) -> rpc:
        """``scheduler_comm``, which Cluster types Optional: None only before the start made it."""
        comm = self.scheduler_comm
        if comm is None:
            raise RuntimeError(f"cluster {self.name}: not connected to its scheduler yet")
        return comm

    @property
    def max_workers(self) -> int | None:
        """The most workers ``max_hourly_cost`` allows (None: no limit, or prices not read yet)."""
        return cost.max_workers(self.settings, self._server_types)

    @property
    def _server_types(self) -> dict[str, ServerTypeInfo] | None:
        """The API's server types and prices, once read (no request here)."""
        return self._ctx.cloud.cached_server_types()

    async def _check(self) -> None:
        """Every user choice checked against the API before anything is created."""
        s, cloud = self.settings, self._ctx.cloud
        await cloud.check_token()
        await cloud.check_choices([], s.location, s.image)  # the location; types per list below
        check_same_zone(await cloud.locations(), s.location, s.fallback_locations)
        catalog = await cloud.server_types()
        for role in ("scheduler", "worker"):
            arch = preferences.check_list(catalog, s.server_types(role), s.locations, f"{role}_server_type")
            await cloud.image_id(s.image, arch)  # the image exists for that architecture
        check_size(len(self.worker_spec), "starting the cluster")
        check_server_limit(s, len(self.worker_spec), "starting the cluster")
        cost.check(s, self._server_types, len(self.worker_spec), "starting the cluster")
        adaptive, cap = getattr(self, "_adaptive", None), self.max_workers
        if adaptive is not None and cap is not None and adaptive.maximum > cap:
            # adapt() called before the prices were read: cap it now, before it scales.
            adaptive.maximum = cap
        types = await cloud.server_types()
        # The packages resolved for the servers' platforms: a bad one is named now, not in a bootstrap.
        roles = ("scheduler", "worker")
        await self._ctx.payload.check({types[t].architecture for r in roles for t in s.server_types(r)})
        if len(await cloud.cluster_resources(s.name)):
            raise ConfigError(
                f"a cluster named {s.name!r} already exists in this project "
                "(reattach with HetznerCluster.from_name or delete it with dask-hetzner nuke)"
            )
        # Last: its POST (which creates nothing) is sent only when every other check passed.
        await cloud.check_write()

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
        await self._provisioner.teardown()
        bill = self._ctx.factory.bill
        if bill.lines:
            logger.info(
                "cluster %s: this cluster cost %.4f EUR for %d server-hours",
                self.name, bill.total, bill.server_hours,
            )  # fmt: skip
        # Only once the API confirmed: until then the state is what finds and reaches it.
        self._ctx.pins.follow(None)
        if self._state_ours:
            await asyncio.to_thread(self._state.remove)

    @property
    def owns_resources(self) -> bool:
        """This object created (or took over) servers that closing it deletes, and they are
        not deleted yet (a failed start's rollback deleted them: nothing is left at exit)."""
        done = self._teardown_task
        deleted = done is not None and done.done() and not done.cancelled() and done.exception() is None
        return self._touched and not self._detached and not deleted

    async def delete_by_label(self, timeout: float) -> None:
        """Delete every resource labelled with this cluster's name, then its local state,
        on whatever loop calls it: at exit, an asynchronous cluster's own loop has stopped."""
        async with manage.project_cloud(self._token, self._ctx.cloud.endpoint) as cloud:
            await cloud.delete_cluster(self.name, timeout=timeout)
        await asyncio.to_thread(self._state.remove)

    async def _say_goodbye(self) -> None:
        """A scheduler that is gone (its server vanished) must not hold the close for a
        connect timeout per call: ask once, briefly; not at all while its tunnel is down
        (every server is deleted next: a graceful goodbye is not worth the wait)."""
        tunnel = getattr(self.scheduler, "tunnel", None)
        try:
            if self.settings.connect == "tunnel" and tunnel is not None and not tunnel.up:
                raise ConnectionError("its SSH tunnel is down")
            await asyncio.wait_for(self._scheduler_rpc.identity(), 10)
        except Exception as e:
            logger.warning("cluster %s: the scheduler does not answer (%r); deleting", self.name, e)
            self._scheduler_gone = True
            self._scheduler_rpc.timeout = 1

    async def _disconnect(self) -> None:
        """Close this process's side (tunnel, SSH, API client) and leave every server running."""
        if self.status == Status.closed:
            return
        self.status = Status.closing  # the scheduler's stream ending now is expected
        adaptive = getattr(self, "_adaptive", None)
        if adaptive is not None:
            adaptive.stop()
        # Servers still being created for this process are not part of the cluster yet.
        await self._late.stop()
        await self._provisioner.cancel_all()
        # Kept servers' timers stop here: a process that reattaches takes them over (and may
        # give one to a worker); else the watchdog, close or nuke deletes them.
        await self._ctx.kept.clear()
        self._ctx.watcher.stop()
        if isinstance(self.scheduler, SchedulerServer):
            await self.scheduler.disconnect()
        await Cluster._close(self)  # comms and callbacks; not SpecCluster's, which deletes
        self._close_exit_stack()
        await asyncio.to_thread(self._state.forget_client_address, os.getpid())
        self._ctx.cloud.close()

    def _client_security(self) -> Any:
        # The files exist before the first connection (written by _start, or already there
        # when reattaching).
        return clients.client_security(self._state)

    async def _write_client_address(self) -> None:
        """Where other processes here reach the scheduler (``dask_hetzner.connect``)."""
        info = clients.client_info(self.scheduler_address, self.dashboard_link, self.settings.connect)
        await asyncio.to_thread(self._state.write_client_address, info)

    async def _write_state(self) -> None:
        """Keys and ``cluster.json`` (never the token): what another process needs to reattach."""
        ctx = self._ctx
        metadata = {
            **self.settings.metadata(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "endpoint": ctx.cloud.endpoint,
            "start": ctx.start,
            "versions": ctx.versions,
            "dask_hetzner_version": __version__,
        }
        self._state_ours = True
        await asyncio.to_thread(self._state.create, metadata, ctx.keys.secrets())
        ctx.pins.follow(self._state)

    async def _start_attached(self) -> None:
        """The servers the API lists become this cluster's scheduler and workers."""
        try:
            adopted = await reattach.adopt(self._ctx, self._state)
            view = self._attach is not None and not self._attach.take_over
            for worker_name, server in adopted.workers.items():
                if view and LABEL_JOINED not in server.labels:
                    continue  # half-built (a start killed half-way): not a worker to show
                options = {**self.new_spec["options"], "server": server}
                options["host_key"] = adopted.host_keys.get(server.name, "")
                self.worker_spec[worker_name] = {"cls": AttachedWorker, "options": options}
            self._i = adopted.next_number
            # Created here, not by SpecCluster._start, so its errors reach the caller unwrapped.
            scheduler = AttachedScheduler(
                server=adopted.scheduler,
                host_key=adopted.host_keys[adopted.scheduler.name],
                **self.scheduler_spec["options"],
            )
            self.scheduler = await scheduler
            await super()._start()
        except BaseException:
            await asyncio.shield(self._disconnect())
            raise
        if self._attach is not None and not self._attach.take_over:
            self.shutdown_on_close = False  # a view: stays detached, nothing deleted at exit
            return
        # Ours now: closing deletes it, as on the original.
        self._detached = False
        self._touched = True
        await self._write_client_address()
        self._state_ours = True
        await self._drop_unregistered()

    async def _drop_unregistered(self) -> None:
        """Adopted worker servers the scheduler does not know and where no dask worker runs
        (a start killed half-way, e.g. SIGKILL during a scale-up) are not workers: delete them
        instead of counting them. (One the scheduler does not know yet may still be starting.)"""
        # Called before SpecCluster creates the adopted worker nodes: only their specs exist.
        known = {str(w.get("name")) for w in self.scheduler_info.get("workers", {}).values()}
        unknown = {n: self.worker_spec[n]["options"] for n in self.worker_spec if n not in known}
        checks = [half_built(self._ctx, o["server"], o["host_key"]) for o in unknown.values()]
        for (name, options), dead in zip(unknown.items(), await asyncio.gather(*checks), strict=True):
            if not dead:
                continue
            del self.worker_spec[name]
            logger.warning(
                "cluster %s: %s's server %s never got its dask worker running (a start that was "
                "interrupted): deleting it", self.name, name, options["server"].name,
            )  # fmt: skip
            await self._ctx.factory.delete(options["server"], wait=False)

    # Overrides of SpecCluster's and Cluster's private members ----------------------------------
    # SpecCluster has no public hooks for these; each says why it is needed.

    def __await__(self) -> Generator[Any, Any, Any]:
        # SpecCluster's asynchronous start (``await HetznerCluster(..., asynchronous=True)``,
        # as the JupyterLab panel makes them) never closes after its initial workers failed,
        # unlike its synchronous one: the scheduler's server stayed running and billed.
        try:
            return (yield from super().__await__())
        except BaseException:
            # A failed _start has rolled itself back already (status failed).
            closing = self.close() if self.status == Status.running else None
            if closing is not None:
                yield from asyncio.shield(closing).__await__()
            raise

    async def _start(self) -> None:
        # Check and create the shared resources first, and provision the initial workers
        # alongside the scheduler; roll everything back on any failure.
        if self.status != Status.created:
            return await super()._start()
        if self._attach is not None:
            return await self._start_attached()
        try:
            await self._check()
            self._touched = True
            # The name first: only the start that claimed it writes the state and goes on.
            await self._ctx.shared.claim()
            await self._write_state()
            await self._ctx.shared.setup()
            # Workers' servers are created and bootstrapped while the scheduler starts.
            self._provisioner.prestart("scheduler", "scheduler", {})
            for worker_name, spec in self.worker_spec.items():
                self._provisioner.prestart(worker_name, "worker", user_options(spec.get("options", {})))
            self._late.hold(self._hold_back_late_workers())
            await self._start_unless_limited()
            await self._write_client_address()
        except BaseException:
            self.status = Status.failed
            await asyncio.shield(self._teardown())
            raise

    async def _start_unless_limited(self) -> None:
        """SpecCluster's start; the account's server limit fails it at once (every server
        created meanwhile is billed a started hour), unless allow-fewer-workers is set."""
        factory, asked = self._ctx.factory, len(self.worker_spec) + len(self._late)  # before the start changes it
        start = asyncio.ensure_future(self._start_with_first_workers())
        if self.settings.allow_fewer_workers:
            return await start
        limit = asyncio.ensure_future(factory.limit_event.wait())
        try:
            await asyncio.wait({start, limit}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            await cancelled(start)  # Ctrl-C: the caller rolls back; nothing goes on starting
            raise
        finally:
            limit.cancel()
        if not start.done():
            await cancelled(start)
        if factory.limit_hit is not None:
            raise factory.limit_hit.starting(self.name, asked) from None
        start.result()

    async def _start_with_first_workers(self) -> None:
        """SpecCluster's start (the scheduler), then, with ``wait_for_workers``, the first
        of the initial workers whose servers are ready, whichever they are."""
        await super()._start()
        if not self._late:
            return
        try:
            await self._take_first_workers()
        except BaseException:
            # Started (comms, tunnel, scheduler node): closed as SpecCluster closes a failed start.
            await asyncio.shield(self._close())
            raise

    def _hold_back_late_workers(self) -> dict[str, Any]:
        """With ``wait_for_workers`` below the count, every initial worker is held out of the
        plan the start waits for: the first that are ready go back in (_take_first_workers)."""
        names = list(self.worker_spec)
        if self._wait_for is None or self._wait_for >= len(names):
            return {}
        logger.info(
            "cluster %s: waiting for the first %d workers; %d more join in the background",
            self.name, self._wait_for, len(names) - self._wait_for,
        )  # fmt: skip
        return {n: self.worker_spec.pop(n) for n in names}

    async def _take_first_workers(self) -> None:
        """The first ``wait_for_workers`` initial workers that are ready (any of them: one slow
        server holds nobody) join the plan the start waits for; the others stay late. When too
        many failed for that, the start fails with the first failure (unless the account's
        server limit struck and fewer workers are allowed)."""
        assert self._wait_for is not None
        ready, failures = await self._provisioner.first_ready(list(self._late.specs), self._wait_for)
        if len(ready) < self._wait_for and failures:
            error = failures[0]
            if not (isinstance(error, Exception) and self._fewer_allowed(error)):
                raise error
        for name in ready:
            self.worker_spec[name] = self._late.specs.pop(name)

    async def _close(self) -> None:
        # A detached cluster only disconnects; else every server is deleted at once.
        if self._detached:
            return await self._disconnect()
        if not hasattr(self, "_lock"):
            # SpecCluster never started (a failed check or setup, already rolled back by
            # _start): its _close would fail; only this process's side is left to close.
            return await self._disconnect()
        # Nodes then delete without waiting one by one: teardown waits for all at once.
        self._ctx.factory.begin_closing()
        await self._late.stop()  # the teardown deletes what they were provisioning
        # A scale-up's servers still being made: cancelled now, so SpecCluster's close (which
        # waits for the scale-up's batch) does not wait for them to boot and bootstrap first.
        await self._provisioner.cancel_all()
        if self._resubscribing is not None and not self._resubscribing.done():
            self._resubscribing.cancel()  # the scheduler stream is being closed anyway
        if self.status == Status.running and not self._scheduler_gone and self.scheduler_comm:
            await self._say_goodbye()
        try:
            await super()._close()
        finally:
            await asyncio.shield(self._teardown())


    def _new_worker_name(self, worker_number: int) -> str:
        # SpecCluster names new workers by their number alone; ours are "worker-N" (labels,
        # server names "<cluster>-worker-N" and reattaching rely on it).
        return f"worker-{worker_number}"

    async def _get_logs(self, cluster: bool = True, scheduler: bool = True, workers: Any = True) -> Logs:
        """The cluster manager's log, and each server's dask and bootstrap logs (over SSH).

        Cluster's own reads only the scheduler's and workers' logs through dask; ours are on
        the servers, next to their bootstrap logs.

        Keys: ``Cluster``, ``scheduler``, ``scheduler bootstrap``, ``worker-N``,
        ``worker-N bootstrap``. ``workers``: True, False, or worker names or addresses.
        """
        logs = Logs()
        if cluster:
            logs["Cluster"] = Log("\n".join(line[1] for line in self._cluster_manager_logs))
        servers = list(self._ctx.servers.values())
        targets = [s for s in servers if scheduler and s.role == "scheduler"]
        if workers:
            known = self.scheduler_info.get("workers", {})
            wanted = None if workers is True else {str(known[w]["name"]) if w in known else str(w) for w in workers}
            targets += [
                s for s in servers if s.role == "worker" and (wanted is None or s.labels.get(LABEL_WORKER) in wanted)
            ]

        def connect(host: str, host_key: str) -> Any:
            return self._ctx.ssh(host, host_key, retry_for=15)

        fetched = await manage.node_logs(connect, targets, dict(self._ctx.pins.keys))
        for key, text in fetched.items():
            logs[key] = Log(text)
        return logs

    def _close_exit_stack(self) -> None:
        # SpecCluster keeps its exit stack private; disconnecting must close it without
        # SpecCluster._close (which would delete every server).
        exit_stack = getattr(self, "_SpecCluster__exit_stack", None)
        if exit_stack is not None:
            exit_stack.__exit__(None, None, None)

    async def _correct_state_internal(self) -> None:
        # Retire by name (SpecCluster retires by address, with our names: nobody), skip the
        # retirement when the scheduler is gone, and fail only the initial start on a failure.
        to_close = set(self.workers) - set(self.worker_spec)
        if to_close and await self._retire(to_close):
            # No scheduler to retire them with (idle shutdown, or it died): just delete them.
            await asyncio.gather(*(self.workers[w].close() for w in to_close if w in self.workers))
            for w in to_close:
                self.workers.pop(w, None)
        initial, self._initial_pending = self._initial_pending, False
        try:
            await super()._correct_state_internal()
            if initial and self._ctx.idle is not None:
                await self._idle_started()
            if initial and self._late:
                # Past wait_for_workers, already provisioning: each joins when it is ready.
                self._late.join_when_ready()
        except Exception as e:
            # The initial workers failing fails the start (and rolls back everything), unless
            # the account's server limit stopped them and the user allowed fewer. A scale under
            # way when a close began (here, or another process's close deleted the servers)
            # only drops its workers: the teardown deletes what is left.
            if (initial or self.status not in (Status.running, Status.closing)) and not self._fewer_allowed(e):
                raise
            self._drop_failed_workers(e)

    async def _retire(self, names: set[str]) -> bool:
        """Retire workers by name so the scheduler moves their data first; True when the
        scheduler cannot be asked (their servers are deleted without it)."""
        # Closing deletes every server: moving data among them first would be wasted time.
        if self._scheduler_gone or self._ctx.factory.closing:
            return True
        if self.scheduler is None or self.scheduler.status != Status.running:
            return False
        try:
            await self._scheduler_rpc.retire_workers(names=sorted(names))
        except OSError as e:
            logger.warning(
                "cluster %s: the scheduler is unreachable (%r): deleting workers %s without moving their data",
                self.name, e, sorted(names),
            )  # fmt: skip
            return True
        return False

    def _fewer_allowed(self, e: Exception) -> bool:
        if not (self.settings.allow_fewer_workers and isinstance(e, CloudError) and is_limit(e)):
            return False
        logger.warning(
            "cluster %s: the Hetzner account's server limit is reached; going on with the workers "
            "that fit (hetzner.allow-fewer-workers); %s", self.name, WHERE_TO_RAISE,
        )  # fmt: skip
        return True

    def _drop_failed_workers(self, e: Exception) -> None:
        # A worker that failed to start after the cluster was up: its node deleted its
        # server; it gets one successor under a new name (late.py), or is named.
        failed = [n for n, w in self.workers.items() if w.status != Status.running]
        specs = {}
        for n in failed:
            w = self.workers.pop(n, None)
            if w is not None and w.status == Status.created:
                w.status = Status.failed  # SpecCluster's close checks every node it made
            specs[n] = self.worker_spec.pop(n, None) or self.new_spec
        errors: dict[str, BaseException] = {n: self._provisioner.failures.pop(n, e) for n in failed}
        self._late.spawn(self._replace_failed(errors, specs))

    async def _late_done(self, name: str, spec: dict[str, Any], error: BaseException | None) -> None:
        """A late worker's provisioning ended: it joins the plan (its node takes the ready
        server at once), or it is replaced."""
        if self.status != Status.running:
            return  # closing or disconnecting: its server goes with the rest
        if error is None:
            self.worker_spec[name] = spec
            self._correct_state()
            return
        self._provisioner.discard(name)
        await self._replace_failed({name: error}, {name: spec})

    async def _replace_failed(self, errors: dict[str, BaseException], specs: dict[str, Any]) -> None:
        """Failed workers: each gets one successor (late.Replacements), joining when ready;
        the others are named in an error. None while the cluster is closing or its scheduler
        is gone (another process's close deleted it: successors would be created in vain)."""
        if not await self._usable():
            if not self._ctx.factory.closing:  # else a close cancelled them: nothing failed
                logger.error("cluster %s: workers failed to start: %s", self.name, late.describe(errors))
            return
        decision = self._replacements.decide(errors, self._next_worker_name, self._check_more_workers)
        for old, new in decision.replace.items():
            logger.warning(
                "cluster %s: %s failed to start (%s); replacing it with %s",
                self.name, old, late.reason(errors[old]), new,
            )  # fmt: skip
            self._late.add(new, specs[old])
        for old, why in decision.given_up.items():
            logger.error(
                "cluster %s: %s failed to start and is not replaced (%s): %s",
                self.name, old, why, late.reason(errors[old]),
            )  # fmt: skip

    async def _usable(self) -> bool:
        """Running, not closing, and its scheduler answers (briefly asked)."""
        if self.status != Status.running or self._scheduler_gone or self._ctx.factory.closing:
            return False
        try:
            await asyncio.wait_for(self._scheduler_rpc.identity(), 10)
        except Exception:
            return False
        return self.status == Status.running and not self._ctx.factory.closing

    def _next_worker_name(self) -> str:
        (name,) = self.new_worker_spec()
        return name

    def new_worker_spec(self) -> dict[str, Any]:
        # SpecCluster gives a retired worker's name again, while its server (kept, or being
        # deleted) still has that name and labels: a new worker would meet it (409, adopted).
        # Here a name is never given twice, nor a late worker's.
        taken = set(self.worker_spec) | set(self.workers) | set(self._late.specs)
        while self._new_worker_name(self._i) in taken:
            self._i += 1
        self._i += 1
        return {self._new_worker_name(self._i - 1): self.new_spec}

    def _check_more_workers(self, k: int) -> None:
        """Refuse (``ConfigError``) ``k`` workers more than the plan holds, by every limit."""
        n = len(self.worker_spec) + len(self._late) + k
        check_size(n, "replacing failed workers")
        check_server_limit(self.settings, n, "replacing failed workers")
        cost.check(self.settings, self._server_types, n, "replacing failed workers")

    async def _idle_started(self) -> None:
        """Tell the scheduler's idle watch that the start is over: idleness counts from now."""
        try:
            await asyncio.wait_for(self._scheduler_rpc.dask_hetzner_idle(action="started"), 30)
        except Exception as e:
            # Not fatal: the start grace ends by itself, only later.
            logger.warning("cluster %s: telling the idle watch the start is over failed: %r", self.name, e)

    def _update_worker_status(self, op: str, msg: Any) -> None:
        # SpecCluster drops a lost worker after lost-worker-timeout; then start its successor.
        super()._update_worker_status(op, msg)
        if op == "remove" and self.status == Status.running:
            delay = dask.utils.parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout"))
            asyncio.get_running_loop().call_later(delay + 0.5, self._replace_lost)

    async def _watch_worker_status(self, comm: Any) -> None:
        # The stream ends when the scheduler stops (idle shutdown, a crash) or only the SSH
        # tunnel dropped and reconnected: ask before concluding, and resubscribe if it answers.
        while True:
            await super()._watch_worker_status(comm)
            if self.status != Status.running:
                return  # closing: the stream was closed on purpose
            # A close meanwhile cancels the question (Cluster._close waits for this task).
            self._resubscribing = probe = asyncio.ensure_future(self._resubscribe())
            await asyncio.wait({probe})
            if probe.cancelled():
                return
            try:
                comm, info = probe.result()
            except Exception as e:
                self._scheduler_gone = True
                self._scheduler_rpc.timeout = 5  # nothing answers there any more: fail fast
                if (reason := getattr(self.scheduler, "unreachable", None)) is not None:
                    logger.error("cluster %s: %s", self.name, reason)
                    return
                logger.warning(
                    "cluster %s: the scheduler went away (idle shutdown, or it stopped: %r); "
                    "lost workers are not replaced, close this cluster object",
                    self.name, e,
                )  # fmt: skip
                return
            self.scheduler_info = SchedulerInfo(info)
            self._watch_worker_status_comm = comm

    async def _resubscribe(self) -> tuple[Any, Any]:
        await asyncio.wait_for(self._scheduler_rpc.identity(), 30)
        comm = await asyncio.wait_for(self._scheduler_rpc.live_comm(), 30)
        comm.name = "Cluster worker status"
        await comm.write({"op": "subscribe_worker_status"})
        return comm, await asyncio.wait_for(comm.read(), 30)

    def _replace_lost(self) -> None:
        if self.status == Status.running and not self._scheduler_gone and set(self.worker_spec) - set(self.workers):
            self._late.spawn(self._replace_lost_if_scheduler_alive())

    async def _replace_lost_if_scheduler_alive(self) -> None:
        # A scheduler that stopped itself (idle shutdown) reports its workers lost first:
        # replacing them would create servers its watchdog is deleting.
        try:
            await asyncio.wait_for(self._scheduler_rpc.identity(), 30)
        except Exception as e:
            logger.warning("cluster %s: scheduler unreachable (%r): lost workers not replaced", self.name, e)
            return
        # The lost workers' closes (SpecCluster's timer) delete their servers: a successor
        # of the same name is created once they are gone.
        pending = [f for f in self._futures if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.settings.timeouts["close"])  # close_timeout
        if self.status == Status.running and not self._scheduler_gone:
            self._correct_state()
