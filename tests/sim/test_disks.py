"""Where a simulator keeps its servers' disks (dask_hetzner.sim.disks)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dask_hetzner.sim import Simulator, disks


def _mount_type(path: Path) -> str | None:
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[1] == str(path):
                return fields[2]
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="a tmpfs needs root")
async def test_disks_in_memory_are_a_tmpfs_of_the_simulator_gone_at_close() -> None:
    async with Simulator(disks="memory", hosts=False) as sim:
        root = sim.root_dir
        assert root is not None and sim.disks_in_memory
        assert _mount_type(root) == "tmpfs"
        (root / "a-file").write_text("x")
    assert _mount_type(root) is None
    assert not root.exists()


async def test_disks_on_disk_are_a_plain_directory() -> None:
    async with Simulator(disks="disk", hosts=False) as sim:
        root = sim.root_dir
        assert root is not None and not sim.disks_in_memory
        assert root.is_dir() and _mount_type(root) is None
    assert not root.exists()


def test_the_environment_chooses_and_a_bad_choice_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(disks.ENV, "disk")
    assert disks.kind(None) == "disk"
    assert disks.kind("memory") == "memory"  # the argument wins
    monkeypatch.setenv(disks.ENV, "ram")
    with pytest.raises(ValueError, match=r"^DASK_HETZNER_SIM_DISKS must be 'disk' or 'memory', got 'ram'$"):
        Simulator()
    with pytest.raises(ValueError, match=r"^disks must be 'disk' or 'memory', got 'tape'$"):
        Simulator(disks="tape")
