"""Actions and their progress, plus what every kind shares: ids, unique names, background tasks.

Everything here runs on the simulator's event loop; request handlers are plain
functions (no awaits), so a request's changes are atomic.  Actions advance in
asyncio tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from ..faults import FaultRule, FaultSet
from ..schema import FieldError
from ..timing import Timing
from .base import (
    get_or_404,
    hostname_errors,
    invalid_input,
    iso,
    labels_field_errors,
    name_errors,
    uniqueness_error,
)

log = logging.getLogger(__name__)

_FIRST_IDS = {
    "server": 1_000_000,
    "ssh_key": 2_000_000,
    "network": 3_000_000,
    "firewall": 4_000_000,
    "placement_group": 5_000_000,
    "primary_ip": 6_000_000,
    "image": 200_000_000,
    "action": 10_000_000,
}
NAMED_KINDS = ("server", "ssh_key", "network", "firewall", "placement_group")


@dataclass(eq=False)
class Action:
    id: int
    command: str
    resources: list[dict[str, Any]]
    started: float
    duration: float | None = 0.0  # None: never finishes
    fail: dict[str, str] | None = None  # error it will end with
    status: str = "running"
    finished: float | None = None
    error: dict[str, str] | None = None
    progress_value: int = 0
    _t0: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def begin(self) -> None:
        if self._t0 is None:
            self._t0 = time.monotonic()

    @property
    def progress(self) -> int:
        if self.status != "running":
            return self.progress_value
        if self._t0 is None or self.duration is None:
            return 0
        if self.duration <= 0:
            return 99
        frac = (time.monotonic() - self._t0) / self.duration
        return max(0, min(99, int(frac * 100)))

    def finish(self, error: dict[str, str] | None = None) -> None:
        if self.status != "running":
            return
        self.progress_value = self.progress if error else 100
        self.status = "error" if error else "success"
        self.error = error
        self.finished = time.time()
        self.done.set()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "command": self.command,
            "status": self.status,
            "progress": self.progress,
            "started": iso(self.started),
            "finished": iso(self.finished) if self.finished is not None else None,
            "resources": [dict(r) for r in self.resources],
            "error": dict(self.error) if self.error else None,
        }


@dataclass
class Effects:
    """Fault effects that apply to the actions one request creates."""

    slow: list[FaultRule] = field(default_factory=list)
    errors: list[FaultRule] = field(default_factory=list)
    created: int = 0


class Core:
    """The project's shared machinery: ids, names unique per kind, actions, background tasks."""

    def __init__(self, *, timing: Timing, faults: FaultSet) -> None:
        self.timing = timing
        self.faults = faults
        self.effects: Effects | None = None  # of the request being handled
        self.host_errors: list[str] = []
        self.actions: dict[int, Action] = {}
        self.names: dict[str, dict[str, int]] = {kind: {} for kind in NAMED_KINDS}
        self._ids = dict(_FIRST_IDS)
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- ids and names -------------------------------------------------------
    def next_id(self, kind: str) -> int:
        self._ids[kind] += 1
        return self._ids[kind]

    def claim_name(self, kind: str, name: str, obj_id: int, field_name: str = "name") -> None:
        owner = self.names[kind].get(name)
        if owner is not None and owner != obj_id:
            raise uniqueness_error(field_name, f"{kind.replace('_', ' ')} name is already used")

    def rename(self, kind: str, old: str, new: str, obj_id: int) -> None:
        self.claim_name(kind, new, obj_id)
        if self.names[kind].get(old) == obj_id:
            del self.names[kind][old]
        self.names[kind][new] = obj_id

    # -- background tasks ----------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("simulator task failed: %r", exc, exc_info=exc)
            self.host_errors.append(f"task failed: {exc!r}")

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait until background work that can finish has finished (tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = [t for t in self._tasks if not t.done() and not getattr(t, "_sim_stuck", False)]
            if not pending:
                return
            await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))

    async def cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    # -- actions -------------------------------------------------------------
    def new_action(
        self, command: str, resources: list[tuple[int, str]], duration: float | None = None
    ) -> Action:
        """A running action; request fault effects may make it slow or failing."""
        action = Action(
            id=self.next_id("action"),
            command=command,
            resources=[{"id": rid, "type": rtype} for rid, rtype in resources],
            started=time.time(),
            duration=self.timing.action(command) if duration is None else duration,
        )
        if self.effects is not None:
            self._apply_effects(action, self.effects)
        self.actions[action.id] = action
        return action

    def _apply_effects(self, action: Action, eff: Effects) -> None:
        """docs/simulator.md, faults `slow_action` and `action_error`."""
        first = eff.created == 0
        eff.created += 1
        for rule in eff.slow:
            if rule.params.get("command") in (None, action.command):
                d = rule.params.get("duration")
                action.duration = None if d is None else self.timing.scale(float(d))
        for rule in eff.errors:
            wanted = rule.params.get("command")
            if (wanted is None and first) or wanted == action.command:
                action.fail = {
                    "code": str(rule.params.get("code") or "action_failed"),
                    "message": str(rule.params.get("message") or "Action failed"),
                }

    async def run_action(self, action: Action, alongside: Awaitable[Any] | None = None) -> bool:
        """Let ``action`` take its time, then finish it; True on success.

        ``alongside`` runs meanwhile; the action finishes once both are done.
        """
        action.begin()
        work = [] if alongside is None else [alongside]
        if action.duration is None:
            await asyncio.gather(*work)
            task = asyncio.current_task()
            if task is not None:
                task._sim_stuck = True  # type: ignore[attr-defined]  # settle() must not wait for it
            await asyncio.Event().wait()  # until cancelled
        else:
            await asyncio.gather(asyncio.sleep(action.duration), *work)
        action.finish(action.fail)
        return action.status == "success"

    def finish_now(self, action: Action) -> Action:
        """Schedule an action that needs no lifecycle (networks, firewalls ...)."""
        self.spawn(self.run_action(action))
        return action

    def action(self, action_id: int) -> Action:
        return get_or_404(self.actions, action_id, "action")

    # -- names and labels of any kind ----------------------------------------
    def update_named(self, kind: str, obj: Any, body: dict[str, Any], hostname: bool = False) -> None:
        """PUT of a named resource: ``name`` (unique per kind) and ``labels``."""
        errors: list[FieldError] = []
        if "name" in body and body["name"] is not None:
            errors += hostname_errors(body["name"]) if hostname else name_errors(body["name"])
        if body.get("labels") is not None:
            errors += labels_field_errors(body["labels"])
        if errors:
            raise invalid_input(errors)
        if body.get("name") is not None and body["name"] != obj.name:
            self.rename(kind, obj.name, body["name"], obj.id)
            obj.name = body["name"]
        if body.get("labels") is not None:
            obj.labels = dict(body["labels"])
