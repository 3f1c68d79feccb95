"""``Cloud``: the one object the rest of the package talks to about the Hetzner Cloud API.

It is composed of layers, each in its own module, the way a request passes through them:

- ``catalog.py``, ``resources.py``, ``clusters.py``: what is asked (server types, creates,
  listings and deletes by label);
- ``retry.py``: how it is sent (pacing by ``RateLimit-*``, retries with backoff, undoing a
  create whose caller was cancelled);
- ``sdk.py``: the SDK adapter, which runs it in a thread and turns the SDK's objects and
  errors into the project's own (``model.py``, ``errors.py``).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable
from typing import Any

from .catalog import Catalog
from .clusters import Clusters
from .errors import BAD_TOKEN, NO_TOKEN, TOKEN_READONLY, CloudError, ConfigError, token_refused
from .model import ClusterResources, LocationInfo, NewServer, ServerInfo, ServerTypeInfo
from .resources import Resources
from .retry import RateLimit, Retry
from .sdk import Sdk

DEFAULT_ENDPOINT = "https://api.hetzner.cloud/v1"


class Cloud:
    """One project's API, for one event loop. Create with the token, close when done."""

    def __init__(
        self,
        token: str,
        endpoint: str,
        *,
        threads: int = 32,
        request_timeout: float = 30.0,
        max_retries: int = 8,
        poll_interval: float = 1.0,
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
    ) -> None:
        if not token:
            raise ConfigError(NO_TOKEN)
        if not isinstance(token, str) or not re.fullmatch(r"[\x21-\x7e]+", token):
            raise ConfigError(BAD_TOKEN)
        url = urllib.parse.urlsplit(endpoint) if isinstance(endpoint, str) else None
        if url is None or url.scheme not in ("http", "https") or not url.hostname or any(c.isspace() for c in endpoint):
            raise ConfigError(f"invalid API endpoint {endpoint!r}: an http(s) URL such as {DEFAULT_ENDPOINT}")
        self.endpoint = endpoint
        self.poll_interval = poll_interval
        self.request_timeout = request_timeout
        self.sdk = Sdk(token, endpoint, threads=threads, request_timeout=request_timeout)
        self.retry = Retry(
            self.sdk, max_retries=max_retries, backoff_base=backoff_base, backoff_max=backoff_max
        )
        self.catalog = Catalog(self.retry)
        self.resources = Resources(self.retry)
        self.clusters = Clusters(self.retry, poll_interval)

    def close(self) -> None:
        self.sdk.close()

    # What was sent (counted by the retry layer) -------------------------------------------

    @property
    def rate(self) -> RateLimit:
        return self.retry.rate

    @property
    def requests(self) -> int:
        return self.retry.requests

    @property
    def rate_limited(self) -> int:
        return self.retry.rate_limited

    @property
    def retries(self) -> int:
        return self.retry.retries

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for requests still running in threads, e.g. of cancelled callers."""
        await self.sdk.drain(timeout)

    async def check_token(self) -> None:
        """A cheap authenticated request, so a bad token fails before anything is created."""
        try:
            await self.retry.call("checking the API token", self.sdk.check_token)
        except CloudError as e:
            refused = token_refused(e)
            if refused is e:
                raise
            raise refused from None

    async def check_write(self) -> None:
        """A read-only token refused before anything is created: a POST that creates nothing."""
        try:
            await self.retry.call("checking the API token's write access", self.sdk.check_write)
        except CloudError as e:
            if e.code == "token_readonly":
                raise ConfigError(TOKEN_READONLY) from None
            if e.code != "invalid_input":
                raise

    async def failed_action(self, server_id: int, commands: tuple[str, ...]) -> tuple[str, str] | None:
        """``(code, message)`` if one of the server's ``commands`` actions ended in error."""
        return await self.retry.call(
            f"reading the actions of server {server_id}", self.sdk.failed_action, server_id, commands
        )

    async def action_error(self, action_id: int) -> tuple[str, str] | None:
        """``(code, message)`` if the action ended in error, else None."""
        return await self.retry.call(
            f"reading action {action_id}", self.sdk.action_error, action_id
        )

    # Catalog (catalog.py) -----------------------------------------------------------------

    def cached_server_types(self) -> dict[str, ServerTypeInfo] | None:
        """The server types (with prices) if already read, without a request; None before."""
        return self.catalog.cached_server_types()

    async def server_types(self) -> dict[str, ServerTypeInfo]:
        return await self.catalog.server_types()

    async def locations(self) -> dict[str, LocationInfo]:
        return await self.catalog.locations()

    async def check_choices(
        self, types: Iterable[str], location: str, image: str, fallbacks: Iterable[str] = ()
    ) -> None:
        """Raise ConfigError, listing the valid choices, for an unknown type, location or image
        (a type the location lacks passes when a fallback offers it)."""
        await self.catalog.check_choices(types, location, image, fallbacks)

    async def image_id(self, name: str, architecture: str) -> int:
        return await self.catalog.image_id(name, architecture)

    # Creating (resources.py) --------------------------------------------------------------

    async def create_ssh_key(self, name: str, public_key: str, labels: dict[str, str]) -> int:
        return await self.resources.create_ssh_key(name, public_key, labels)

    async def create_network(
        self, name: str, ip_range: str, subnet: str, network_zone: str, labels: dict[str, str]
    ) -> int:
        return await self.resources.create_network(name, ip_range, subnet, network_zone, labels)

    async def create_firewall(
        self, name: str, rules: list[dict[str, Any]], labels: dict[str, str]
    ) -> int:
        return await self.resources.create_firewall(name, rules, labels)

    async def create_placement_group(self, name: str, labels: dict[str, str]) -> int:
        return await self.resources.create_placement_group(name, labels)

    async def create_server(self, new: NewServer) -> ServerInfo:
        """Create a server; an adopted one (a retried POST) has no ``action_id``."""
        return await self.resources.create_server(new)

    # Finding and deleting by label (clusters.py) ------------------------------------------

    async def servers(self, label_selector: str) -> list[ServerInfo]:
        return await self.clusters.servers(label_selector)

    async def update_server(self, server_id: int, name: str, labels: dict[str, str]) -> ServerInfo:
        """A server's new name and labels (``PUT /servers/{id}``)."""
        return await self.clusters.update_server(server_id, name, labels)

    async def delete_server(self, server_id: int) -> None:
        """Delete one server; a server that is already gone is fine."""
        await self.clusters.delete_server(server_id)

    async def cluster_resources(self, cluster: str, start: str | None = None) -> ClusterResources:
        """What carries ``cluster``'s label (and ``start``'s, when given)."""
        return await self.clusters.cluster_resources(cluster, start)

    async def all_clusters(self) -> dict[str, ClusterResources]:
        """Every cluster of the project, by the cluster label (never by name prefix)."""
        return await self.clusters.all_clusters()

    async def delete_cluster(
        self, cluster: str, *, timeout: float, start: str | None = None
    ) -> ClusterResources:
        """Delete everything labelled with ``cluster`` (and made by ``start``, when given),
        servers first, and wait until it is gone.

        Safe on a half-created cluster and idempotent; returns what was found.
        """
        return await self.clusters.delete_cluster(cluster, timeout=timeout, start=start)

    async def wait_servers_gone(self, label_selector: str, *, deadline: float) -> None:
        await self.clusters.wait_servers_gone(label_selector, deadline=deadline)
