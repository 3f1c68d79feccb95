"""Workers that join the cluster after its start, each when its server is ready.

``LateWorkers``: the initial workers past ``wait_for_workers`` and the successors of failed
workers are provisioned outside ``SpecCluster``'s plan, so nothing that waits for the plan
(``with cluster``, ``await cluster``, a scale-up) waits for them; each joins the plan once
its server is ready (SpecCluster then only starts its node, which takes the ready server).

``Replacements``: a worker that fails to start after the cluster is up (a late one, or a
scale-up's) gets one successor under a new name, or is named in an error; never lost
silently. A new name, not the same one: the failed server may still be being deleted, and Hetzner's
server names are unique in a project. The successor goes through the same provisioning, so
it honours the preference lists (a type that was just sold out is tried last) and the
limits; one that fails too is not replaced again (a broken image or a sold-out zone would
otherwise create servers forever), nor is a worker stopped by the account's server limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .aio import cancelled
from .cloud import CloudError, ConfigError
from .nodes import user_options
from .provision.limits import is_limit
from .provision.tasks import Provisioner

# Called once a late worker's provisioning ended: (name, its spec, its failure or None).
Done = Callable[[str, dict[str, Any], "BaseException | None"], Awaitable[None]]


class LateWorkers:
    """Workers being provisioned outside the plan, until each is ready (or failed)."""

    def __init__(self, provisioner: Provisioner, done: Done) -> None:
        self.provisioner = provisioner
        self.done = done
        self.specs: dict[str, dict[str, Any]] = {}
        self._tasks: set[asyncio.Future[None]] = set()

    def __len__(self) -> int:
        return len(self.specs)

    def hold(self, specs: dict[str, dict[str, Any]]) -> None:
        """Initial workers whose provisioning began already: held until ``join_when_ready``."""
        self.specs.update(specs)

    def join_when_ready(self, names: list[str] | None = None) -> None:
        """Each of ``names`` (held ones; all by default) joins once its provisioning ends."""
        for name in list(self.specs) if names is None else names:
            self.spawn(self._join(name))

    def spawn(self, work: Awaitable[None]) -> None:
        """Run ``work`` (a join, or deciding on a failed worker's successor) in the background,
        held here so it is not collected mid-way, and cancelled by ``stop``."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def add(self, name: str, spec: dict[str, Any]) -> None:
        """A new worker (a successor): provisioned now, joins when ready."""
        self.specs[name] = spec
        self.provisioner.prestart(name, "worker", user_options(spec.get("options", {})))
        self.join_when_ready([name])

    async def _join(self, name: str) -> None:
        error = await self.provisioner.outcome(name)
        spec = self.specs.pop(name, None)
        if spec is not None:  # else dropped by a scale-down meanwhile
            await self.done(name, spec, error)

    def drop(self, names: list[str]) -> list[str]:
        """Take ``names`` out of the late ones (a scale-down; any thread): the ones that
        were late, whose provisioning ``cancel`` then ends (their servers deleted)."""
        return [n for n in names if self.specs.pop(n, None) is not None]

    async def cancel(self, names: list[str]) -> None:
        await asyncio.gather(*(self.provisioner.cancel(n) for n in names), return_exceptions=True)

    def newest(self, k: int) -> list[str]:
        """The ``k`` late workers a scale-down drops first (the last asked for)."""
        return list(self.specs)[::-1][: max(0, k)]

    async def stop(self) -> None:
        for task in list(self._tasks):
            await cancelled(task)
        self.specs.clear()


@dataclass
class Decision:
    replace: dict[str, str] = field(default_factory=dict)  # failed worker -> its successor
    given_up: dict[str, str] = field(default_factory=dict)  # failed worker -> why not replaced


@dataclass
class Replacements:
    """The successors made so far (successor -> the worker it replaces)."""

    of: dict[str, str] = field(default_factory=dict)

    def decide(
        self,
        errors: Mapping[str, BaseException],
        new_name: Callable[[], str],
        check: Callable[[int], None],
    ) -> Decision:
        """Which of the failed workers (``errors``: name -> its failure) get a successor.
        ``check(k)``: raises ``ConfigError`` when k more workers do not fit the limits."""
        decision = Decision()
        wanted = []
        for name, error in errors.items():
            if name in self.of:
                decision.given_up[name] = f"it replaced {self.of[name]}, which failed too"
            elif isinstance(error, CloudError) and is_limit(error):
                decision.given_up[name] = "the account's server limit is reached"
            else:
                wanted.append(name)
        if wanted:
            try:
                check(len(wanted))
            except ConfigError as e:
                decision.given_up.update({name: str(e) for name in wanted})
                wanted = []
        for name in wanted:
            successor = new_name()
            self.of[successor] = name
            decision.replace[name] = successor
        return decision


def reason(error: BaseException) -> str:
    """A failure's first line (its class when it has no message)."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def describe(errors: Mapping[str, BaseException]) -> str:
    """``worker-2 (its failure's first line)``, one a worker."""
    return "; ".join(f"{name} ({reason(e)})" for name, e in errors.items())
