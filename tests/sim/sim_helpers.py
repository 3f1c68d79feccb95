"""Helpers shared by the simulator tests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import hcloud
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

LABELS = {"dask-hetzner/cluster": "c1"}


def ssh_public_key(comment: str = "test@sim") -> str:
    """A fresh OpenSSH ed25519 public key line."""
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{blob.decode()} {comment}"


def sdk(sim: Any, **kwargs: Any) -> hcloud.Client:
    """The official SDK pointed at the simulator; polls fast, retries without sleeping."""
    client = hcloud.Client(
        token=sim.token, api_endpoint=sim.endpoint, poll_interval=0.005, **kwargs
    )
    client._client._retry_interval_func = lambda retries: 0.0
    return client


@dataclass
class Answer:
    status: int
    body: Any
    headers: dict[str, str]

    @property
    def code(self) -> str | None:
        if isinstance(self.body, dict) and "error" in self.body:
            return self.body["error"]["code"]
        return None


class Raw:
    """Plain HTTP to the simulator, for headers and malformed input."""

    def __init__(self, sim: Any, token: str | None = None):
        self.sim = sim
        self.token = sim.token if token is None else token
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Raw:
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.session is not None
        await self.session.close()

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: Any = None,
        params: Any = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
    ) -> Answer:
        assert self.session is not None
        hdrs = {"Authorization": f"Bearer {self.token}"} if auth else {}
        hdrs.update(headers or {})
        url = path if path.startswith("http") else self.sim.endpoint + path
        async with self.session.request(
            method, url, json=json, data=data, params=params, headers=hdrs
        ) as r:
            text = await r.read()
            body = None
            if text:
                try:
                    body = await r.json(content_type=None)
                except ValueError:
                    body = text
            return Answer(r.status, body, dict(r.headers))

    async def get(self, path: str, **kw: Any) -> Answer:
        return await self.call("GET", path, **kw)

    async def post(self, path: str, json: Any = None, **kw: Any) -> Answer:
        return await self.call("POST", path, json=json, **kw)

    async def put(self, path: str, json: Any = None, **kw: Any) -> Answer:
        return await self.call("PUT", path, json=json, **kw)

    async def delete(self, path: str, **kw: Any) -> Answer:
        return await self.call("DELETE", path, **kw)


def server_body(name: str, **extra: Any) -> dict[str, Any]:
    body = {"name": name, "server_type": "cpx22", "image": "ubuntu-24.04", "location": "fsn1"}
    body.update(extra)
    return body


async def wait_action(raw: Raw, action_id: int) -> dict[str, Any]:
    """Poll an action until it finished (instant profile: one or two polls)."""
    while True:
        a = await raw.get(f"/actions/{action_id}")
        assert a.status == 200, a.body
        if a.body["action"]["status"] != "running":
            return a.body["action"]
        await asyncio.sleep(0)  # let the simulator's tasks run (same loop), not a timing wait


async def until(condition: Any, limit: int = 100_000) -> None:
    """Yield to the event loop until ``condition()`` holds (a condition, not a timed wait)."""
    for _ in range(limit):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def delete_all(raw: Raw, sim: Any) -> None:
    """Delete every server (waiting for it) then every other resource."""
    for s in list(sim.store.servers.values()):
        d = await raw.delete(f"/servers/{s.id}")
        assert d.status == 200, d.body
    await sim.settle()
    for kind, items in sim.resources().items():
        for item in items:
            path = {"images": "images"}.get(kind, kind)
            d = await raw.delete(f"/{path}/{item['id']}")
            assert d.status == 204, (kind, d.body)


@dataclass
class HostCall:
    method: str
    server_id: int
    kwargs: dict[str, Any] = field(default_factory=dict)


class FakeHosts:
    """Records what the simulator asks of its HostManager."""

    def __init__(self) -> None:
        self.calls: list[HostCall] = []
        self.specs: dict[int, Any] = {}
        self.closed = False

    async def boot(self, spec: Any, *, ssh_delay: float = 0.0, ssh_never: bool = False) -> None:
        self.specs[spec.server_id] = spec
        self.calls.append(
            HostCall("boot", spec.server_id, {"ssh_delay": ssh_delay, "ssh_never": ssh_never})
        )

    async def power_off(self, server_id: int) -> None:
        self.calls.append(HostCall("power_off", server_id))

    async def destroy(self, server_id: int) -> None:
        self.calls.append(HostCall("destroy", server_id))

    def kill_processes(self, server_id: int) -> None:
        self.calls.append(HostCall("kill_processes", server_id))

    async def close(self) -> None:
        self.closed = True

    def of(self, server_id: int) -> list[str]:
        return [c.method for c in self.calls if c.server_id == server_id]

    def last(self, method: str, server_id: int) -> HostCall:
        return [c for c in self.calls if c.method == method and c.server_id == server_id][-1]

    def __iter__(self) -> Iterator[HostCall]:
        return iter(self.calls)
