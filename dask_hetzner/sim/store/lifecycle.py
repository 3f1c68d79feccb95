"""A server's life after ``POST /servers``: create -> start -> running, its host, host faults.

One task per server runs its lifecycle; reaching ``running`` boots its host through the
HostManager contract (docs/design.md) and arms the host faults (docs/simulator.md, faults).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..faults import FaultRule
from .actions import Action, Core
from .server_model import Server
from .servers import Created, ServerStore

log = logging.getLogger(__name__)

_CREATION_FAILED = {"code": "action_failed", "message": "server creation failed"}


class Lifecycle:
    def __init__(
        self, core: Core, servers: ServerStore, hosts: Any, host_spec: Callable[..., Any] | None
    ) -> None:
        self.core = core
        self.servers = servers
        self.hosts = hosts
        self.host_spec = host_spec

    def begin(self, created: Created) -> None:
        server = created.server
        server.busy = created.action
        server.task = self.core.spawn(self._lifecycle(server, created.action, created.start, created.extra))

    async def _lifecycle(self, server: Server, create: Action, start: Action | None, extra: list[Action]) -> None:
        ok = await self.core.run_action(create)
        server.timings.mark("created")
        for action in extra:
            action.duration = 0.0 if ok else action.duration
            if not ok:
                action.fail = dict(_CREATION_FAILED)
            self.core.spawn(self.servers.networks.run_attach(server, action))
        if not ok:
            server.busy = None
            server.status = "off"
            if start is not None:
                start.finish(dict(_CREATION_FAILED))
            return
        if start is None:
            server.busy = None
            server.status = "off"
            return
        server.status = "starting"
        server.busy = start
        ok = await self.core.run_action(start)
        server.busy = None
        if not ok:
            server.status = "off"
            return
        await self.running(server)

    def _matching(self, kind: str, server: Server) -> list[FaultRule]:
        return [
            rule
            for rule in self.core.faults.host_rules(kind)
            if rule.matches_server(server.id, server.name, server.labels)
        ]

    async def running(self, server: Server) -> None:
        """The server is up: boot its host, arm host faults."""
        server.status = "running"
        server.timings.mark("running")
        for rule in self._matching("server_vanishes", server):
            self.core.spawn(self.vanish_later(server, rule))
        ssh_delay = self.core.timing.ssh_delay()
        server.timings.drawn.setdefault("ssh_delay", ssh_delay)
        for rule in self._matching("slow_boot", server):
            extra = self.core.timing.scale(float(rule.params.get("delay", 60.0)))
            ssh_delay += extra
            server.timings.drawn["slow_boot"] = server.timings.drawn.get("slow_boot", 0.0) + extra
        ssh_never = any(
            rule.matches_server(server.id, server.name, server.labels)
            for rule in self.core.faults.host_rules("ssh_never")
        )
        if ssh_never:
            server.timings.drawn["ssh_never"] = 1.0
        # docs/simulator.md, fault `cloud_init_fails`: nothing of the user data is applied.
        crashed = bool(self._matching("cloud_init_fails", server))
        if crashed:
            server.timings.drawn["cloud_init_fails"] = 1.0
        if not await self._boot_host(server, ssh_delay, ssh_never, crashed):
            return
        server.timings.mark("booted")
        if not ssh_never:  # hosts listen ssh_delay after boot returns
            server.timings.phases["ssh_expected"] = server.timings.phases["booted"] + ssh_delay
        for rule in self._matching("processes_die", server):
            self.core.spawn(self.kill_later(server, rule))
        for rule in self._matching("ssh_drop", server):
            self.core.spawn(self.drop_ssh_later(server, rule))
        try:
            self._configure_nics(server)
        except OSError as exc:  # a host manager without directories (a recording stand-in)
            log.debug("server %s: no NIC state written: %r", server.id, exc)

    async def _boot_host(self, server: Server, ssh_delay: float, ssh_never: bool, crashed: bool = False) -> bool:
        """``hosts.boot``; False if the host failed (recorded in ``host_errors``). ``crashed``:
        cloud-init applied neither the user data nor the SSH keys."""
        if self.hosts is None or self.host_spec is None:
            return True
        spec = self.host_spec(
            server_id=server.id,
            name=server.name,
            public_ip=server.host_ip,
            private_ips=[nic.ip for nic in server.private.values()],
            authorized_keys=[] if crashed else list(server.authorized_keys),
            user_data=None if crashed else server.user_data,
            snapshot=server.image.id if server.image.type != "system" else None,
            memory_gb=server.server_type.memory,
        )
        server.host_exists = True
        try:
            await self.hosts.boot(spec, ssh_delay=ssh_delay, ssh_never=ssh_never)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken host is a broken server, not a broken API
            log.exception("host boot failed for server %s", server.id)
            self.core.host_errors.append(f"boot {server.id}: {exc!r}")
            return False
        return True

    def _configure_nics(self, server: Server) -> None:
        """The addresses ``ip addr`` shows inside the server (the ``ip`` shim): the public one
        at once, the private one a moment later (docs/simulator.md, fault `private_nic_missing`)."""
        if self.hosts is None or self.host_spec is None:
            return
        sim_dir = Path(self.hosts.directory(server.id)) / ".sim"
        sim_dir.mkdir(parents=True, exist_ok=True)
        (sim_dir / "nics").write_text(f"eth0 {server.host_ip}\n")
        private = "".join(f"enp{7 + i}s0 {nic.ip}\n" for i, nic in enumerate(server.private.values()))
        missing = self._matching("private_nic_missing", server)
        delay = self.core.timing.private_nic_delay()
        if not missing and delay <= 0:
            with open(sim_dir / "nics", "a") as f:
                f.write(private)
            return
        (sim_dir / "nics.pending").write_text(private)
        if any(str(r.params.get("nudge", "")).lower() in ("1", "true") for r in missing):
            (sim_dir / "nudge-fixes").touch()
        if not missing:
            self.core.spawn(self._nics_later(sim_dir, delay))

    async def _nics_later(self, sim_dir: Path, delay: float) -> None:
        await asyncio.sleep(delay)
        _apply_pending_nics(sim_dir)

    # -- host faults ---------------------------------------------------------
    async def kill_later(self, server: Server, rule: FaultRule) -> None:
        """docs/simulator.md, fault `processes_die`."""
        await asyncio.sleep(self.core.timing.scale(float(rule.params.get("after") or 0.0)))
        self.kill_processes(server)

    def kill_processes(self, server: Server) -> None:
        if server.id not in self.servers.items or server.status != "running":
            return
        server.timings.mark("processes_died")
        if self.hosts is not None and server.host_exists:
            try:
                self.hosts.kill_processes(server.id)
            except Exception as exc:
                log.exception("kill_processes failed for server %s", server.id)
                self.core.host_errors.append(f"kill_processes {server.id}: {exc!r}")

    async def drop_ssh_later(self, server: Server, rule: FaultRule) -> None:
        """docs/simulator.md, fault `ssh_drop`."""
        await asyncio.sleep(self.core.timing.scale(float(rule.params.get("after") or 0.0)))
        if self.servers.items.get(server.id) is not server or server.status != "running":
            return
        server.timings.mark("ssh_dropped")
        if self.hosts is not None and server.host_exists and hasattr(self.hosts, "drop_ssh"):
            down = self.core.timing.scale(float(rule.params.get("down") or 0.0))
            new_key = bool(rule.params.get("new_host_key"))
            try:
                await self.hosts.drop_ssh(server.id, down=down, new_host_key=new_key)
            except Exception as exc:
                log.exception("drop_ssh failed for server %s", server.id)
                self.core.host_errors.append(f"drop_ssh {server.id}: {exc!r}")

    async def vanish_later(self, server: Server, rule: FaultRule) -> None:
        """docs/simulator.md, fault `server_vanishes`."""
        await asyncio.sleep(self.core.timing.scale(float(rule.params.get("after") or 0.0)))
        await self.vanish(server)

    async def vanish(self, server: Server) -> None:
        """The server disappears: no action, no API call; its host is destroyed."""
        if self.servers.items.get(server.id) is not server:
            return
        if server.task is not None and server.task is not asyncio.current_task():
            server.task.cancel()
        self.servers.remove(server)
        server.timings.mark("vanished")
        await self.host_call("destroy", server)

    async def host_call(self, method: str, server: Server) -> None:
        """``hosts.<method>(server_id)``; a failure is recorded, never raised."""
        if self.hosts is None or not server.host_exists:
            return
        try:
            await getattr(self.hosts, method)(server.id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("hosts.%s failed for server %s", method, server.id)
            self.core.host_errors.append(f"{method} {server.id}: {exc!r}")


def _apply_pending_nics(sim_dir: Path) -> None:
    """The private NIC is configured now (what the ``udevadm`` shim does on a nudge)."""
    pending = sim_dir / "nics.pending"
    if pending.exists():
        with open(sim_dir / "nics", "a") as f:
            f.write(pending.read_text())
        pending.unlink(missing_ok=True)
