"""Placement groups: ``/placement_groups`` (spread groups of at most 10 servers)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .actions import Core
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

SPREAD_GROUP_MAX = 10
PLACEMENT_GROUPS_MAX = 50


@dataclass(eq=False)
class PlacementGroup:
    id: int
    name: str
    labels: dict[str, str]
    created: float
    servers: list[int] = field(default_factory=list)
    type: str = "spread"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "labels": dict(self.labels),
            "type": self.type,
            "created": iso(self.created),
            "servers": list(self.servers),
        }


def group_full(group_id: int) -> ApiError:
    # The code Hetzner answers today (terraform-provider-hcloud #1170; earlier service_error).
    return ApiError(
        422, "placement_group_member_limit_reached", f"placement group with ID {group_id} contains already 10 servers"
    )


class PlacementGroupStore:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.items: dict[int, PlacementGroup] = {}

    def get(self, pg_id: int) -> PlacementGroup:
        return get_or_404(self.items, pg_id, "placement group")

    def create(self, body: dict[str, Any]) -> PlacementGroup:
        errors = name_errors(body["name"]) + labels_field_errors(body.get("labels"))
        if errors:
            raise invalid_input(errors)
        self.core.claim_name("placement_group", body["name"], -1)
        if len(self.items) >= PLACEMENT_GROUPS_MAX:
            raise limit_exceeded("placement group limit exceeded", "placement_group_limit")
        pg = PlacementGroup(
            id=self.core.next_id("placement_group"),
            name=body["name"],
            labels=dict(body.get("labels") or {}),
            created=time.time(),
            type=body["type"],
        )
        self.items[pg.id] = pg
        self.core.names["placement_group"][pg.name] = pg.id
        return pg

    def delete(self, pg_id: int) -> None:
        pg = self.get(pg_id)
        if pg.servers:
            raise ApiError(422, "resource_in_use", "placement group still contains servers")
        del self.items[pg.id]
        self.core.names["placement_group"].pop(pg.name, None)

    def of(self, server: Server) -> PlacementGroup | None:
        return self.items.get(server.placement_group) if server.placement_group else None

    def join(self, server: Server, pg: PlacementGroup) -> None:
        if len(pg.servers) >= SPREAD_GROUP_MAX:
            raise group_full(pg.id)
        pg.servers.append(server.id)
        server.placement_group = pg.id

    def leave(self, server: Server) -> None:
        pg = self.of(server)
        if pg is not None and server.id in pg.servers:
            pg.servers.remove(server.id)
        server.placement_group = None
