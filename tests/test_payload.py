"""The user's job without servers: environment modes, local packages, files, variables, secrets."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from dask_hetzner import envsync, jobenv, localcode
from dask_hetzner.cloud import ConfigError
from dask_hetzner.settings import ClusterSettings


def _dist(site: Path, name: str, version: str, direct_url: dict | None = None) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if direct_url is not None:
        (info / "direct_url.json").write_text(json.dumps(direct_url))


def _project(root: Path, value: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "edpkg"\nversion = "0.2.0"\n'
    )
    (root / "edpkg").mkdir(exist_ok=True)
    (root / "edpkg" / "__init__.py").write_text(f"VALUE = {value}\n")
    return root


def test_sync_pins_every_distribution_and_takes_local_directories_as_wheels(tmp_path):
    site, src = tmp_path / "site", tmp_path / "src"
    src.mkdir()
    _dist(site, "numpy", "2.1.0")
    _dist(site, "edpkg", "0.2.0", {"url": src.as_uri(), "dir_info": {"editable": True}})
    _dist(site, "plainlocal", "1.0", {"url": src.as_uri(), "dir_info": {}})
    _dist(site, "fromgit", "0.1", {"url": "https://example.org/x.git", "vcs_info": {"vcs": "git", "commit_id": "abc"}})
    dists = list(metadata.distributions(path=[str(site)]))
    lines, local = envsync.synced(dists)
    assert sorted(lines) == ["fromgit @ git+https://example.org/x.git@abc", "numpy==2.1.0"]
    assert {(p.name, p.editable) for p in local} == {("edpkg", True), ("plainlocal", False)}
    # Installed from a file only this machine has: named, with every other such one.
    _dist(site, "wheelfile", "3.0", {"url": (tmp_path / "w.whl").as_uri(), "archive_info": {}})
    _dist(site, "another", "1.1", {"url": (tmp_path / "a.tar.gz").as_uri(), "archive_info": {}})
    with pytest.raises(ConfigError, match=r"wheelfile 3\.0 .*another 1\.1|another 1\.1 .*wheelfile 3\.0"):
        envsync.synced(list(metadata.distributions(path=[str(site)])))


def test_requirements_file_and_modes(tmp_path):
    _project(tmp_path / "edpkg", 1)
    req = tmp_path / "requirements.txt"
    req.write_text("# the job\nscikit-learn==1.5.2  # ml\n\n-e ./edpkg\n")
    lines, local = envsync.requirements_file(req)
    assert lines == ["scikit-learn==1.5.2"]
    assert [(p.name, p.path, p.editable) for p in local] == [("edpkg", (tmp_path / "edpkg").resolve(), True)]
    assert envsync.check_mode(str(req)) == str(req.resolve())
    assert envsync.check_mode("sync") == "sync"
    req.write_text("--index-url https://example.org\n")
    with pytest.raises(ConfigError, match=r"requirements.txt:1: pip options are not supported"):
        envsync.requirements_file(req)
    with pytest.raises(ConfigError, match="environment must be"):
        envsync.check_mode(3)


def test_wheels_are_rebuilt_only_when_the_source_changes(tmp_path):
    project = _project(tmp_path / "edpkg", 1)
    pkg = localcode.LocalPackage("edpkg", project, editable=True)
    first = localcode.build_wheel(pkg, cache=tmp_path / "cache")
    assert first.name == "edpkg-0.2.0-py3-none-any.whl"
    again = localcode.build_wheel(pkg, cache=tmp_path / "cache")
    assert again == first  # same source: the cached wheel, not a new build
    (project / "__pycache__").mkdir()
    (project / "__pycache__" / "x.pyc").write_bytes(b"junk")
    assert localcode.source_digest(project) == first.digest  # caches are not source
    _project(project, 2)
    changed = localcode.build_wheel(pkg, cache=tmp_path / "cache")
    assert changed.digest != first.digest
    with zipfile.ZipFile(changed.path) as whl:
        assert whl.read("edpkg/__init__.py") == b"VALUE = 2\n"


def test_uploads_are_checked_and_archived_by_name(tmp_path):
    (tmp_path / "helpers.py").write_text("X = 1\n")
    pkg = tmp_path / "mypkg"
    (pkg / "__pycache__").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__pycache__" / "m.pyc").write_bytes(b"")
    paths = localcode.check_uploads([str(tmp_path / "helpers.py"), str(pkg)])
    with tarfile.open(fileobj=io.BytesIO(localcode.upload_archive(paths))) as tar:
        assert sorted(tar.getnames()) == ["helpers.py", "mypkg", "mypkg/__init__.py"]
    with pytest.raises(ConfigError, match="upload must be a list"):
        localcode.check_uploads("helpers.py")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "helpers.py").write_text("")
    with pytest.raises(ConfigError, match="would both be helpers.py"):
        localcode.check_uploads([str(tmp_path / "helpers.py"), str(tmp_path / "other" / "helpers.py")])


def test_secrets_stay_out_of_reprs_and_messages(tmp_path):
    secret = "very-secret-value"
    env = jobenv.SecretEnv(jobenv.check_env({"S3_KEY": secret}, "secret_env"))
    assert secret not in repr(env) and secret not in str(env) and "S3_KEY" in repr(env)
    for bad in ({"S3 KEY": secret}, {"K": secret.encode()}, {"K": 7}, {"K": "a\0b"}):
        with pytest.raises(ConfigError) as info:
            jobenv.check_env(bad, "secret_env")
        assert secret not in str(info.value)
    # The file the processes read: every value quoted for the shell, as written.
    text = jobenv.process_env_file({"A": "it's $HOME `x`"}, env, ".dask-hetzner/upload")
    out = subprocess.run(
        ["bash", "-c", f'{text}\nprintf "%s|%s|%s" "$A" "$S3_KEY" "$PYTHONPATH"'],
        capture_output=True, text=True, env={"HOME": "/h", "PYTHONPATH": "/mine"},
    ).stdout
    assert out == f"it's $HOME `x`|{secret}|/h/.dask-hetzner/upload:/mine"


def test_object_storage_forwards_credentials_as_secrets_and_the_endpoint(tmp_path):
    env = {"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "SECRET"}
    plain, secret = jobenv.object_storage(True, "nbg1", env)
    assert plain["AWS_ENDPOINT_URL_S3"] == "https://nbg1.your-objectstorage.com"
    assert secret == env and "SECRET" not in json.dumps(plain)
    creds = tmp_path / "credentials"
    creds.write_text("[job]\naws_access_key_id = P\naws_secret_access_key = Q\n")
    _, secret = jobenv.object_storage(True, "fsn1", {"AWS_PROFILE": "job", "AWS_SHARED_CREDENTIALS_FILE": str(creds)})
    assert secret == {"AWS_ACCESS_KEY_ID": "P", "AWS_SECRET_ACCESS_KEY": "Q"}
    # The settings record (cluster.json) holds the endpoint choice, never the credentials.
    s = ClusterSettings.build(object_storage=True, env={"MODE": "x"})
    assert s.metadata()["object_storage"] is True and s.metadata()["env"] == {"MODE": "x"}
    assert "secret_env" not in s.metadata()


def test_a_cluster_json_from_before_environments_keeps_the_pinned_stack():
    stored = ClusterSettings.build(name="old1").metadata()
    del stored["environment"]  # as written before this setting existed
    assert ClusterSettings.from_metadata(stored).environment == "minimal"
    assert ClusterSettings.from_metadata({**stored, "environment": "sync"}).environment == "sync"
