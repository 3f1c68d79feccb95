"""A cluster's access exported to one file and imported into another state directory."""

from __future__ import annotations

import stat

import dask
import pytest

from dask_hetzner.access import export_access, import_access
from dask_hetzner.state import ClusterState, Secrets, StateError

SECRETS = Secrets("ca-cert", "ca-key", "client-cert", "client-key", "ssh-private", "ssh-public")


@pytest.mark.parametrize("passphrase", [None, "correct horse"])
def test_export_then_import_in_another_state_dir(tmp_path, passphrase):
    a, b, file = tmp_path / "a", tmp_path / "b", tmp_path / "c1.access"
    original = ClusterState(a, "c1")
    original.create({"location": "fsn1", "endpoint": "http://x"}, SECRETS)
    original.pin_host_key("c1-scheduler", 7, "ssh-ed25519 AAAA")
    with dask.config.set({"hetzner.state-dir": str(a)}):
        export_access("c1", file, passphrase)
        with pytest.raises(FileExistsError):
            export_access("c1", file, passphrase)  # never over an existing file
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert ("client-key" in file.read_text()) is (passphrase is None)
    with dask.config.set({"hetzner.state-dir": str(b)}):
        if passphrase:
            with pytest.raises(StateError, match="passphrase: give it"):
                import_access(file)
            with pytest.raises(StateError, match="wrong passphrase"):
                import_access(file, "wrong")
        assert import_access(file, passphrase) == "c1"
        with pytest.raises(StateError, match="already exists"):
            import_access(file, passphrase)
    copy = ClusterState(b, "c1")
    assert copy.secrets() == SECRETS
    assert copy.metadata() == original.metadata()
    assert copy.host_keys() == {"c1-scheduler": (7, "ssh-ed25519 AAAA")}
    assert stat.S_IMODE(copy.client_key.stat().st_mode) == 0o600


def test_not_an_access_file(tmp_path):
    (tmp_path / "x").write_text("{}")
    with pytest.raises(StateError, match="not a dask-hetzner access file"):
        import_access(tmp_path / "x")
