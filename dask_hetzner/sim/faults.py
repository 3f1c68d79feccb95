"""Fault rules: the failures Hetzner really produces, injected on purpose.

A rule matches requests (API faults) or servers (host faults):

* ``method`` (e.g. ``"POST"`` or ``"POST|DELETE"``) and ``path`` (a regex searched
  in the path below ``/v1``, e.g. ``r"^/servers$"``); each kind has defaults;
* ``name`` (regex, full match) on the request body's ``name`` or the server name,
  ``location`` / ``server_type`` on a create request's body,
  ``label_selector`` / ``server_id`` on servers (host faults);
* ``nth``: fire first on the nth matching call (1-based);
* ``count``: fire at most this often (default unlimited; 1 when ``nth`` is given);
* ``probability`` with ``seed``: fire on that fraction of matching calls.

``hits`` counts how often a rule fired, ``seen`` how many calls matched.
Durations in parameters are simulated seconds, multiplied by ``time_scale``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .labels import Selector, parse_selector

_MUTATING = "POST|PUT|DELETE"
_CREATE = r"^/(servers|ssh_keys|networks|firewalls|placement_groups)$"


@dataclass(frozen=True)
class Kind:
    status: int | None  # HTTP status of the error it answers, None for effects
    code: str | None
    message: str
    method: str | None = None
    path: str | None = None
    params: tuple[str, ...] = ()


API_FAULTS: dict[str, Kind] = {
    # 412 on create: "error during placement" (the most common one).
    "resource_unavailable": Kind(412, "resource_unavailable", "error during placement", "POST", r"^/servers$"),
    # 403 once the project holds `after` servers.
    "resource_limit_exceeded": Kind(
        403, "resource_limit_exceeded", "server limit exceeded", "POST", r"^/servers$", ("after",)
    ),
    "rate_limit": Kind(429, "rate_limit_exceeded", "limit of 3600 requests per hour reached"),
    "locked": Kind(
        423,
        "locked",
        "resource is locked by a running action",
        _MUTATING,
        r"^/(servers|networks|firewalls|placement_groups)/\d+",
    ),
    # The create action (or `command`) ends in error although the server exists.
    "action_error": Kind(None, None, "action failed", "POST", r"^/servers$", ("command", "code", "message")),
    # Plain server-side errors; `after_effect=True` applies the request first.
    "server_error": Kind(500, "server_error", "internal server error", params=("after_effect",)),
    "unavailable": Kind(503, "unavailable", "service temporarily unavailable", params=("after_effect",)),
    "unknown_error": Kind(500, "unknown_error", "unknown error", params=("after_effect",)),
    "bad_gateway": Kind(502, "bad_gateway", "bad gateway", params=("after_effect",)),
    "timeout": Kind(504, "timeout", "request timed out", params=("after_effect",)),
    "resource_in_use": Kind(422, "resource_in_use", "resource is still in use", "DELETE", r"^/(firewalls|networks)/\d+$"),
    # 409; with `delay` the request succeeds but the answer comes `delay` s late
    # (a client timeout then retries and meets the real uniqueness error).
    "uniqueness_error": Kind(409, "uniqueness_error", "name is already used", "POST", _CREATE, ("field", "delay")),
    "placement_error": Kind(422, "placement_error", "error during placement", "POST", r"^/servers$"),
    # 422 for a spread group that holds 10 servers, as Hetzner answers it today.
    "placement_group_member_limit_reached": Kind(
        422, "placement_group_member_limit_reached", "placement group contains already 10 servers", "POST", r"^/servers$"
    ),
    "conflict": Kind(
        409,
        "conflict",
        "resource has changed during the request, please retry",
        _MUTATING,
        r"^/(networks|firewalls|placement_groups)(/|$)",
    ),
    # Actions created by the request take `duration` s (None: never finish).
    "slow_action": Kind(None, None, "", _MUTATING, None, ("duration", "command")),
    # The request is applied, its answer delayed by `delay` s.
    "slow_response": Kind(None, None, "", None, None, ("delay",)),
}

HOST_FAULTS: dict[str, tuple[str, ...]] = {
    "ssh_never": (),  # SSH never comes up on the matched server
    "slow_boot": ("delay",),  # extra seconds before SSH
    "processes_die": ("after",),  # every process dies `after` s past boot (SSH stays)
    "server_vanishes": ("after",),  # gone from the API and destroyed, `after` s past running
    # Every SSH connection is cut `after` s past boot; sshd refuses for `down` s, then is back
    # (`new_host_key=1`: with a host key of its own, as another machine at that address).
    "ssh_drop": ("after", "down", "new_host_key"),
    # cloud-init crashes on first boot: neither user_data (the pinned host key) nor the
    # create request's ssh_keys (root's authorized_keys) are applied; the image's own
    # generated host key is offered and every client key refused.
    "cloud_init_fails": (),
    # The private NIC never gets its address (`nudge=1`: until `udevadm trigger` on the server).
    "private_nic_missing": ("nudge",),
}

KINDS = tuple(API_FAULTS) + tuple(HOST_FAULTS)
_MATCH_KEYS = (
    "method",
    "path",
    "nth",
    "count",
    "probability",
    "seed",
    "name",
    "location",
    "server_type",
    "label_selector",
    "server_id",
)


@dataclass(eq=False)
class FaultRule:
    kind: str
    method: str | None = None
    path: str | None = None
    nth: int | None = None
    count: int | None = None
    probability: float | None = None
    seed: int | None = None
    name: str | None = None
    location: str | None = None
    server_type: str | None = None
    label_selector: str | None = None
    server_id: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    hits: int = 0
    seen: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; known: {', '.join(KINDS)}")
        allowed = API_FAULTS[self.kind].params if self.is_api else HOST_FAULTS[self.kind]
        unknown = set(self.params) - set(allowed)
        if unknown:
            raise ValueError(f"fault {self.kind!r} takes no parameter(s) {sorted(unknown)}; it takes {allowed}")
        if self.is_api:
            kind = API_FAULTS[self.kind]
            self.method = (self.method or kind.method or "").upper() or None
            self.path = self.path if self.path is not None else kind.path
        if self.nth is not None and self.count is None:
            self.count = 1
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError("probability must be within [0, 1]")
        self._rng = random.Random(self.seed)
        self._path_re = re.compile(self.path) if self.path else None
        self._name_re = re.compile(self.name) if self.name else None
        self._selector: Selector | None = parse_selector(self.label_selector) if self.label_selector else None

    @property
    def is_api(self) -> bool:
        return self.kind in API_FAULTS

    @property
    def exhausted(self) -> bool:
        return self.count is not None and self.hits >= self.count

    def _fire(self) -> bool:
        """Count a matching call and decide whether the fault strikes."""
        self.seen += 1
        if self.nth is not None and self.seen < self.nth:
            return False
        if self.exhausted:
            return False
        if self.probability is not None and self._rng.random() >= self.probability:
            return False
        self.hits += 1
        return True

    def matches_request(self, method: str, path: str, body: Any, server_count: int) -> bool:
        if self.method and method.upper() not in self.method.split("|"):
            return False
        if self._path_re and not self._path_re.search(path):
            return False
        fields = body if isinstance(body, Mapping) else {}
        if self._name_re and not self._name_re.fullmatch(str(fields.get("name", ""))):
            return False
        if self.location is not None and str(fields.get("location")) != self.location:
            return False
        if self.server_type is not None and str(fields.get("server_type")) != self.server_type:
            return False
        if self.kind == "resource_limit_exceeded" and server_count < int(self.params.get("after", 0)):
            return False
        return self._fire()

    def matches_server(self, server_id: int, name: str, labels: Mapping[str, str]) -> bool:
        if self.server_id is not None and server_id != self.server_id:
            return False
        if self._name_re and not self._name_re.fullmatch(name):
            return False
        if self._selector and not self._selector.matches(labels):
            return False
        return self._fire()

    def describe(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in _MATCH_KEYS if getattr(self, k) is not None}
        return {"kind": self.kind, **out, **self.params, "hits": self.hits, "seen": self.seen}


def make_rule(kind: str, **kwargs: Any) -> FaultRule:
    """Split keyword arguments into matching keys and kind parameters."""
    match = {k: kwargs.pop(k) for k in list(kwargs) if k in _MATCH_KEYS}
    return FaultRule(kind=kind, params=kwargs, **match)


def _parse_value(raw: str) -> Any:
    low = raw.lower()
    if low in ("none", "null", "never"):
        return None
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    return raw


def parse_fault(spec: str) -> FaultRule:
    """``'kind:key=value,key=value'`` (the command line's ``--fault``)."""
    kind, _, rest = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"fault parameter {part!r} is not key=value")
        key = key.strip()
        # Regexes and names stay strings even when they look like numbers.
        kwargs[key] = value if key in ("path", "name", "label_selector", "method") else _parse_value(value)
    return make_rule(kind.strip(), **kwargs)


class FaultSet:
    """The active rules, in the order they were injected."""

    def __init__(self) -> None:
        self.rules: list[FaultRule] = []

    def add(self, rule: FaultRule) -> FaultRule:
        self.rules.append(rule)
        return rule

    def clear(self) -> None:
        self.rules.clear()

    def api_rules(self) -> list[FaultRule]:
        return [r for r in self.rules if r.is_api and not r.exhausted]

    def host_rules(self, kind: str) -> list[FaultRule]:
        return [r for r in self.rules if r.kind == kind and not r.exhausted]
