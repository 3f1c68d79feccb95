"""The lowest versions setup.cfg allows really work (docs/simulator.md, "Deliberate behaviours").

The catalog reads ``ServerType.locations[].available``, which hcloud-python has only since
v2.18.0 (its CHANGELOG): the floor's own release is installed beside the test and the catalog
read through it, against the simulator.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

READ_CATALOG = """
import sys
sys.path.insert(0, sys.argv[1])
import asyncio, hcloud
from packaging.version import Version
from dask_hetzner.cloud import Cloud
from dask_hetzner.sim import Simulator

assert Version(hcloud.__version__) == Version(sys.argv[2]), (hcloud.__version__, sys.argv[2])

async def main(sim):
    cloud = Cloud(sim.token, sim.endpoint)
    try:
        types = await cloud.server_types()
        assert "fsn1" in types["cx23"].available, types["cx23"]
    finally:
        cloud.close()

with Simulator(hosts=False) as sim:
    asyncio.run(main(sim))
print("ok")
"""


def _floor(package: str) -> str:
    for line in importlib.metadata.requires("dask-hetzner") or []:
        req = Requirement(line)
        if req.name == package and not req.marker:
            floors = [s.version for s in req.specifier if s.operator == ">="]
            assert floors, f"{package} has no lower bound in setup.cfg: {line}"
            return floors[0]
    raise AssertionError(f"{package} is not a requirement of dask-hetzner")


def test_the_hcloud_floor_reads_the_catalog(tmp_path: Path) -> None:
    floor = _floor("hcloud")
    target = tmp_path / "hcloud-floor"
    uv = Path(sys.executable).with_name("uv")
    installed = subprocess.run(
        [str(uv), "pip", "install", "-q", "--no-deps", "--target", str(target), f"hcloud=={floor}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if installed.returncode != 0:
        pytest.skip(f"hcloud=={floor} cannot be installed here: {installed.stderr.strip()[-300:]}")
    env = {k: v for k, v in os.environ.items() if k not in ("HCLOUD_TOKEN", "HCLOUD_ENDPOINT")}
    run = subprocess.run(
        [sys.executable, "-c", READ_CATALOG, str(target), floor],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert run.returncode == 0, f"hcloud {floor} (setup.cfg's floor) cannot read the catalog:\n{run.stderr[-2000:]}"
    assert run.stdout.split() == ["ok"]
