"""What can be ordered: server types (with their prices, their Primary IPv4's too, and
availability), locations, images.

Server types and locations are read once per client, on first use; prices are then at hand
without a request (``cached_server_types``, ``ServerTypeInfo.price``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from .errors import ConfigError
from .model import LocationInfo, ServerTypeInfo
from .retry import Retry


class Catalog:
    def __init__(self, retry: Retry) -> None:
        self.retry = retry
        self.sdk = retry.sdk
        self._lock = asyncio.Lock()
        self._types: dict[str, ServerTypeInfo] | None = None
        self._locations: dict[str, LocationInfo] | None = None

    async def _load(self) -> None:
        async with self._lock:
            if self._types is not None:
                return
            types, locations, ipv4 = await asyncio.gather(
                self.retry.call("listing server types", self.sdk.server_types),
                self.retry.call("listing locations", self.sdk.locations),
                self.retry.call("reading prices", self.sdk.ipv4_prices),
            )
            for info in types.values():
                # Hetzner bills each server's Primary IPv4 on top of the server.
                info.ipv4 = {loc: ipv4[loc] for loc in info.hourly if loc in ipv4}
            self._locations = locations
            self._types = types

    def cached_server_types(self) -> dict[str, ServerTypeInfo] | None:
        """The server types if already read (no request); None before."""
        return self._types

    async def server_types(self) -> dict[str, ServerTypeInfo]:
        await self._load()
        assert self._types is not None
        return self._types

    async def locations(self) -> dict[str, LocationInfo]:
        await self._load()
        assert self._locations is not None
        return self._locations

    async def check_choices(
        self, types: Iterable[str], location: str, image: str, fallbacks: Iterable[str] = ()
    ) -> None:
        """Raise ConfigError, listing the valid choices, for an unknown type, location or image.

        A type is refused only when neither the location nor a fallback offers it: servers
        go to the fallbacks when the location cannot take them (``ServerFactory.create``).
        """
        locations = await self.locations()
        if location not in locations:
            raise ConfigError(
                f"unknown location {location!r}; valid locations: {', '.join(sorted(locations))}"
            )
        places = [location] + [x for x in fallbacks if x != location]
        where = " or ".join(places)
        catalog = await self.server_types()
        for name in set(types):
            info = catalog.get(name)
            orderable = sorted(n for n, t in catalog.items() if t.available.intersection(places))
            if info is None:
                raise ConfigError(
                    f"unknown server type {name!r}; types orderable in {where}: "
                    + ", ".join(orderable)
                )
            if not info.available.intersection(places):
                raise ConfigError(
                    f"server type {name!r} cannot be ordered in {where}"
                    f"{' (deprecated)' if info.deprecated else ''}; types orderable there: "
                    + ", ".join(orderable)
                )
        for arch in {catalog[name].architecture for name in set(types)}:
            await self.image_id(image, arch)

    async def image_id(self, name: str, architecture: str) -> int:
        ids = await self.retry.call(
            f"looking up image {name}", self.sdk.image_ids, name, architecture
        )
        if not ids:
            available = await self.retry.call(
                "listing images", self.sdk.system_image_names, architecture
            )
            raise ConfigError(
                f"unknown image {name!r} for {architecture}; valid images: "
                + ", ".join(sorted(set(available)))
            )
        return ids[0]
