#!/usr/bin/env python
"""Environment sync against the minimal stack: what ``environment="sync"`` costs at start-up.

    python benchmarks/env_sync.py                    # realistic profile, time scale 0.2
    python benchmarks/env_sync.py --time-scale 1 --repeat 2

It makes a typical data-science client environment in a temporary virtual environment
(numpy, pandas, pyarrow, scikit-learn, s3fs, uv, this project, and one editable local package),
then, run from that environment, starts a 2-worker cluster on the simulator's ``realistic``
profile with ``environment="minimal"`` and with ``environment="sync"``, and reports for each
the time to ready (constructor to 2 workers connected) and the bootstrap alone (the slowest
server's environment build, from SSH login to done). Every run after the first of a mode has
the simulator's package cache warm, as a Hetzner server near PyPI's CDN is fast; the first
run of each mode fills it. Measurements, not assertions: the goal (sync bootstrap at most
1.5x the minimal one) is reported as met or missed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.5
PACKAGES = ["numpy", "pandas", "pyarrow", "scikit-learn", "s3fs", "uv"]  # uv builds the wheel


def make_env(where: Path) -> Path:
    """A client environment: the data-science stack, this project, one editable package."""
    python = where / "venv" / "bin" / "python"
    uv = [sys.executable, "-m", "uv"]
    subprocess.run([*uv, "venv", "-q", "--python", sys.executable, str(where / "venv")], check=True)
    pkg = where / "mylib"
    (pkg / "mylib").mkdir(parents=True)
    (pkg / "mylib" / "__init__.py").write_text("def answer():\n    return 42\n")
    (pkg / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "mylib"\nversion = "0.1.0"\n'
    )
    subprocess.run(
        [*uv, "pip", "install", "-q", "--python", str(python), str(ROOT), "-e", str(pkg), *PACKAGES],
        check=True,
    )
    return python


def measure(mode: str, time_scale: float) -> dict[str, float]:
    """Child mode (inside the made environment): one cluster start with ``mode``."""
    import dask
    from distributed import Client

    from dask_hetzner import HetznerCluster
    from dask_hetzner.sim import Simulator

    with Simulator(profile="realistic", time_scale=time_scale) as sim, dask.config.set(sim.dask_config()):
        t0 = time.monotonic()
        with HetznerCluster(workers=2, name=f"bench-{mode}", environment=mode) as cluster, Client(cluster) as c:
            c.wait_for_workers(2, timeout=900)
            ready = time.monotonic() - t0
            nodes = [cluster.scheduler, *cluster.workers.values()]
            boot = max(n.prepared.timings["bootstrap"] - n.prepared.timings["ssh"] for n in nodes)
            if mode == "sync":
                assert c.submit(lambda: __import__("mylib").answer()).result() == 42
    return {"ready_s": round(ready, 2), "bootstrap_s": round(boot, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--time-scale", type=float, default=0.2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.time_scale)))
        return
    with tempfile.TemporaryDirectory(prefix="dask-hetzner-envsync-") as tmp:
        python = make_env(Path(tmp))
        results: dict[str, list[dict[str, float]]] = {"minimal": [], "sync": []}
        for _ in range(args.repeat):
            for mode in results:
                out = subprocess.run(
                    [str(python), __file__, "--child", mode, "--time-scale", str(args.time_scale)],
                    capture_output=True, text=True, cwd=tmp,
                )
                if out.returncode != 0:
                    sys.exit(f"{mode} failed:\n" + "\n".join(out.stderr.splitlines()[-30:]))
                results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    last = {mode: runs[-1] for mode, runs in results.items()}
    ratio = last["sync"]["bootstrap_s"] / last["minimal"]["bootstrap_s"]
    print(f"time scale {args.time_scale}, runs per mode {args.repeat} (last run: warm cache)")
    print("| environment | time to ready (s) | bootstrap (s) | all runs |")
    print("|---|---:|---:|---|")
    for mode, runs in results.items():
        print(f"| {mode} | {last[mode]['ready_s']} | {last[mode]['bootstrap_s']} | {runs} |")
    print(f"sync/minimal bootstrap: {ratio:.2f}x (goal <= {GOAL}x: {'met' if ratio <= GOAL else 'missed'})")


if __name__ == "__main__":
    main()
