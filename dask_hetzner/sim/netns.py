"""The simulated network: a network namespace per server, joined by a bridge in a hub namespace.

Layout (all made by the simulator, as root)::

    this machine's namespace          hub namespace                server namespace
    dhsim<pid> (client address) ===== up0 ─┐
                                           br0 ── s<server id> ===== eth0 (public + private IPs)

Every address is a loopback address (127.0.0.0/8): ``route_localnet`` on the interfaces
that carry them, a ``local``-table /32 route per server on this machine (to its public
address only, so the client never reaches a private one) and routes to this simulator's
address blocks in each server. Nothing is forwarded or routed off the machine: this
machine's namespace only gets /32 routes to its own link, and the hub is a bridge
without addresses.

Each namespace is held by a process (``sleep``) that dies with the simulator
(``--pdeathsig``), so when the simulator is killed the kernel removes the namespaces, the
links with them and the routes with the links: nothing is left to reclaim but a link
whose name a dead simulator's pid reused, which :meth:`Network.start` deletes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from .sandbox import TOOL_ENV, Child, popen, read_pipe, tool
from .store.addresses import AddressPool

# Routed from a server into the bridge: the public and private address pools
# (store/addresses.py), so servers reach each other at either address.
SERVER_BLOCKS = ("127.64.0.0/10", "127.128.0.0/9")
_HOST_LINK_PREFIX = "dhsim"
_HUB_PORT = "up0"
_BRIDGE = "br0"
_CLONE_NEWNET = 0x40000000
_COMMAND_TIMEOUT = 30.0

T = TypeVar("T")


async def run(argv: Sequence[str], stdin: str = "") -> str:
    """Run a network tool; its output, or raise with it if it fails."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=TOOL_ENV,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(stdin.encode()), _COMMAND_TIMEOUT)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}... failed: {out.decode(errors='replace').strip()}")
    return out.decode(errors="replace")


def in_netns(pid: int, *argv: str) -> list[str]:
    """``argv`` run in the network namespace of process ``pid`` (and nothing else of it)."""
    return [tool("nsenter"), f"--net=/proc/{pid}/ns/net", "--", *argv]


class Holder:
    """A process holding a new network namespace; the namespace goes when it dies."""

    def __init__(self, child: Child) -> None:
        self.child = child

    @property
    def pid(self) -> int:
        return self.child.pid

    @classmethod
    async def start(cls) -> Holder:
        argv = [
            tool("setpriv"), "--pdeathsig", "KILL", "--",
            tool("unshare"), "--net", "--",
            tool("sh"), "-c", "echo ready && exec sleep 2147483647",
        ]  # fmt: skip
        out_r, out_w = os.pipe()
        try:
            proc = popen(argv, stdin=subprocess.DEVNULL, stdout=out_w, stderr=out_w, env=TOOL_ENV,
                         start_new_session=True)  # fmt: skip
        except BaseException:
            os.close(out_r)
            raise
        finally:
            os.close(out_w)
        child = Child(proc, asyncio.get_running_loop())
        reader, transport = await read_pipe(out_r)
        try:
            line = await asyncio.wait_for(reader.readline(), _COMMAND_TIMEOUT)
        finally:
            transport.close()
        if line.strip() != b"ready":
            proc.kill()
            raise RuntimeError(f"cannot make a network namespace: {line.decode(errors='replace')}")
        return cls(child)

    async def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.child.popen.kill()
        await asyncio.wait_for(asyncio.shield(self.child.exited), _COMMAND_TIMEOUT)


class Network:
    """The hub and this machine's link to it (one per HostManager).

    ``guarded``: this simulator's public address blocks. Until a server's /32 route exists
    (created, not booted yet; deleted), its address is *unreachable* from this machine, as
    an address of a server not up is on Hetzner; without that route it would fall to the
    ``127.0.0.0/8`` loopback route, and whatever listens on ``0.0.0.0:22`` here (a CI
    machine's sshd) would answer the client's first SSH attempts.
    """

    def __init__(self, client_ip: str, guarded: Sequence[str] = ()) -> None:
        self.client_ip = client_ip  # this machine's address on the simulated network
        self.link = f"{_HOST_LINK_PREFIX}{os.getpid()}"
        self.hub: Holder | None = None
        self.guarded = list(guarded)

    async def start(self) -> None:
        await reclaim()
        if _link_exists(self.link):  # a dead simulator's, whose pid we now have
            await run([tool("ip"), "link", "del", self.link])
        self.hub = await Holder.start()
        hub = self.hub.pid
        await run(in_netns(hub, tool("ip"), "-batch", "-"),
                  f"link add {_BRIDGE} type bridge\nlink set {_BRIDGE} up\n")  # fmt: skip
        await run([tool("ip"), "-batch", "-"],
                  f"link add {self.link} type veth peer name {_HUB_PORT} netns {hub}\n"
                  f"addr add {self.client_ip}/32 dev {self.link}\n")  # fmt: skip
        await _sysctl(None, f"net/ipv4/conf/{self.link}/route_localnet")
        await run([tool("ip"), "link", "set", self.link, "up"])
        await run(in_netns(hub, tool("ip"), "link", "set", _HUB_PORT, "master", _BRIDGE, "up"))
        for block in self.guarded:
            await run([tool("ip"), "route", "replace", "table", "local", "unreachable", block])

    async def close(self) -> None:
        """Deleting this machine's end removes both links and every route through them (the
        hub's death would too, but later: the kernel dismantles namespaces in the background)."""
        with contextlib.suppress(RuntimeError):
            await run([tool("ip"), "link", "del", self.link])
        for block in self.guarded:  # no link carries these: deleted by hand
            with contextlib.suppress(RuntimeError):
                await run([tool("ip"), "route", "del", "table", "local", "unreachable", block])
        if self.hub is not None:
            await self.hub.stop()
            self.hub = None

    async def attach(self, server_id: int, netns: Holder) -> None:
        """Link a server's namespace to the hub (once, at its first boot)."""
        assert self.hub is not None
        port = f"s{server_id}"
        await run(in_netns(self.hub.pid, tool("ip"), "-batch", "-"),
                  f"link add {port} type veth peer name eth0 netns {netns.pid}\n"
                  f"link set {port} master {_BRIDGE} up\n")  # fmt: skip
        await _sysctl(netns.pid, "net/ipv4/conf/all/route_localnet")
        # ARP answers only for eth0's own addresses. Otherwise all of 127.0.0.0/8 (lo) is
        # local here: a namespace between this and its addresses (address()) answered for
        # any server, and this machine sent that server's packets here for ~30 s.
        await _sysctl(netns.pid, "net/ipv4/conf/all/arp_ignore")
        await run(in_netns(netns.pid, tool("ip"), "-batch", "-"), "link set lo up\nlink set eth0 up\n")

    async def address(self, netns: Holder, public_ip: str, private: list[str]) -> None:
        """Give the server its current addresses; route its public one from this machine."""
        lines = ["addr flush dev eth0"]
        lines += [f"addr add {ip}/32 dev eth0" for ip in dict.fromkeys([public_ip, *private])]
        # Routes through eth0 go with its last address: (re)made after.
        lines += [f"route replace table local {block} dev eth0" for block in SERVER_BLOCKS]
        lines.append(f"route replace table local {self.client_ip}/32 dev eth0")
        await run(in_netns(netns.pid, tool("ip"), "-batch", "-"), "\n".join(lines) + "\n")
        await run([tool("ip"), "route", "replace", "table", "local", f"{public_ip}/32",
                   "dev", self.link, "src", self.client_ip])  # fmt: skip

    async def detach(self, public_ip: str) -> None:
        """Forget a deleted server's route (its namespace goes with its holder)."""
        with contextlib.suppress(RuntimeError):
            await run([tool("ip"), "route", "del", "table", "local", f"{public_ip}/32",
                       "dev", self.link])  # fmt: skip


async def reclaim() -> None:
    """Delete the links of simulators that died without closing (their pid is gone), and
    their guard routes (no live simulator holds the block)."""
    for name in await asyncio.to_thread(_orphan_links):
        with contextlib.suppress(RuntimeError):
            await run([tool("ip"), "link", "del", name])
    shown = await run([tool("ip"), "route", "show", "table", "local", "type", "unreachable"])
    for block in await asyncio.to_thread(_orphan_guards, shown):
        with contextlib.suppress(RuntimeError):
            await run([tool("ip"), "route", "del", "table", "local", "unreachable", block])


def _orphan_guards(shown: str) -> list[str]:
    """The guard routes in ``ip route show ... type unreachable`` whose block is free."""
    found = []
    for match in re.finditer(r"^(?:unreachable\s+)?(127\.(\d+)\.0\.0/16)\b", shown, re.MULTILINE):
        if not AddressPool.claimed("public", int(match.group(2))):
            found.append(match.group(1))
    return found


def _orphan_links() -> list[str]:
    found = []
    for name in _links():
        match = re.fullmatch(rf"{_HOST_LINK_PREFIX}(\d+)", name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            found.append(name)
    return found


def _links() -> list[str]:
    try:
        return os.listdir("/sys/class/net")
    except OSError:
        return []


def _link_exists(name: str) -> bool:
    return name in _links()


async def _sysctl(pid: int | None, key: str, value: str = "1") -> None:
    """Write a /proc/sys/net knob in a namespace (``/proc/sys/net`` follows the writer's)."""

    def write() -> None:
        with open(f"/proc/sys/{key}", "w") as fh:
            fh.write(value)

    await in_namespace(pid, write)


async def in_namespace(pid: int | None, fn: Callable[[], T]) -> T:
    """``fn()`` run in a fresh thread that entered process ``pid``'s network namespace.

    The thread ends afterwards, so no thread of the simulator stays in another namespace;
    a socket made there keeps the namespace it was made in.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(setter: Callable[[], None]) -> None:
        if not future.done():
            setter()

    def body() -> None:
        try:
            if pid is not None:
                _setns(pid)
            result = fn()
        except BaseException as exc:  # handed to the awaiting coroutine
            error = exc
            loop.call_soon_threadsafe(deliver, lambda: future.set_exception(error))
        else:
            loop.call_soon_threadsafe(deliver, lambda: future.set_result(result))

    threading.Thread(target=body, name=f"netns-{pid}", daemon=True).start()
    return await asyncio.wait_for(future, _COMMAND_TIMEOUT)


_libc: ctypes.CDLL | None = None


def _setns(pid: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into the network namespace of {pid}: {os.strerror(err)}")
    finally:
        os.close(fd)


async def listening_socket(pid: int, port: int) -> socket.socket:
    """A TCP socket listening on every address of a namespace (as sshd does)."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    return await in_namespace(pid, make)


async def connected_socket(pid: int, host: str, port: int) -> socket.socket:
    """A TCP connection made from inside a namespace (sshd's port forwarding)."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        return sock

    sock = await in_namespace(pid, make)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock
