"""Creating a cluster's resources (SSH key, network, firewall, placement groups, servers).

Every create is safe to retry and to cancel: a 409 ``uniqueness_error`` on a resource that
carries this cluster's labels, this start's id among them, is an earlier attempt of the same
POST that succeeded (it timed out or met a 5xx on the way back) and is adopted; one made by
another start of the same name is never adopted. A result that arrives after its caller was
cancelled is deleted. See docs/design.md, "Faults".
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import CloudError
from .model import LABEL_CLUSTER, LABEL_START, NOUN, Kind, NewServer, ResourceInfo, ServerInfo
from .retry import Retry

logger = logging.getLogger(__name__)

Created = TypeVar("Created", ResourceInfo, ServerInfo)


class Resources:
    def __init__(self, retry: Retry) -> None:
        self.retry = retry
        self.sdk = retry.sdk

    async def _create_named(
        self,
        what: str,
        kind: str,
        name: str,
        labels: dict[str, str],
        create: Callable[[], Created],
        lookup: Callable[[], Created | None],
        delete: Callable[[int], None],
    ) -> Created:
        """POST a named resource and return it (or the one an earlier attempt created).

        ``create``, ``lookup`` (by name) and ``delete`` (by id) are the SDK adapter's requests.
        """

        async def undo(result: Created) -> None:
            await self.retry.call(f"deleting {kind} {name}", delete, result.id)

        try:
            return await self.retry.send(what, create, undo)
        except CloudError as e:
            if e.code != "uniqueness_error":
                raise
            existing = await self.retry.call(f"looking up {kind} {name}", lookup)
            if existing is None or any(existing.labels.get(k) != v for k, v in labels.items()):
                raise CloudError(what, e.code, _not_ours(e.api_message, kind, name, labels, existing)) from None
            logger.info("%s: adopting the %s an earlier attempt created", what, kind)
            return existing

    async def _create_shared(
        self,
        kind: Kind,
        name: str,
        labels: dict[str, str],
        create: Callable[[], ResourceInfo],
    ) -> int:
        """Create one of the resources a cluster's servers share; returns its id."""
        created = await self._create_named(
            f"creating {NOUN[kind]} {name}",
            NOUN[kind],
            name,
            labels,
            create,
            functools.partial(self.sdk.find, kind, name),
            functools.partial(self.sdk.delete, kind),
        )
        return created.id

    async def create_ssh_key(self, name: str, public_key: str, labels: dict[str, str]) -> int:
        create = functools.partial(self.sdk.create_ssh_key, name, labels, public_key)
        return await self._create_shared("ssh_key", name, labels, create)

    async def create_network(
        self, name: str, ip_range: str, subnet: str, network_zone: str, labels: dict[str, str]
    ) -> int:
        create = functools.partial(
            self.sdk.create_network, name, labels, ip_range, subnet, network_zone
        )
        return await self._create_shared("network", name, labels, create)

    async def create_firewall(
        self, name: str, rules: list[dict[str, Any]], labels: dict[str, str]
    ) -> int:
        create = functools.partial(self.sdk.create_firewall, name, labels, rules)
        return await self._create_shared("firewall", name, labels, create)

    async def create_placement_group(self, name: str, labels: dict[str, str]) -> int:
        create = functools.partial(self.sdk.create_placement_group, name, labels)
        return await self._create_shared("placement_group", name, labels, create)

    async def create_server(self, new: NewServer) -> ServerInfo:
        """Create a server; an adopted one (a retried POST) has no ``action_id``."""
        return await self._create_named(
            f"creating server {new.name} ({new.server_type} in {new.location})",
            "server",
            new.name,
            new.labels,
            functools.partial(self.sdk.create_server, new),
            functools.partial(self.sdk.find_server, new.name),
            self.sdk.delete_server,
        )


def _not_ours(api_message: str, kind: str, name: str, ours: dict[str, str], theirs: Created | None) -> str:
    """Why a resource of the same name is not adopted: another start's, or a leftover."""
    cluster = ours.get(LABEL_CLUSTER)
    if theirs is not None and cluster and theirs.labels.get(LABEL_CLUSTER) == cluster:
        if theirs.labels.get(LABEL_START) != ours.get(LABEL_START):
            return (
                f"cluster {cluster!r} was claimed by another start (its {kind} {name!r} exists): "
                "another process is creating it or it runs; reattach with "
                "HetznerCluster.from_name or choose another name"
            )
    return (
        f"{api_message}; a {kind} named {name!r} exists that is not this "
        "cluster's (a leftover?): delete it or choose another cluster name"
    )
