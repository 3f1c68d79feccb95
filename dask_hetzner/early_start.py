"""Start a worker before its scheduler runs: a nanny preload copied to each worker's server.

A worker's server is usually bootstrapped before the scheduler answers. Its ``dask worker``
starts at once anyway, with ``--preload-nanny ~/.dask-hetzner/lib/early_start.py``, so that what
takes a worker seconds happens while the scheduler starts:

* the nanny's own imports;
* the worker process's imports: with ``multiprocessing-method: forkserver`` the fork server
  is started here and imports distributed and its packages while we wait, so the worker
  process is later forked ready instead of importing everything again;
* then :func:`dask_setup` waits until the scheduler completes a connection, trying every
  50 ms while it refuses (the nanny's own connect backs off up to seconds and gives up
  after 30 s), bounded by ``DASK_HETZNER_SCHEDULER_WAIT`` seconds.

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


async def _wait_for_scheduler(nanny: Any, deadline: float) -> float:
    """Until the scheduler completes a connection: refusals retried every 50 ms, a slow
    TLS handshake (a loaded machine) given its time.

    Not ``distributed.comm.connect``: its backoff grows to seconds between attempts (so a
    worker would notice a new scheduler late) and its timeout covers the handshake too.
    """
    from distributed.comm import parse_address
    from distributed.comm.core import FatalCommClosedError
    from distributed.comm.registry import get_backend

    address = nanny.scheduler.addr
    scheme, loc = parse_address(address)
    connector = get_backend(scheme).get_connector()
    started = time.monotonic()
    while True:
        try:
            comm = await asyncio.wait_for(
                connector.connect(loc, deserialize=True, **nanny.connection_args), HANDSHAKE
            )
            try:
                # The handshake distributed's connect() does: the scheduler sees a client.
                await asyncio.wait_for(comm.write(comm.handshake_info()), HANDSHAKE)
                await asyncio.wait_for(comm.read(), HANDSHAKE)
            finally:
                await comm.close()
            return time.monotonic() - started
        except FatalCommClosedError:
            raise  # e.g. TLS refused: waiting longer does not help
        except (OSError, asyncio.TimeoutError):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the scheduler at {address} did not answer within "
                    f"{deadline - started:.0f} s of the nanny's start"
                ) from None
            await asyncio.sleep(POLL)


async def dask_setup(nanny: Any) -> None:
    t0 = time.monotonic()
    deadline = t0 + float(os.environ.get(WAIT_ENV, "3600"))
    _start_forkserver()
    imports = asyncio.ensure_future(asyncio.to_thread(_import_like_distributed))
    waited = await _wait_for_scheduler(nanny, deadline)
    await imports
    # The benchmark reads this line: a worker's own start is its total minus this wait.
    logger.info("waited %.3f s for the scheduler at %s", waited, nanny.scheduler.addr)
