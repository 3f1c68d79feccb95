"""state.py: the local state directory is private and written atomically."""

from __future__ import annotations

import stat
from pathlib import Path

from dask_hetzner.state import ClusterState, Secrets

SECRETS = Secrets("ca-cert", "ca-key", "client-cert", "client-key", "ssh-private", "ssh-public")


def test_files_private_and_no_temporaries_left(tmp_path: Path):
    state = ClusterState(tmp_path / "root", "c1")
    state.create({"location": "fsn1"}, SECRETS)
    state.pin_host_key("c1-scheduler", 1, "ssh-ed25519 AAAA")
    assert stat.S_IMODE(state.path.stat().st_mode) == 0o700
    for path in state.path.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path
        assert not path.name.startswith("."), path  # no temporary file of a write is left
    # overwriting keeps the mode and leaves nothing behind either
    state.write_metadata({"format": 1, "location": "nbg1"})
    assert state.metadata()["location"] == "nbg1"
    assert stat.S_IMODE(state.metadata_file.stat().st_mode) == 0o600
    assert sorted(p.name for p in state.path.iterdir()) == [
        "ca.key",
        "ca.pem",
        "client.key",
        "client.pem",
        "cluster.json",
        "hosts",
        "ssh_key",
        "ssh_key.pub",
    ]
    assert state.secrets() == SECRETS
