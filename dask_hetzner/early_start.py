"""Start a worker before its scheduler runs: a preload copied to each worker's server.

A worker's server is usually bootstrapped before the scheduler answers. Its ``dask worker``
starts at once anyway, with this file as ``--preload-nanny`` and ``--preload`` (the worker
process's), so that what takes a worker seconds happens while the scheduler starts:

* the nanny's own imports;
* the worker process: with ``multiprocessing-method: forkserver`` the fork server is started
  here and imports distributed and its packages; then, if the scheduler does not answer yet,
  the nanny starts its worker process at once (``instantiate``), which sets up and waits in
  its own preload, so that once the scheduler answers it only has to register (distributed
  starts the worker process only after the nanny registered);
* then :func:`dask_setup` (in the nanny and in the worker process) waits until the
  scheduler completes a connection, trying every 50 ms while it refuses (distributed's own
  connect backs off up to seconds, and the nanny's gives up after 30 s), bounded by
  ``DASK_HETZNER_SCHEDULER_WAIT`` seconds.

This file is copied to the server as it is: at the top it imports the standard library only.
The client uses :func:`install`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

WAIT_ENV = "DASK_HETZNER_SCHEDULER_WAIT"
# Set for the nanny: its worker processes are forked from a server that imported these.
PROCESS_ENV = "DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD=forkserver"
POLL = 0.05  # seconds between connection attempts while the scheduler is not there
HANDSHAKE = 30.0  # seconds for one attempt once the scheduler listens (distributed's default)

logger = logging.getLogger("distributed.dask_hetzner.early_start")
# The line dask_setup logs, for whoever reads a worker's log (benchmarks, tests).
WAITED = re.compile(r"waited ([0-9.]+) s for the scheduler at (\S+)")


async def install(conn: Any) -> str:
    """Copy this file to a worker's server (``conn``: a :class:`dask_hetzner.remote.Remote`).

    Returns the ``--preload-nanny`` argument.
    """
    from .layout import LIB_DIR  # the client's side: on a server this file stands alone

    target = f"{LIB_DIR}/early_start.py"
    source = await asyncio.to_thread(Path(__file__).read_text)
    # Imported by the nanny, which runs as the dask user: readable, in a listable directory.
    await conn.put(target, source, mode=0o644, dir_mode=0o755)
    return target


# The worker's side ------------------------------------------------------------------------------


def _start_forkserver() -> None:
    import multiprocessing
    import multiprocessing.forkserver

    import dask

    if dask.config.get("distributed.worker.multiprocessing-method") != "forkserver":
        return
    from distributed.versions import optional_packages, required_packages

    # What distributed preloads itself (it skips packages that are not installed).
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["distributed", *required_packages, *optional_packages]
    )
    multiprocessing.forkserver.ensure_running()  # returns at once: the server imports alone


def _import_like_distributed() -> None:
    # distributed imports those packages in the nanny before its first fork: do it now, in
    # parallel with the fork server, instead of after the scheduler answered.
    from distributed.utils import get_mp_context

    get_mp_context()


async def _wait_for_scheduler(server: Any, deadline: float, early: asyncio.Future[Any] | None = None) -> float:
    """Until the scheduler completes a connection: refusals retried every 50 ms, a slow
    TLS handshake (a loaded machine) given its time. ``early``: the worker process's start,
    whose failure ends the wait.

    Not ``distributed.comm.connect``: its backoff grows to seconds between attempts (so a
    worker would notice a new scheduler late) and its timeout covers the handshake too.
    """
    from distributed.core import Status

    started = time.monotonic()
    while not await _answers(server):
        if early is not None and early.done() and early.result() != Status.running:
            # Its failure (raised by result()) closed the nanny: waiting is pointless.
            raise RuntimeError(f"the worker process did not start: {early.result()}") from None
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the scheduler at {server.scheduler.addr} did not answer within "
                f"{deadline - started:.0f} s of this process's start"
            )
        await asyncio.sleep(POLL)
    return time.monotonic() - started


async def dask_setup(server: Any) -> None:
    """The preload's entry point: ``server`` is the nanny, or the worker it started."""
    from distributed import Nanny

    deadline = time.monotonic() + float(os.environ.get(WAIT_ENV, "3600"))
    if isinstance(server, Nanny):
        waited = await _nanny_setup(server, deadline)
    else:
        waited = await _wait_for_scheduler(server, deadline)
    # The benchmark reads this line: a worker's own start is its total minus this wait.
    logger.info("waited %.3f s for the scheduler at %s", waited, server.scheduler.addr)


async def _nanny_setup(nanny: Any, deadline: float) -> float:
    _start_forkserver()
    imports = asyncio.ensure_future(asyncio.to_thread(_import_like_distributed))
    started = time.monotonic()
    if await _answers(nanny):  # a scale-up's worker: its scheduler runs already
        await imports
        return time.monotonic() - started
    await imports  # instantiate needs them (get_mp_context): done once, here
    # The nanny's own start (after this preload) finds the process starting and waits for
    # it; if it fails, instantiate has closed the nanny already.
    early = asyncio.ensure_future(nanny.instantiate())
    early.add_done_callback(lambda f: f.cancelled() or f.exception())  # logged by the nanny
    try:
        return await _wait_for_scheduler(nanny, deadline, early)
    except BaseException:
        early.cancel()
        raise


async def _answers(server: Any) -> bool:
    """One attempt: does the scheduler complete a connection now (with distributed's
    handshake, so it sees a client, not a connection closed before its handshake)?"""
    from distributed.comm import parse_address
    from distributed.comm.core import FatalCommClosedError
    from distributed.comm.registry import get_backend

    scheme, loc = parse_address(server.scheduler.addr)
    connector = get_backend(scheme).get_connector()
    try:
        comm = await asyncio.wait_for(connector.connect(loc, deserialize=True, **server.connection_args), HANDSHAKE)
        try:
            await asyncio.wait_for(comm.write(comm.handshake_info()), HANDSHAKE)
            await asyncio.wait_for(comm.read(), HANDSHAKE)
        finally:
            await comm.close()
    except FatalCommClosedError:
        raise  # e.g. TLS refused: waiting longer does not help
    except (OSError, asyncio.TimeoutError):
        return False
    return True
