"""The HTTP API under ``/v1``: auth, errors, rate-limit headers, validation, faults, dispatch.

One catch-all aiohttp handler does the routing itself so that unknown paths,
wrong methods and malformed input get Hetzner's error bodies, never aiohttp's.
What each route does is in ``handlers.py`` (table: ``routes.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import pythons
from .faults import API_FAULTS, FaultRule, FaultSet
from .listing import QUERY_ERROR_STATUS
from .ratelimit import RateLimiter, RateLimitState
from .replies import Ctx, Reply, Route
from .routes import ROUTES, check_routes_against_spec
from .schema import Operation, Spec
from .store import ApiError, Effects, Store, invalid_input, not_found
from .timing import Timing
from .validation import ResponseChecker

__all__ = ["ROUTES", "Api", "Stats", "check_routes_against_spec"]

log = logging.getLogger(__name__)


@dataclass
class Stats:
    """Requests by ``"METHOD /template"``, answers by status, and 429s."""

    requests: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)  # 2xx answers by "METHOD /template"
    statuses: Counter[int] = field(default_factory=Counter)
    rate_limited: int = 0
    total: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "rate_limited": self.rate_limited,
            "requests": dict(self.requests),
            "ok": dict(self.ok),
            "statuses": dict(self.statuses),
        }

    def __getitem__(self, key: str) -> Any:  # stats["total"], like the dict of as_dict()
        return self.as_dict()[key]

    def reset(self) -> None:
        self.requests.clear()
        self.ok.clear()
        self.statuses.clear()
        self.rate_limited = 0
        self.total = 0

    def count(self, key: str, status: int) -> None:
        self.requests[key] += 1
        self.statuses[status] += 1
        if 200 <= status < 300:
            self.ok[key] += 1
        if status == 429:
            self.rate_limited += 1


@dataclass
class Faults:
    """What the fault rules matching one request do to it (docs/simulator.md, faults)."""

    effects: Effects = field(default_factory=Effects)  # on the actions it creates
    delay: float = 0.0  # its answer is held that long
    after_error: FaultRule | None = None  # answered once the request is applied
    error: FaultRule | None = None  # answered at once


def _error(exc: ApiError, headers: dict[str, str] | None = None) -> Reply:
    return Reply(exc.status, exc.body(), dict(headers or {}))


def _fault_reply(rule: FaultRule, rl: RateLimitState) -> Reply:
    kind = API_FAULTS[rule.kind]
    assert kind.status is not None and kind.code is not None
    details: dict[str, Any] | None = None
    if rule.kind == "resource_limit_exceeded":
        details = {"limits": [{"name": "server_limit"}]}
    elif rule.kind == "uniqueness_error":
        details = {"fields": [{"name": str(rule.params.get("field") or "name")}]}
    headers = {}
    if rule.kind == "rate_limit":
        headers = {**rl.headers(), "RateLimit-Remaining": "0"}
    return Reply(kind.status, ApiError(kind.status, kind.code, kind.message, details).body(), headers)


async def _read_body(request: web.Request, op: Operation) -> Any:
    if request.method.upper() not in ("POST", "PUT"):
        return None
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, "request_entity_too_large", "request body too large") from None
    if raw.strip():
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "json_error", "invalid JSON in request body") from None
    return {} if op.has_body else None


class Api:
    """State shared by every request of one simulator."""

    def __init__(
        self,
        *,
        store: Store,
        spec: Spec,
        faults: FaultSet,
        ratelimiter: RateLimiter,
        timing: Timing,
        token: str,
        validate_responses: bool = False,
        readonly_token: str | None = None,
    ):
        self.store = store
        self.spec = spec
        self.faults = faults
        self.ratelimiter = ratelimiter
        self.timing = timing
        self.token = token
        self.readonly_token = readonly_token
        self.validate_responses = validate_responses
        self.stats = Stats()
        self.violations: list[str] = []
        self.checker = ResponseChecker(spec, self.violations)
        self._spec_paths = [
            (re.compile("^" + re.sub(r"\{\w+\}", "[^/]+", op.path) + "$"), op.method) for op in spec.operations()
        ]
        for route in ROUTES:  # a typo in an operation id would only show up at runtime
            spec.operation_by_id(route.operation_id)

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=4 * 1024 * 1024)
        # Beside the API, no token: a mirror of uv's Python downloads (sim/pythons.py).
        app.router.add_get("/python/{name}", self.python_mirror)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def python_mirror(self, request: web.Request) -> web.StreamResponse:
        data = await asyncio.to_thread(pythons.archive)
        name = request.match_info["name"]
        if name == "downloads.json":
            base = f"{request.scheme}://{request.host}"
            return web.json_response(pythons.downloads(base, data))
        if name == pythons.archive_name():
            return web.Response(body=data, content_type="application/gzip")
        raise web.HTTPNotFound()

    # -- the one handler -----------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        method = request.method.upper()
        full = request.path
        self.stats.total += 1
        rl = self.ratelimiter.consume()
        headers = {**rl.headers(), "X-Correlation-Id": secrets.token_hex(8)}
        info: dict[str, Any] = {"op": None, "template": "?"}
        try:
            reply = await self._dispatch(request, method, full, rl, info)
        except ApiError as exc:
            reply = _error(exc)
        except Exception as exc:  # a simulator bug must still answer like Hetzner would
            log.exception("simulator error on %s %s", method, full)
            self.violations.append(f"unhandled {exc!r} on {method} {full}")
            reply = Reply(500, ApiError(500, "server_error", f"simulator error: {exc!r}").body())
        text = None if reply.body is None else json.dumps(reply.body).encode()
        if self.validate_responses and info["op"] is not None:
            checked = self.checker.check(info["op"], reply, text)
            if checked is not reply:
                reply, text = checked, json.dumps(checked.body).encode()
        self.stats.count(f"{method} {info['template']}", reply.status)
        headers.update(reply.headers)
        if reply.body is None:
            return web.Response(status=reply.status, headers=headers)
        return web.Response(status=reply.status, body=text, headers=headers, content_type="application/json")

    async def _dispatch(
        self, request: web.Request, method: str, full: str, rl: RateLimitState, info: dict[str, Any]
    ) -> Reply:
        """Auth, rate limit, latency, routing, faults, validation, then the route's handler."""
        if not (full == "/v1" or full.startswith("/v1/")):
            raise not_found()
        path = full[3:] or "/"
        auth = request.headers.get("Authorization", "")
        if self.readonly_token and auth == f"Bearer {self.readonly_token}":
            if method != "GET":  # Hetzner's "Read" tokens (the spec's 401 token_readonly)
                raise ApiError(401, "token_readonly", "The token is only allowed to perform GET requests.")
        elif auth != f"Bearer {self.token}":
            raise ApiError(401, "unauthorized", "unable to authenticate")
        route, path_params, allowed = self._match(method, path)
        if route is not None:
            info["op"], info["template"] = route.operation_id, route.template
        if not rl.allowed:
            return Reply(
                429, ApiError(429, "rate_limit_exceeded", f"limit of {rl.limit} requests per hour reached").body()
            )
        latency = self.timing.api_latency(
            create_server=route is not None and route.operation_id == "create_server"
        )
        if latency > 0:
            await asyncio.sleep(latency)
        if route is None:
            raise self._no_route(method, path, allowed)
        op = self.spec.operation_by_id(route.operation_id)
        body = await _read_body(request, op)
        faults = self._faults(method, path, body)
        if faults.error is not None:
            return _fault_reply(faults.error, rl)
        ctx = self._context(request, op, path_params, body, full)
        reply = self._run(route, ctx, faults.effects)
        if method != "GET":
            self.store.sync_firewalls()
        if faults.delay > 0:
            await asyncio.sleep(faults.delay)
        if faults.after_error is not None:
            reply = _fault_reply(faults.after_error, rl)
        return reply

    # -- its steps -------------------------------------------------------------
    def _match(self, method: str, path: str) -> tuple[Route | None, dict[str, int], set[str]]:
        allowed: set[str] = set()
        for route in ROUTES:
            m = route.regex.match(path)
            if m is None:
                continue
            if route.method == method:
                return route, {k: int(v) for k, v in m.groupdict().items()}, allowed
            allowed.add(route.method)
        return None, {}, allowed

    def _no_route(self, method: str, path: str, allowed: set[str]) -> ApiError:
        """405 for a known path, 404 "not implemented" for a spec path the simulator lacks."""
        spec_methods = {m for regex, m in self._spec_paths if regex.match(path)}
        if allowed or (spec_methods and method not in spec_methods):
            return ApiError(405, "method_not_allowed", "the request method is not allowed")
        if spec_methods:
            return ApiError(404, "not_found", "not implemented by the dask_hetzner simulator")
        return not_found()

    def _faults(self, method: str, path: str, body: Any) -> Faults:
        """Fault rules: errors answer at once (or after applying), effects shape actions."""
        out = Faults()
        for rule in self.faults.api_rules():
            if not rule.matches_request(method, path, body, self.store.server_count()):
                continue
            if rule.kind == "slow_action":
                out.effects.slow.append(rule)
            elif rule.kind == "action_error":
                out.effects.errors.append(rule)
            elif rule.kind == "slow_response" or (rule.kind == "uniqueness_error" and "delay" in rule.params):
                out.delay = max(out.delay, self.timing.scale(float(rule.params.get("delay") or 0.0)))
            elif rule.params.get("after_effect"):
                out.after_error = out.after_error or rule
            else:
                out.error = rule  # the rules after it are not even matched
                break
        return out

    def _context(
        self, request: web.Request, op: Operation, path_params: dict[str, int], body: Any, full: str
    ) -> Ctx:
        """The handler's context, once the query and the body passed the spec."""
        query_multi: dict[str, list[str]] = {}
        for k, v in request.query.items():
            query_multi.setdefault(k, []).append(v)
        query, qerrors = self.spec.parse_query(op.operation_id, query_multi)
        if qerrors:
            raise invalid_input(qerrors, status=QUERY_ERROR_STATUS)
        if op.has_body:
            errors = self.spec.request_errors(op.operation_id, body)
            if errors:
                raise invalid_input(errors)
        return Ctx(
            store=self.store,
            path=path_params,
            query=query,
            body=body,
            url=f"{request.scheme}://{request.host}{full}",
            raw_query=list(request.query.items()),
        )

    def _run(self, route: Route, ctx: Ctx, effects: Effects) -> Reply:
        self.store.effects = effects
        try:
            return route.handler(ctx)
        except ApiError as exc:
            return _error(exc)
        finally:
            self.store.effects = None
