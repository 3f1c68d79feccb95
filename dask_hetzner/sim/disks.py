"""Where a simulator keeps its servers' disks: a directory of its own, on this machine's disk
or in memory; and the directories of simulators that died without closing.

In memory (``disks="memory"``, or ``DASK_HETZNER_SIM_DISKS=memory``) the directory is a
tmpfs of its own. Servers make and delete thousands of files each (an environment, bytecode,
logs); on a disk without a journal, ext4 looks at every recently deleted inode before it
hands out a new one, and a test run spent a third of this machine's CPU doing that. A tmpfs
has no such cost. It takes memory: about 0.3 GB a server with the dask stack, bounded by
``MEMORY_SHARE`` of this machine's memory (a server that fills it sees a full disk). Large
runs (the 50-server benchmarks) keep their disks on disk, the default.

A tmpfs needs root (``mount``), as the sandbox does; without it the disks stay on disk.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "DASK_HETZNER_SIM_DISKS"
KINDS = ("disk", "memory")
# A simulator's directory: ROOT_PREFIX<its pid>-<random>.
ROOT_PREFIX = "dask-hetzner-sim-"
MEMORY_SHARE = 0.5  # of this machine's memory, at most, for one simulator's disks


def kind(option: str | None) -> str:
    """``option``, else ``$DASK_HETZNER_SIM_DISKS``, else ``"disk"``; anything else is refused."""
    chosen = option if option is not None else (os.environ.get(ENV) or "disk")
    if chosen not in KINDS:
        source = "disks" if option is not None else ENV
        raise ValueError(f"{source} must be 'disk' or 'memory', got {chosen!r}")
    return chosen


def make_root(disks: str) -> tuple[Path, bool]:
    """A new directory for one simulator (after reclaiming dead ones'); True if it is a tmpfs."""
    reclaim_root_dirs()
    path = Path(tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}{os.getpid()}-"))
    if disks != "memory":
        return path, False
    if os.geteuid() != 0 or shutil.which("mount") is None:
        log.warning("simulator: disks in memory need root (a tmpfs); keeping them on disk in %s", path)
        return path, False
    size = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * MEMORY_SHARE)
    options = f"size={size},mode=0700"
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "dask-hetzner-sim", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        log.warning("simulator: no tmpfs for the disks (%s); keeping them on disk", done.stderr.strip())
        return path, False
    return path, True


def remove_root(path: Path) -> None:
    """Delete a simulator's directory (its tmpfs: unmounted, which frees it at once)."""
    if os.path.ismount(path):
        # Lazy: a process of a server that is still exiting cannot keep it mounted.
        subprocess.run(["umount", "--lazy", str(path)], capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)


def reclaim_root_dirs() -> list[Path]:
    """Delete the directories of simulators that died without closing (SIGKILL: their pid
    is gone), as the next start does with their links (``netns.reclaim``). Returns them."""
    gone = []
    for path in Path(tempfile.gettempdir()).glob(f"{ROOT_PREFIX}*-*"):
        pid = path.name[len(ROOT_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            remove_root(path)
            gone.append(path)
    return gone
