"""A server's way to the internet (package downloads), without routing anything off this machine.

Real servers reach the internet; a simulated one lives in a network namespace whose only
link ends in the hub's bridge (netns.py). Inside it, nftables redirects every outbound
TCP connection to a non-loopback address, and every DNS query, to two sockets the
simulator made in that namespace (on 127.0.0.1:``TCP_PORT`` / ``DNS_PORT``); the
simulator opens the same connection from this machine, as a NAT gateway would, and
relays the bytes. The kernel forwards no packet: no route leads anywhere but the bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any

from .netns import in_namespace, in_netns, run
from .sandbox import tool

TCP_PORT = 65499  # above Linux's ephemeral range: a server's programs do not get it by chance
DNS_PORT = 65498
_SO_ORIGINAL_DST = 80
_CONNECT_TIMEOUT = 30.0
_CHUNK = 65536


def _ruleset() -> str:
    return (
        "add table ip simegress\n"
        "delete table ip simegress\n"
        "table ip simegress {\n"
        "  chain out {\n"
        "    type nat hook output priority -100; policy accept;\n"
        "    ip daddr 127.0.0.0/8 return\n"
        f"    meta l4proto tcp dnat to 127.0.0.1:{TCP_PORT}\n"
        f"    udp dport 53 dnat to 127.0.0.1:{DNS_PORT}\n"
        "  }\n"
        "}\n"
    )


def _nameserver() -> str:
    """This machine's first resolver (queries are relayed to it)."""
    with contextlib.suppress(OSError), open("/etc/resolv.conf") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                return parts[1]
    return "127.0.0.53"


class Egress:
    """The relays of one server's namespace."""

    def __init__(self) -> None:
        self._server: asyncio.base_events.Server | None = None
        self._dns: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, netns_pid: int) -> None:
        def sockets() -> tuple[socket.socket, socket.socket]:
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind(("127.0.0.1", TCP_PORT))
            tcp.listen(128)
            tcp.setblocking(False)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", DNS_PORT))
            udp.setblocking(False)
            return tcp, udp

        tcp, udp = await in_namespace(netns_pid, sockets)
        loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._relay, sock=tcp)
        upstream = (await asyncio.to_thread(_nameserver), 53)
        self._dns, _ = await loop.create_datagram_endpoint(lambda: _DnsRelay(upstream, self._tasks), sock=udp)
        await run(in_netns(netns_pid, tool("ip"), "route", "replace", "default", "dev", "eth0"))
        await run(in_netns(netns_pid, tool("nft"), "-f", "-"), _ruleset())

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._dns is not None:
            self._dns.close()
        for task in list(self._tasks):
            task.cancel()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            sock = writer.get_extra_info("socket")
            raw = sock.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
            port, address = struct.unpack_from("!2xH4s", raw)
            target = (socket.inet_ntoa(address), port)
            try:
                up_r, up_w = await asyncio.wait_for(asyncio.open_connection(*target), _CONNECT_TIMEOUT)
            except (OSError, TimeoutError):
                return  # the server sees the connection closed, as by a refusing host
            try:
                await asyncio.gather(_pump(reader, up_w), _pump(up_r, writer))
            finally:
                up_w.close()
        finally:
            writer.close()
            self._tasks.discard(task)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, RuntimeError):
        writer.close()


class _DnsRelay(asyncio.DatagramProtocol):
    """Each query goes to this machine's resolver from a socket of its own; its answer back."""

    def __init__(self, upstream: tuple[str, int], tasks: set[asyncio.Task[None]]) -> None:
        self.upstream = upstream
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks = tasks  # the egress's: a query in flight is cancelled when it closes

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        task = asyncio.ensure_future(self._ask(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _ask(self, data: bytes, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[bytes] = loop.create_future()

        class _Once(asyncio.DatagramProtocol):
            def datagram_received(self, reply: bytes, _: tuple[str, int]) -> None:
                if not answered.done():
                    answered.set_result(reply)

        transport, _ = await loop.create_datagram_endpoint(_Once, remote_addr=self.upstream)
        try:
            transport.sendto(data)
            reply = await asyncio.wait_for(answered, 5.0)
        except (OSError, TimeoutError):
            return  # the resolver in the server retries, as after a lost packet
        finally:
            transport.close()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)
