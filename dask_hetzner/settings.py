"""One record of a cluster's settings: built once, checked once, stored in ``cluster.json``.

Every setting has one name from argument to server: the constructor's keyword, the field
here, the ``hetzner.*`` config key (with ``-`` for ``_``) and the key in ``cluster.json``.
Values come from the arguments, else from ``dask.config`` (``override_with``, as
dask-kubernetes does). Every refusal of bad input that needs no API call lives here, so it
happens before anything is created.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

import dask.config
import dask.utils

from . import config, inputs, jobsettings
from .cloud import ConfigError
from .manage import check_name

# A Hetzner network holds 100 servers; every server of a cluster is in its private network
# (workers exchange data with each other over it), so the scheduler and 99 workers at most.
SERVERS_PER_NETWORK = 100
MAX_WORKERS = SERVERS_PER_NETWORK - 1

# The hetzner.timeouts.* of a cluster; START_TIMEOUTS (config) bound a node's whole start.
TIMEOUT_KEYS = ("api-request", "server-create", "ssh", "bootstrap", "process-start", "close", "private-address")

# Stored in cluster.json (what another process needs to reattach); the rest is read from the
# config of the process that reattaches.
STORED = (
    "name",
    "location",
    "fallback_locations",
    "image",
    "scheduler_server_type",
    "worker_server_type",
    "packages",
    "connect",
    "allowed_cidrs",
    "network_ip_range",
    "ssh_port",
    "scheduler_port",
    "dashboard_port",
    "worker_options",
    "scheduler_options",
    "max_hourly_cost",
    "idle_timeout",
    "environment",
    "upload",
    "env",
    "object_storage",
    "apt_packages",
    "setup_commands",
    "server_limit",
    "allow_fewer_workers",
    "no_client_timeout",
    "max_lifetime",
)
# cluster.json files written before the settings record named two fields differently.
_LEGACY_KEYS = {"scheduler_type": "scheduler_server_type", "worker_type": "worker_server_type"}


@dataclasses.dataclass(frozen=True)
class ClusterSettings:
    name: str
    location: str
    fallback_locations: tuple[str, ...]
    image: str
    # Preference lists: tried in order in each location (the location first, then fallbacks).
    scheduler_server_type: tuple[str, ...]
    worker_server_type: tuple[str, ...]
    packages: tuple[str, ...]
    connect: str
    allowed_cidrs: tuple[str, ...]
    network_ip_range: str
    ssh_port: int
    scheduler_port: int
    dashboard_port: int
    worker_options: Mapping[str, Any]
    scheduler_options: Mapping[str, Any]
    max_hourly_cost: float | None
    idle_timeout: float | None
    timeouts: Mapping[str, float]
    uv_version: str
    index_url: str | None
    # The user's job on the servers (payload.py); secrets are never part of this record.
    environment: str = "minimal"
    upload: tuple[str, ...] = ()
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    object_storage: bool | str = False
    apt_packages: tuple[str, ...] = ()
    setup_commands: tuple[str, ...] = ()
    # The account's server limit as the user knows it (the API has no endpoint for it).
    server_limit: int | None = None
    # Hitting the account's server limit while starting: go on with the workers that fit.
    allow_fewer_workers: bool = False
    # Where uv gets a Python the image lacks (a mirror's JSON), and uv's python-preference.
    python_downloads_json_url: str | None = None
    python_preference: str | None = None
    # A retired worker's server is kept (dask stopped) until keep_margin before its next
    # started hour, for the next scale-up (hetzner.keep-paid-servers, hetzner.keep-margin).
    keep_paid_servers: bool = False
    keep_margin: float = 300.0
    # Enforced on the scheduler's server like idle_timeout (idle.py), without this process.
    no_client_timeout: float | None = None
    max_lifetime: float | None = None

    @classmethod
    def build(cls, **arguments: Any) -> ClusterSettings:
        """From keyword arguments (None: not given) and ``hetzner.*``; refuses bad input."""
        unknown = set(arguments) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        a = arguments.get
        connect = _pick("connect", a("connect") or None)
        if connect not in ("tunnel", "public"):
            raise ConfigError(f"connect must be 'tunnel' or 'public', got {connect!r}")
        scheduler_port = inputs.port(_pick("scheduler-port", a("scheduler_port")), "scheduler_port")
        if connect == "public" and scheduler_port == 0:
            raise ConfigError("connect='public' needs a fixed hetzner.scheduler-port for the firewall")
        return cls(
            name=check_name(_pick("name", a("name") or None) or f"dask-{secrets.token_hex(3)}"),
            # An empty value falls back to the configured one, where it always has.
            location=_pick("location", a("location") or None),
            fallback_locations=inputs.string_list(_pick("fallback-locations", a("fallback_locations")), "fallback_locations"),
            image=_pick("image", a("image") or None),
            scheduler_server_type=_type_list(a("scheduler_server_type"), "scheduler_server_type"),
            worker_server_type=_type_list(a("worker_server_type"), "worker_server_type"),
            packages=inputs.string_list(_pick("packages", a("packages")), "packages"),
            connect=connect,
            # An empty list is refused, never widened to the default (everyone).
            allowed_cidrs=inputs.cidrs(_pick("allowed-cidrs", a("allowed_cidrs"))),
            network_ip_range=inputs.network(_pick("network-ip-range", a("network_ip_range")), "network_ip_range"),
            ssh_port=inputs.port(_pick("ssh-port", a("ssh_port")), "ssh_port", zero=False),
            scheduler_port=scheduler_port,
            dashboard_port=inputs.port(_pick("dashboard-port", a("dashboard_port")), "dashboard_port"),
            worker_options=inputs.option_keys(_pick("worker-options", a("worker_options") or None) or {}, "worker_options"),
            scheduler_options=inputs.option_keys(
                _pick("scheduler-options", a("scheduler_options") or None) or {}, "scheduler_options"
            ),
            max_hourly_cost=_positive(_pick("max-hourly-cost", a("max_hourly_cost")), "max_hourly_cost"),
            idle_timeout=_duration(_pick("idle-timeout", a("idle_timeout")), "idle_timeout"),
            timeouts=a("timeouts") or {k: config.seconds(f"timeouts.{k}") for k in TIMEOUT_KEYS},
            uv_version=_pick("uv-version", a("uv_version")),
            index_url=_pick("index-url", a("index_url")),
            **jobsettings.build(_pick, a),
            server_limit=_server_limit(_pick("server-limit", a("server_limit"))),
            allow_fewer_workers=bool(_pick("allow-fewer-workers", a("allow_fewer_workers"))),
            python_downloads_json_url=_pick("python-downloads-json-url", a("python_downloads_json_url")),
            python_preference=_python_preference(_pick("python-preference", a("python_preference"))),
            **_keeping(a("keep_paid_servers"), a("keep_margin")),
            no_client_timeout=_duration(_pick("no-client-timeout", a("no_client_timeout")), "no_client_timeout"),
            max_lifetime=_duration(_pick("max-lifetime", a("max_lifetime")), "max_lifetime"),
        )

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], **overrides: Any) -> ClusterSettings:
        """The record of a cluster written to ``cluster.json``; ``overrides`` win (None: keep)."""
        stored = {_LEGACY_KEYS.get(k, k): v for k, v in metadata.items()}
        arguments = {k: stored[k] for k in STORED if k in stored}
        # Written before environments were chosen: the servers run the pinned stack.
        arguments.setdefault("environment", "minimal")
        arguments.update({k: v for k, v in overrides.items() if v is not None})
        return cls.build(**arguments)

    def metadata(self) -> dict[str, Any]:
        """The stored fields, as JSON values (read back by :meth:`from_metadata`)."""
        return {k: _plain(getattr(self, k)) for k in STORED}

    @property
    def locations(self) -> list[str]:
        """Where servers may go: the location, then the fallbacks not equal to it."""
        return [self.location] + [x for x in self.fallback_locations if x != self.location]

    @property
    def self_deleting(self) -> bool:
        """A policy the scheduler's server enforces on its own (it then holds the token)."""
        return any(x is not None for x in (self.idle_timeout, self.no_client_timeout, self.max_lifetime))

    @property
    def start_timeout(self) -> float:
        """The bound on a node's whole start: the sum of its phases' timeouts."""
        return sum(self.timeouts[k] for k in config.START_TIMEOUTS)

    def server_types(self, role: str) -> tuple[str, ...]:
        """The preference list of ``role``'s server types."""
        return self.scheduler_server_type if role == "scheduler" else self.worker_server_type

    def replace(self, **changes: Any) -> ClusterSettings:
        return dataclasses.replace(self, **changes)


def worker_count(workers: Any, n_workers: Any) -> int:
    """The initial worker count from ``workers=`` / ``n_workers=`` / ``hetzner.n-workers``."""
    if workers is not None and n_workers is not None and workers != n_workers:
        raise ConfigError("give the worker count once: workers= or n_workers=")
    count = workers if workers is not None else n_workers
    if count is None:
        count = config.get("n-workers")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ConfigError(f"workers must be a non-negative integer, got {count!r}")
    check_size(count, "starting the cluster")  # before a spec of that size is built
    return count


def workers_to_wait_for(value: Any, count: int) -> int:
    """How many of ``count`` initial workers the constructor waits for (``wait_for_workers=``
    or ``hetzner.wait-for-workers``): an int, a fraction of ``count`` (0 < x <= 1), or None
    for all of them."""
    if value is None:
        value = config.get("wait-for-workers")
    if value is None:
        return count
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"wait_for_workers must be a worker count or a fraction, got {value!r}")
    if isinstance(value, int):
        if not 0 <= value <= count:
            raise ConfigError(f"wait_for_workers must be between 0 and the {count} workers asked for, got {value}")
        return value
    if not 0 < value <= 1:
        raise ConfigError(f"wait_for_workers as a fraction must be in (0, 1], got {value!r}")
    return min(count, math.ceil(value * count - 1e-9))


def check_size(n: int, what: str) -> None:
    if n > MAX_WORKERS:
        raise ConfigError(
            f"{what} with {n} workers: a cluster's servers share one private network, and a "
            f"Hetzner network holds at most {SERVERS_PER_NETWORK} servers, so at most "
            f"{MAX_WORKERS} workers besides the scheduler (choose larger server types for more cores)"
        )


def check_server_limit(settings: ClusterSettings, workers: int, what: str) -> None:
    """Refuse a size past ``hetzner.server-limit`` before any server is created."""
    limit = settings.server_limit
    if limit is not None and workers + 1 > limit:
        raise ConfigError(
            f"{what} with {workers} workers needs {workers + 1} servers (with the scheduler), more than "
            f"hetzner.server-limit={limit}, the account's server limit as you set it; raise the limit in "
            "the Hetzner Cloud Console (Limits) and this setting, or use fewer, larger servers"
        )


def check_same_zone(locations: Mapping[str, Any], location: str, fallbacks: Iterable[str]) -> None:
    """Fallback locations must be known and in the location's network zone (one network)."""
    zone = locations[location].network_zone
    for other in fallbacks:
        if other not in locations:
            raise ConfigError(
                f"unknown fallback location {other!r}; valid locations: {', '.join(sorted(locations))}"
            )
        if locations[other].network_zone != zone:
            raise ConfigError(
                f"fallback location {other} is in network zone {locations[other].network_zone}, "
                f"but {location} is in {zone}: one private network cannot span them"
            )


def _pick(key: str, value: Any) -> Any:
    return dask.config.get(f"hetzner.{key}", override_with=value)


def _python_preference(value: Any) -> str | None:
    choices = ("only-managed", "managed", "system", "only-system")
    if value is not None and value not in choices:
        raise ConfigError(f"python_preference must be one of {', '.join(choices)}, got {value!r}")
    return value


def _server_limit(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"server_limit must be a whole number of servers (1 or more), got {value!r}")
    return value
def _type_list(value: Any, what: str) -> tuple[str, ...]:
    """A server type or a preference list of them: ``"cx33"``, ``"cx33,cpx32"`` or a list."""
    if value is None or value == "":  # not given: the configured one, as ever
        value = _pick(what.replace("_", "-"), None)
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(x, str) for x in value):
        raise ConfigError(f"{what} must be a server type name or a list of them, got {value!r}")
    names = tuple(x.strip() for x in value)
    if not names or not all(names):
        raise ConfigError(f"{what} must name at least one server type, got {value!r}")
    twice = sorted({x for x in names if names.count(x) > 1})
    if twice:
        raise ConfigError(f"{what} lists {', '.join(twice)} more than once")
    return names


def _keeping(keep: Any, margin: Any) -> dict[str, Any]:
    """``keep_paid_servers`` and ``keep_margin`` (a duration >= 0, below one billed hour)."""
    keep = _pick("keep-paid-servers", keep)
    if not isinstance(keep, bool):
        raise ConfigError(f"keep_paid_servers must be true or false, got {keep!r}")
    value = _pick("keep-margin", margin)
    text = str(value).strip()
    try:  # parse_timedelta refuses a sign: "-1m" is a negative margin, said as such below
        seconds = dask.utils.parse_timedelta(text.lstrip("-"), default="seconds")
    except (TypeError, ValueError, KeyError):
        raise ConfigError(f"keep_margin must be a duration, got {value!r}") from None
    if seconds is not None and text.startswith("-"):
        seconds = -seconds
    hour = config.seconds("billing-hour")
    if seconds is None or not 0 <= seconds < hour:
        raise ConfigError(f"keep_margin must be at least 0 and below hetzner.billing-hour ({hour:g} s), got {value!r}")
    return {"keep_paid_servers": keep, "keep_margin": float(seconds)}


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


def _duration(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):  # seconds (parse_timedelta refuses negative ones)
        return _positive(value, what)
    try:
        parsed = dask.utils.parse_timedelta(value, default="seconds")
    except (TypeError, ValueError, KeyError):
        raise ConfigError(f"{what} must be a duration, got {value!r}") from None
    return _positive(parsed, what)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value
