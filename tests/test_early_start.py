"""The nanny preload that lets a worker start before its scheduler: against a real scheduler."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from distributed import Nanny, Scheduler
from support import free_port

from dask_hetzner import early_start


class SlowProxy:
    """Refuses until started; then accepts, but relays to ``target`` only after ``delay``:
    a scheduler on a loaded machine, whose handshake takes longer than a quick attempt."""

    def __init__(self, port: int, target: int, delay: float) -> None:
        self.port, self.target, self.delay = port, target, delay
        self.accepted = 0
        self.server: asyncio.Server | None = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        await asyncio.sleep(self.delay)  # the slowness under test, not synchronisation
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


def _nanny(port: int) -> SimpleNamespace:
    return SimpleNamespace(scheduler=SimpleNamespace(addr=f"tcp://127.0.0.1:{port}"), connection_args={})


@pytest.mark.timeout(60)
async def test_waits_for_a_late_scheduler_with_a_slow_handshake():
    async with Scheduler(host="127.0.0.1", port=0, dashboard_address=":0") as scheduler:
        target = int(scheduler.address.rsplit(":", 1)[1])
        proxy = SlowProxy(free_port(), target, delay=1.5)
        waiting = asyncio.ensure_future(
            early_start._wait_for_scheduler(_nanny(proxy.port), time.monotonic() + 30)
        )
        try:
            # Refused meanwhile: the wait goes on until the proxy listens.
            done, _ = await asyncio.wait({waiting}, timeout=0.5)
            assert not done
            await proxy.start()
            waited = await asyncio.wait_for(waiting, 20)
        finally:
            waiting.cancel()
            await proxy.close()
        # One connection, held through the slow handshake (a 0.5 s attempt would never finish).
        assert proxy.accepted == 1
        assert waited >= 1.5


async def test_gives_up_at_its_deadline_naming_the_address():
    port = free_port()  # nothing listens there
    with pytest.raises(TimeoutError, match=f"scheduler at tcp://127.0.0.1:{port} did not answer"):
        await early_start._wait_for_scheduler(_nanny(port), time.monotonic() + 0.5)


async def _eventually(cond, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.timeout(180)
async def test_the_worker_process_starts_before_the_scheduler_answers(tmp_path):
    """The scheduler is not up: the nanny starts its worker process at once (distributed
    would only after registering), and that same process registers once the scheduler
    answers. The nanny's own connect (30 s and it gives up) waits in the preload."""
    port = free_port()
    preload = [early_start.__file__]
    nanny = Nanny(
        f"tcp://127.0.0.1:{port}", host="127.0.0.1", nthreads=1, preload_nanny=preload,
        preload=preload, local_directory=str(tmp_path), dashboard_address="127.0.0.1:0",
    )  # fmt: skip
    starting = asyncio.ensure_future(nanny.start())
    try:
        await _eventually(
            lambda: nanny.process is not None and nanny.process.process is not None
            and nanny.process.process.pid is not None,
            "the worker process, with no scheduler",
        )  # fmt: skip
        pid = nanny.process.process.pid
        assert not starting.done()
        async with Scheduler(host="127.0.0.1", port=port, dashboard_address=":0") as scheduler:
            await asyncio.wait_for(starting, 120)
            (registered,) = scheduler.workers.values()
            assert registered.pid == pid
            assert registered.nanny == nanny.address
            await nanny.close()
    finally:
        starting.cancel()
        await nanny.close()


@pytest.mark.timeout(180)
async def test_a_worker_process_that_fails_early_ends_the_wait(tmp_path):
    """Its worker process fails while the scheduler is still away: the nanny's start fails
    now, not when the wait's bound (an hour) ends."""
    nanny = Nanny(
        f"tcp://127.0.0.1:{free_port()}", host="127.0.0.1", nthreads=1,
        preload_nanny=[early_start.__file__], local_directory=str(tmp_path),
        dashboard_address="127.0.0.1:0",
        not_a_worker_option=1,  # Worker(**kwargs) raises in the worker process
    )  # fmt: skip
    try:
        with pytest.raises(Exception, match="Nanny failed to start"):
            await asyncio.wait_for(nanny.start(), 120)
    finally:
        await nanny.close()
