"""Firewalls: ``/firewalls``, their rules and what they are applied to (servers, label selectors)."""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass, field
from typing import Any

from ..labels import Selector, SelectorError, parse_selector
from ..schema import FieldError
from .actions import Action, Core
from .base import (
    ApiError,
    get_or_404,
    invalid_input,
    iso,
    labels_field_errors,
    limit_exceeded,
    name_errors,
)
from .server_model import Server

FIREWALLS_PER_SERVER_MAX = 5
_MISSING = "Missing data for required field."


@dataclass(eq=False)
class Firewall:
    id: int
    name: str
    labels: dict[str, str]
    rules: list[dict[str, Any]]
    created: float
    servers: list[int] = field(default_factory=list)  # applied directly
    selectors: list[tuple[str, Selector]] = field(default_factory=list)  # applied by label selector

    def applies(self, server: Server) -> bool:
        if server.id in self.servers:
            return True
        return any(sel.matches(server.labels) for _, sel in self.selectors)


def _rule_errors(rule: dict[str, Any], name: str) -> list[FieldError]:
    errors: list[FieldError] = []
    proto = rule["protocol"]
    port = rule.get("port")
    if proto in ("tcp", "udp"):
        if not isinstance(port, str) or not re.fullmatch(r"(any|\d{1,5}(-\d{1,5})?)", port):
            errors.append(FieldError(f"{name}.port", "port must be a port or a port range"))
        else:
            nums = [int(p) for p in port.split("-")] if port != "any" else [1]
            if not all(1 <= n <= 65535 for n in nums) or nums != sorted(nums):
                errors.append(FieldError(f"{name}.port", "port out of range"))
    elif port is not None:
        errors.append(FieldError(f"{name}.port", f"port is not allowed for protocol {proto}"))
    key = "source_ips" if rule["direction"] == "in" else "destination_ips"
    ips = rule.get(key) or []
    if not ips:
        errors.append(FieldError(f"{name}.{key}", f"{key} is required for direction {rule['direction']}"))
    for j, cidr in enumerate(ips):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            errors.append(FieldError(f"{name}.{key}.{j}", "invalid CIDR"))
    return errors


def validate_rules(rules: list[dict[str, Any]], where: str = "rules") -> list[dict[str, Any]]:
    out = []
    errors: list[FieldError] = []
    for i, rule in enumerate(rules):
        errors += _rule_errors(rule, f"{where}.{i}")
        out.append(
            {
                "direction": rule["direction"],
                "source_ips": list(rule.get("source_ips") or []) if rule["direction"] == "in" else [],
                "destination_ips": list(rule.get("destination_ips") or []) if rule["direction"] == "out" else [],
                "protocol": rule["protocol"],
                "port": rule.get("port"),
                "description": rule.get("description"),
            }
        )
    if errors:
        raise invalid_input(errors)
    return out


class FirewallStore:
    def __init__(self, core: Core, servers: dict[int, Server]) -> None:
        self.core = core
        self.servers = servers
        self.items: dict[int, Firewall] = {}

    def get(self, firewall_id: int) -> Firewall:
        return get_or_404(self.items, firewall_id, "firewall")

    def of(self, server: Server) -> list[Firewall]:
        """The firewalls applied to a server, directly or by label selector."""
        return [fw for fw in self.items.values() if fw.applies(server)]

    def to_json(self, fw: Firewall) -> dict[str, Any]:
        applied: list[dict[str, Any]] = [{"type": "server", "server": {"id": sid}} for sid in fw.servers]
        for text, sel in fw.selectors:
            matched = [s.id for s in self.servers.values() if sel.matches(s.labels)]
            applied.append(
                {
                    "type": "label_selector",
                    "label_selector": {"selector": text},
                    "applied_to_resources": [{"type": "server", "server": {"id": sid}} for sid in matched],
                }
            )
        return {
            "id": fw.id,
            "name": fw.name,
            "labels": dict(fw.labels),
            "created": iso(fw.created),
            "rules": [dict(r) for r in fw.rules],
            "applied_to": applied,
        }

    def create(self, body: dict[str, Any]) -> tuple[Firewall, list[Action]]:
        errors = name_errors(body["name"]) + labels_field_errors(body.get("labels"))
        if errors:
            raise invalid_input(errors)
        rules = validate_rules(body.get("rules") or [])
        self.core.claim_name("firewall", body["name"], -1)
        fw = Firewall(
            id=self.core.next_id("firewall"),
            name=body["name"],
            labels=dict(body.get("labels") or {}),
            rules=rules,
            created=time.time(),
        )
        actions = self._apply_targets(fw, body.get("apply_to") or [], "apply_to")
        self.items[fw.id] = fw
        self.core.names["firewall"][fw.name] = fw.id
        return fw, actions

    def delete(self, firewall_id: int) -> None:
        fw = self.get(firewall_id)
        if fw.servers or any(fw.applies(s) for s in self.servers.values()):
            raise ApiError(422, "resource_in_use", "firewall is still applied to a resource")
        del self.items[fw.id]
        self.core.names["firewall"].pop(fw.name, None)

    def set_rules(self, firewall_id: int, body: dict[str, Any]) -> list[Action]:
        fw = self.get(firewall_id)
        fw.rules = validate_rules(body["rules"])
        actions = [self.core.new_action("set_firewall_rules", [(fw.id, "firewall")])]
        for server in self.servers.values():
            if fw.applies(server):
                actions.append(self.core.new_action("apply_firewall", [(fw.id, "firewall"), (server.id, "server")]))
        return [self.core.finish_now(a) for a in actions]

    def apply(self, firewall_id: int, body: dict[str, Any]) -> list[Action]:
        return self._apply_targets(self.get(firewall_id), body["apply_to"], "apply_to")

    def remove(self, firewall_id: int, body: dict[str, Any]) -> list[Action]:
        fw = self.get(firewall_id)
        drop_servers: list[int] = []
        drop_selectors: list[str] = []
        for i, res in enumerate(body["remove_from"]):
            if res["type"] == "server":
                drop_servers.append(self._removable_server(fw, res, f"remove_from.{i}"))
            else:
                text = (res.get("label_selector") or {}).get("selector")
                if not any(t == text for t, _ in fw.selectors):
                    raise ApiError(404, "firewall_resource_not_found", "firewall is not applied to the label selector")
                drop_selectors.append(text or "")
        actions = []
        for sid in drop_servers:
            fw.servers.remove(sid)
            actions.append(self.core.new_action("remove_firewall", [(fw.id, "firewall"), (sid, "server")]))
        for text in drop_selectors:
            fw.selectors = [(t, s) for t, s in fw.selectors if t != text]
            actions.append(self.core.new_action("remove_firewall", [(fw.id, "firewall")]))
        return [self.core.finish_now(a) for a in actions]

    def forget_server(self, server_id: int) -> None:
        for fw in self.items.values():
            if server_id in fw.servers:
                fw.servers.remove(server_id)

    # -- targets -------------------------------------------------------------
    def _apply_targets(self, fw: Firewall, apply_to: list[dict[str, Any]], where: str) -> list[Action]:
        """Validate then apply ``apply_to`` entries; one action per entry."""
        new_servers: list[Server] = []
        new_selectors: list[tuple[str, Selector]] = []
        for i, res in enumerate(apply_to):
            if res["type"] == "server":
                new_servers.append(self._server_target(fw, res, new_servers, f"{where}.{i}"))
            else:
                new_selectors.append(self._selector_target(fw, res, f"{where}.{i}"))
        actions = []
        for server in new_servers:
            fw.servers.append(server.id)
            actions.append(self.core.new_action("apply_firewall", [(fw.id, "firewall"), (server.id, "server")]))
        for text, sel in new_selectors:
            fw.selectors.append((text, sel))
            actions.append(self.core.new_action("apply_firewall", [(fw.id, "firewall")]))
        return [self.core.finish_now(a) for a in actions]

    def _server_target(self, fw: Firewall, res: dict[str, Any], new: list[Server], where: str) -> Server:
        sid = (res.get("server") or {}).get("id")
        if sid is None:
            raise invalid_input([(f"{where}.server", _MISSING)])
        server = self.servers.get(sid)
        if server is None:
            raise ApiError(404, "firewall_resource_not_found", f"server {sid} not found")
        if sid in fw.servers:
            raise ApiError(422, "firewall_already_applied", "firewall is already applied to the server")
        if server in new:
            raise ApiError(422, "server_already_added", "server was applied more than once")
        if server.ipv4 is None and server.ipv6 is None:
            raise ApiError(422, "private_net_only_server", "server has no public interface")
        if len(self.of(server)) >= FIREWALLS_PER_SERVER_MAX:
            raise limit_exceeded("a server can have at most 5 firewalls", "firewalls_per_server")
        return server

    @staticmethod
    def _selector_target(fw: Firewall, res: dict[str, Any], where: str) -> tuple[str, Selector]:
        text = (res.get("label_selector") or {}).get("selector")
        if text is None:
            raise invalid_input([(f"{where}.label_selector", _MISSING)])
        try:
            sel = parse_selector(text)
        except SelectorError as exc:
            raise invalid_input([(f"{where}.label_selector.selector", str(exc))]) from None
        if any(t == text for t, _ in fw.selectors):
            raise ApiError(422, "firewall_already_applied", "firewall is already applied to the label selector")
        return text, sel

    def _removable_server(self, fw: Firewall, res: dict[str, Any], where: str) -> int:
        sid = (res.get("server") or {}).get("id")
        if sid is None:
            raise invalid_input([(f"{where}.server", _MISSING)])
        if sid not in fw.servers:
            server = self.servers.get(sid)
            if server is not None and fw.applies(server):
                raise ApiError(
                    422,
                    "firewall_managed_by_label_selector",
                    "firewall is applied via a label selector and cannot be removed manually",
                )
            raise ApiError(404, "firewall_resource_not_found", "firewall is not applied to the server")
        return sid
