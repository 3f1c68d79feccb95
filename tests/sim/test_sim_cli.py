"""The command line: first two lines, SIGTERM cleans up and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from dask_hetzner.sim.cli import sim

ROOT = Path(__file__).resolve().parents[2]


def _start(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "dask_hetzner.sim", "--no-hosts", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


@pytest.mark.timeout(60)
def test_cli_prints_endpoint_and_token_then_stops_cleanly():
    proc = _start("--token", "secret", "--fault", "resource_unavailable:count=1", "--rate-limit", "100")
    try:
        first, second = proc.stdout.readline().strip(), proc.stdout.readline().strip()
        assert first.startswith("HCLOUD_ENDPOINT=http://127.0.0.1:") and first.endswith("/v1")
        assert second == "HCLOUD_TOKEN=secret"
        endpoint = first.split("=", 1)[1]
        headers = {"Authorization": "Bearer secret"}
        r = requests.get(f"{endpoint}/servers", headers=headers, timeout=10)
        assert r.status_code == 200 and r.headers["RateLimit-Limit"] == "100"
        body = {"name": "a", "server_type": "cpx22", "image": "ubuntu-24.04"}
        assert requests.post(f"{endpoint}/servers", json=body, headers=headers, timeout=10).status_code == 412
        assert requests.post(f"{endpoint}/servers", json=body, headers=headers, timeout=10).status_code == 201
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(60)
def test_cli_sigint():
    proc = _start()
    try:
        assert proc.stdout.readline().startswith("HCLOUD_ENDPOINT=")
        assert proc.stdout.readline().startswith("HCLOUD_TOKEN=")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_rejects_a_bad_fault_before_listening():
    result = CliRunner().invoke(sim, ["--no-hosts", "--fault", "no_such_fault"])
    assert result.exit_code == 2 and "no_such_fault" in result.output
    assert "HCLOUD_ENDPOINT" not in result.output
