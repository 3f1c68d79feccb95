"""A faithful local Hetzner Cloud: the HTTP API plus SSH-reachable simulated hosts.

::

    async with Simulator() as sim:          # inside a running event loop
        client = hcloud.Client(token=sim.token, api_endpoint=sim.endpoint)

    with Simulator() as sim:                # its own loop in a background thread
        ...

The one deliberate difference from Hetzner: addresses are loopback addresses
(public IPv4 from ``127.64.0.0/10``, private network IPs from ``127.128.0.0/9``),
unique on this machine, so simulated hosts can listen on them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from . import disks as disk_dirs
from .app import Api, Stats
from .faults import HOST_FAULTS, FaultRule, FaultSet, make_rule, parse_fault
from .ratelimit import RateLimiter
from .schema import SpecViolation, load_spec
from .store import Store
from .timing import Timing

__all__ = ["Simulator", "SpecViolation", "FaultRule", "parse_fault"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def default_cache_dir() -> Path:
    """``$DASK_HETZNER_SIM_CACHE``, else ``$XDG_CACHE_HOME/dask-hetzner/sim``."""
    explicit = os.environ.get("DASK_HETZNER_SIM_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "dask-hetzner" / "sim"


class Simulator:
    """A local Hetzner Cloud project.

    :param token: the API token clients must send (random by default)
    :param host, port: where the API listens (port 0: any free one)
    :param profile: ``"instant"`` (tests) or ``"realistic"`` (seeded, Hetzner-like timings)
    :param time_scale: multiplies every duration (0.05 = 20x faster)
    :param seed: seed of the timing RNG
    :param rate_limit: requests an hour; ``rate_refill`` per second (default limit/3600)
    :param clock: monotonic clock of the rate limiter (tests move it instead of sleeping)
    :param server_limit: servers the project may hold (None: unlimited)
    :param ssh_port: port the simulated hosts' SSH servers listen on
    :param hosts: True for real simulated hosts (``sim/hosts.py``), False for none,
        or a HostManager-like object to use instead
    :param root_dir: where hosts keep their disks (a temporary directory by default,
        removed at close)
    :param disks: ``"disk"`` or ``"memory"`` (a tmpfs, ``sim/disks.py``) for that temporary
        directory; default ``$DASK_HETZNER_SIM_DISKS``, else ``"disk"``
    :param validate_responses: check every answer against the spec; a violation is
        recorded in ``violations``, answered as a 500, and raised at exit
    :param faults: rules or ``'kind:key=value,...'`` strings to start with
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        profile: str = "instant",
        time_scale: float = 1.0,
        seed: int | None = None,
        rate_limit: int = 3600,
        rate_refill: float | None = None,
        clock: Callable[[], float] | None = None,
        server_limit: int | None = None,
        ssh_port: int = 22,
        hosts: bool | Any = True,
        host_options: dict[str, Any] | None = None,
        root_dir: str | Path | None = None,
        disks: str | None = None,
        validate_responses: bool = False,
        faults: Iterable[FaultRule | str] = (),
    ):
        self.token = token or secrets.token_urlsafe(48)
        # A read-only token of the same project: GETs only, as a "Read" token on Hetzner.
        self.readonly_token = secrets.token_urlsafe(48)
        self.host = host
        self.port = port
        self.ssh_port = ssh_port
        self.timing = Timing(profile, time_scale, seed)
        self.ratelimiter = RateLimiter(rate_limit, rate_refill, clock=clock or time.monotonic)
        self.server_limit = server_limit
        self.validate_responses = validate_responses
        self.faults = FaultSet()
        for rule in faults:
            self.faults.add(parse_fault(rule) if isinstance(rule, str) else rule)
        self._hosts_option = hosts
        self._host_options = dict(host_options or {})
        # One package cache for every simulator run on this machine: the stand-in for a
        # nearby mirror, so only the first run downloads the dask stack.
        self._host_options.setdefault("cache_dir", default_cache_dir())
        self._root_dir_option = Path(root_dir) if root_dir is not None else None
        self._disks = disk_dirs.kind(disks)
        self.disks_in_memory = False
        self.root_dir: Path | None = None
        self.hosts: Any = None
        self.store: Store | None = None
        self.api: Api | None = None
        self._runner: web.AppRunner | None = None
        self._servers_side: str | None = None  # where servers reach this simulator's HTTP
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = False

    # -- life ----------------------------------------------------------------
    async def start(self) -> Simulator:
        if self._started:
            return self
        self._loop = asyncio.get_running_loop()
        if self._root_dir_option is None:
            self.root_dir, self.disks_in_memory = await asyncio.to_thread(disk_dirs.make_root, self._disks)
        else:
            self.root_dir = self._root_dir_option
            self.root_dir.mkdir(parents=True, exist_ok=True)
        host_spec: Callable[..., Any] | None = None
        if self._hosts_option is True:
            from .hosts import HostManager, HostSpec

            self.hosts = HostManager(self.root_dir, ssh_port=self.ssh_port, **self._host_options)
            host_spec = HostSpec
        elif self._hosts_option not in (False, None):
            from .hosts import HostSpec

            self.hosts = self._hosts_option  # any object with HostManager's interface (tests)
            host_spec = HostSpec
        self.store = Store(
            timing=self.timing,
            faults=self.faults,
            server_limit=self.server_limit,
            hosts=self.hosts,
            host_spec=host_spec,
        )
        self.api = Api(
            store=self.store,
            spec=load_spec(),
            faults=self.faults,
            ratelimiter=self.ratelimiter,
            timing=self.timing,
            token=self.token,
            validate_responses=self.validate_responses,
            readonly_token=self.readonly_token,
        )
        self._runner = web.AppRunner(self.api.make_app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        await self._serve_servers()
        self._started = True
        log.info("Hetzner simulator listening on %s", self.endpoint)
        return self

    async def _serve_servers(self) -> None:
        """Also answer at this machine's address on the servers' network, and make that the
        endpoint: a server in its own network namespace cannot reach this machine's 127.0.0.1,
        and on Hetzner servers reach the API (the idle watchdog) and the internet."""
        start_network = getattr(self.hosts, "start_network", None)
        if start_network is None or self._runner is None:
            return
        assert self.store is not None
        client_ip = await start_network([self.store.public_pool.cidr])
        if not client_ip:
            return
        site = web.TCPSite(self._runner, client_ip, 0)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self._servers_side = f"http://{client_ip}:{port}"

    async def close(self) -> None:
        """Stop answering, delete every server and its host, free the addresses."""
        if not self._started:
            return
        self._started = False
        if self._runner is not None:
            await self._runner.cleanup()
        if self.store is not None:
            await self.store.close()
        if self.hosts is not None and hasattr(self.hosts, "close"):
            try:
                await self.hosts.close()
            except Exception:
                log.exception("closing the simulated hosts failed")
        if self._root_dir_option is None and self.root_dir is not None:
            await asyncio.to_thread(disk_dirs.remove_root, self.root_dir)

    async def __aenter__(self) -> Simulator:
        return await self.start()

    async def __aexit__(self, exc_type: Any, *exc: Any) -> None:
        await self.close()
        if exc_type is None:
            self.raise_violations()

    def __enter__(self) -> Simulator:
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="hetzner-simulator", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            loop.close()
            raise failure[0]
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        loop = self._loop
        assert loop is not None and self._thread is not None
        try:
            asyncio.run_coroutine_threadsafe(self.close(), loop).result(timeout=120)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=30)
            if not self._thread.is_alive():
                loop.close()
        if exc_type is None:
            self.raise_violations()

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the simulator's loop (thread-safe in threaded mode)."""
        loop = self._loop
        if loop is None or not loop.is_running() or self._thread is None or threading.current_thread() is self._thread:
            return fn()

        async def wrapper() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), loop).result()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the simulator's loop from another thread (threaded mode)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # -- facts ---------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        if self._servers_side is not None:  # reachable from this machine and from servers
            return f"{self._servers_side}/v1"
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def python_downloads_url(self) -> str:
        """uv's list of Python downloads as this simulator serves it (sim/pythons.py)."""
        base = self._servers_side or self.endpoint.removesuffix("/v1")
        return base + "/python/downloads.json"

    def dask_config(self) -> dict[str, Any]:
        """``hetzner.*`` settings pointing dask-hetzner at this simulator."""
        return {
            "hetzner.token": self.token,
            "hetzner.api-endpoint": self.endpoint,
            "hetzner.ssh-port": self.ssh_port,
            # Other programs on this machine may hold 8786/8787: let the scheduler pick.
            "hetzner.scheduler-port": 0,
            "hetzner.dashboard-port": 0,
            # Instant actions: polling once a second would only add waiting.
            "hetzner.api.poll-interval": "100ms",
            # A Python the servers lack comes from here, not from the internet.
            "hetzner.python-downloads-json-url": self.python_downloads_url,
        }

    @property
    def stats(self) -> Stats:
        assert self.api is not None, "simulator not started"
        return self.api.stats

    @property
    def violations(self) -> list[str]:
        return list(self.api.violations) if self.api is not None else []

    def raise_violations(self) -> None:
        if self.violations:
            raise SpecViolation("simulator answers violated the spec:\n" + "\n".join(self.violations[:20]))

    def resources(self) -> dict[str, list[dict[str, Any]]]:
        """Live resources by kind: servers, ssh_keys, networks, firewalls,
        placement_groups, images (snapshots)."""
        assert self.store is not None, "simulator not started"
        return self._call(self.store.resources)

    def leaks(self) -> dict[str, list[dict[str, Any]]]:
        """``resources()`` without the empty kinds: ``{}`` when nothing is left."""
        return {kind: items for kind, items in self.resources().items() if items}

    def bill(self, cluster: str | None = None) -> dict[str, Any]:
        """What Hetzner would bill so far (EUR gross, started server-hours, per server), for
        the servers of ``cluster`` (by its label) or of the whole project; deleted ones included."""
        assert self.store is not None, "simulator not started"
        selector = f"dask-hetzner/cluster={cluster}" if cluster else None
        return self._call(lambda: self.store.server_store.ledger.bill(selector))  # type: ignore[union-attr]

    def timings(self, server_id: int) -> dict[str, Any]:
        """What was drawn for a server and when each phase ended (``time.time()``)."""
        assert self.store is not None, "simulator not started"
        return self._call(lambda: self.store.timings[server_id].as_dict())  # type: ignore[union-attr]

    def end_ssh_delay(self, name: str) -> None:
        """End the SSH delay (``slow_boot``) of the booted server ``name`` now: a test holds a
        server back for as long as it needs, and no longer."""
        assert self.store is not None and self.hosts is not None, "simulator not started with hosts"

        def end() -> bool:
            ids = [s.id for s in self.store.iter_servers() if s.name == name]  # type: ignore[union-attr]
            return bool(ids) and self.hosts.end_ssh_delay(ids[0])

        if not self._call(end):
            raise LookupError(f"server {name}: not booted, or not waiting for SSH")

    @property
    def host_errors(self) -> list[str]:
        return list(self.store.host_errors) if self.store is not None else []

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait until every action that can finish has finished."""
        assert self.store is not None
        await self.store.settle(timeout)

    def settle_sync(self, timeout: float = 10.0) -> None:
        """``settle`` from another thread (threaded mode)."""
        self.run(self.settle(timeout))

    # -- faults --------------------------------------------------------------
    def inject(self, kind: str, **match_and_params: Any) -> FaultRule:
        """Add a fault rule (see :mod:`dask_hetzner.sim.faults`) and return it.

        ``processes_die``, ``server_vanishes`` and ``ssh_drop`` also strike at once on
        running servers that match; every host fault also strikes on later boots.
        """
        rule = make_rule(kind, **match_and_params)
        return self._call(lambda: self._add_rule(rule))

    def _add_rule(self, rule: FaultRule) -> FaultRule:
        self.faults.add(rule)
        store = self.store
        striking = ("processes_die", "server_vanishes", "ssh_drop")
        if store is not None and rule.kind in HOST_FAULTS and rule.kind in striking:
            for server in store.iter_servers():
                if server.status != "running" or rule.exhausted:
                    continue
                if rule.kind != "server_vanishes" and "booted" not in server.timings.phases:
                    continue  # strikes when it boots
                if rule.matches_server(server.id, server.name, server.labels):
                    store.strike(server, rule)
        return rule

    def clear_faults(self) -> None:
        self._call(self.faults.clear)

