"""Images: system images from the catalog and the project's snapshots (``/images``)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .. import catalog
from ..catalog import Image
from .actions import Action, Core
from .base import ApiError, id_or_name, invalid_input, iso, labels_field_errors, not_found
from .server_model import Server

log = logging.getLogger(__name__)


class ImageStore:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.system: dict[int, Image] = {img.id: img for img in catalog.system_images()}
        self.snapshots: dict[int, Image] = {}
        self.hosts: Any = None  # copies a server's disk into a snapshot (HostManager.snapshot)

    def get(self, image_id: int) -> Image:
        img = self.system.get(image_id) or self.snapshots.get(image_id)
        if img is None:
            raise not_found("image")
        return img

    def all(self) -> list[Image]:
        return [*self.system.values(), *self.snapshots.values()]

    def update(self, image_id: int, body: dict[str, Any]) -> Image:
        img = self.get(image_id)
        if img.type == "system":
            raise ApiError(403, "forbidden", "system images cannot be changed")
        errors = labels_field_errors(body.get("labels"))
        if errors:
            raise invalid_input(errors)
        if body.get("description") is not None:
            img.description = body["description"]
        if body.get("type") == "snapshot":  # converts a backup into a snapshot
            img.type = "snapshot"
        if body.get("labels") is not None:
            img.labels = dict(body["labels"])
        return img

    def delete(self, image_id: int) -> None:
        img = self.get(image_id)
        if img.type == "system":
            raise ApiError(403, "forbidden", "system images cannot be deleted")
        del self.snapshots[img.id]
        forget = getattr(self.hosts, "forget_image", None)
        if forget is not None:
            self.core.spawn(forget(img.id))

    def resolve(self, value: Any, arch: str) -> Image:
        """The image a create request names (id or name), for the server type's architecture."""
        iid, name = id_or_name(value)
        img: Image | None
        if iid is not None and (iid in self.system or iid in self.snapshots):
            img = self.get(iid)
        else:
            img = next(
                (i for i in self.system.values() if i.name == name and i.architecture == arch),
                None,
            )
            if img is None:
                raise invalid_input([("image", "image not found")])
        if img.architecture != arch:
            raise invalid_input([("image", f"image is not compatible with architecture {arch}")])
        if img.status != "available":
            raise ApiError(422, "invalid_input", "image is not available yet", {"fields": [{"name": "image", "messages": ["image is not available"]}]})
        return img

    def create_from(self, server: Server, body: dict[str, Any]) -> tuple[Image, Action]:
        """A snapshot of ``server`` (validated and unlocked by the caller); busy until done."""
        img = Image(
            id=self.core.next_id("image"),
            type=body.get("type") or "snapshot",
            name=None,
            description=body.get("description") or f"{server.name}-{iso(time.time())}",
            os_flavor=server.image.os_flavor,
            os_version=server.image.os_version,
            architecture=server.server_type.architecture,
            disk_size=server.server_type.disk,
            created=iso(time.time()),
            image_size=None,
            status="creating",
            created_from={"id": server.id, "name": server.name},
            labels=dict(body.get("labels") or {}),
            rapid_deploy=False,
        )
        self.snapshots[img.id] = img
        action = self.core.new_action("create_image", [(server.id, "server"), (img.id, "image")])
        server.busy = action
        self.core.spawn(self._finish(server, img, action))
        return img, action

    async def _finish(self, server: Server, img: Image, action: Action) -> None:
        snapshot = getattr(self.hosts, "snapshot", None)
        copied, size = True, 0
        if snapshot is not None and server.host_exists:
            try:  # the disk is in the image before its action ends
                size = await snapshot(server.id, img.id) or 0
            except Exception:
                log.exception("snapshot %s of server %s: copying its disk failed", img.id, server.id)
                copied = False
        gb = size / 1e9
        await asyncio.sleep(self.core.timing.image_copy(gb))  # the bigger, the longer
        ok = await self.core.run_action(action) and copied
        if server.busy is action:
            server.busy = None
        if img.id in self.snapshots:
            img.status = "available" if ok else "unavailable"
            # What the disk holds (the host's copy), or a twentieth of it where no host exists.
            img.image_size = (gb if size else round(server.server_type.disk * 0.05, 2)) if ok else None
