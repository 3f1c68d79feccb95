"""What a client does to an existing server: delete, power, networks, placement groups, snapshots."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

from ..catalog import Image
from .actions import Action
from .base import ApiError, invalid_input, labels_field_errors, not_found
from .lifecycle import Lifecycle
from .server_model import Server, check_unlocked

_POWER_ACTIONS = {
    "poweroff": "stop_server",
    "shutdown": "shutdown_server",
    "poweron": "start_server",
    "reboot": "reboot_server",
    "reset": "reset_server",
}


class ServerActions:
    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle
        self.core = lifecycle.core
        self.servers = lifecycle.servers

    def _task(self, server: Server, coro: Coroutine[Any, Any, None]) -> None:
        if server.task is not None and not server.task.done():
            server.task.cancel()  # e.g. a boot still waiting for SSH
        server.task = self.core.spawn(coro)

    # -- delete --------------------------------------------------------------
    def delete(self, server_id: int) -> Action:
        server = self.servers.get(server_id)
        if server.delete_action is not None:
            return server.delete_action
        action = self.core.new_action("delete_server", [(server.id, "server")])
        server.delete_action = action
        server.timings.mark("delete_requested")
        server.status = "deleting"
        server.task = self.core.spawn(self._delete(server, action, server.task))
        return action

    async def _delete(self, server: Server, action: Action, old: Any) -> None:
        if old is not None and not old.done():
            old.cancel()
            with contextlib.suppress(BaseException):
                await old
        # The power is cut at once and the action takes its own time, side by side: a
        # host slow to stop (a loaded machine) does not add to Hetzner's delete time.
        ok = await self.core.run_action(action, alongside=self.lifecycle.host_call("destroy", server))
        if not ok:
            # A delete action that failed leaves the server, powered off (still billed).
            server.delete_action = None
            server.status = "off"
            return
        server.timings.mark("deleted")
        self.servers.remove(server)

    # -- power ---------------------------------------------------------------
    def power(self, server_id: int, command: str) -> Action:
        """poweroff, shutdown, poweron, reboot, reset."""
        server = self.servers.get(server_id)
        check_unlocked(server)
        action = self.core.new_action(_POWER_ACTIONS[command], [(server.id, "server")])
        run: Callable[[Server, Action], Coroutine[Any, Any, None]]
        if command in ("poweroff", "shutdown"):
            idle, run = server.status == "off", self._stop(command == "shutdown")
        elif command == "poweron":
            idle, run = server.status == "running", self._start
        else:  # a reboot of a stopped server does nothing
            idle, run = server.status != "running", self._reboot
        if idle:
            return self.core.finish_now(action)  # nothing to do, still an action
        server.busy = action
        self._task(server, run(server, action))
        return action

    def _stop(self, shutdown: bool) -> Callable[[Server, Action], Coroutine[Any, Any, None]]:
        async def stop(server: Server, action: Action) -> None:
            if shutdown:
                server.status = "stopping"
            await self.lifecycle.host_call("power_off", server)
            ok = await self.core.run_action(action)
            server.busy = None
            if ok:
                server.status = "off"
                server.timings.mark("off")

        return stop

    async def _start(self, server: Server, action: Action) -> None:
        server.status = "starting"
        ok = await self.core.run_action(action)
        server.busy = None
        if ok:
            await self.lifecycle.running(server)
        else:
            server.status = "off"

    async def _reboot(self, server: Server, action: Action) -> None:
        await self.lifecycle.host_call("power_off", server)
        ok = await self.core.run_action(action)
        server.busy = None
        if ok:
            await self.lifecycle.running(server)

    # -- networks and placement groups ---------------------------------------
    def attach_network(self, server_id: int, body: dict[str, Any]) -> Action:
        server = self.servers.get(server_id)
        net = self.servers.networks.items.get(body["network"])
        if net is None:
            raise not_found("network")
        check_unlocked(server)
        self.servers.networks.attach(server, net, body.get("ip"), body.get("alias_ips") or ())
        action = self.core.new_action("attach_to_network", [(server.id, "server"), (net.id, "network")])
        self.core.spawn(self.servers.networks.run_attach(server, action))
        return action

    def detach_network(self, server_id: int, body: dict[str, Any]) -> Action:
        server = self.servers.get(server_id)
        net = self.servers.networks.items.get(body["network"])
        if net is None:
            raise not_found("network")
        if net.id not in server.private:
            raise ApiError(422, "server_not_attached", "server is not attached to the network")
        check_unlocked(server)
        self.servers.networks.detach(server, net)
        return self.core.finish_now(
            self.core.new_action("detach_from_network", [(server.id, "server"), (net.id, "network")])
        )

    def add_to_group(self, server_id: int, body: dict[str, Any]) -> Action:
        server = self.servers.get(server_id)
        pg = self.servers.groups.items.get(body["placement_group"])
        if pg is None:
            raise not_found("placement group")
        if server.placement_group is not None:
            raise ApiError(422, "already_in_placement_group", "server is already in a placement group")
        if server.status != "off":
            raise ApiError(422, "server_not_stopped", "server must be powered off")
        check_unlocked(server)
        self.servers.groups.join(server, pg)
        return self.core.finish_now(
            self.core.new_action("add_to_placement_group", [(server.id, "server"), (pg.id, "placement_group")])
        )

    def remove_from_group(self, server_id: int) -> Action:
        server = self.servers.get(server_id)
        if server.placement_group is None:
            raise ApiError(422, "not_in_placement_group", "server is not in a placement group")
        check_unlocked(server)
        pg_id = server.placement_group
        self.servers.groups.leave(server)
        return self.core.finish_now(
            self.core.new_action("remove_from_placement_group", [(server.id, "server"), (pg_id, "placement_group")])
        )

    # -- snapshots -----------------------------------------------------------
    def create_image(self, server_id: int, body: dict[str, Any]) -> tuple[Image, Action]:
        server = self.servers.get(server_id)
        errors = labels_field_errors(body.get("labels"))
        if errors:
            raise invalid_input(errors)
        check_unlocked(server)
        return self.servers.images.create_from(server, body)
