"""The user's job on the cluster end to end: local code, an editable package, variables, a
secret and an S3 dataset from tasks, on two workers and on one added by ``scale`` later.

The S3 service is moto's server on 127.0.0.1 (the simulated servers share the loopback
network), standing in for Hetzner Object Storage.
"""

from __future__ import annotations

import json
import logging
import secrets
import stat
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
from distributed import Client
from support import processes_showing, servers_of

from dask_hetzner import HetznerCluster
from dask_hetzner.cloud import ConfigError

pytestmark = pytest.mark.slow


def _project(root: Path, value: int) -> Path:
    """An editable-style local project (built into a wheel on the client by the cluster)."""
    root.mkdir(exist_ok=True)
    (root / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "jobpkg"
        version = "0.1.0"
        """))
    (root / "jobpkg").mkdir(exist_ok=True)
    (root / "jobpkg" / "__init__.py").write_text(f"VALUE = {value}\n")
    return root


@pytest.fixture
def s3(sim, monkeypatch):
    from moto.server import ThreadedMotoServer

    # Where servers reach this machine (each server's own 127.0.0.1 is its own).
    address = getattr(sim.hosts, "client_ip", None) or "127.0.0.1"
    server = ThreadedMotoServer(ip_address=address, port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        key, secret = "AKIDJOB" + secrets.token_hex(4), "s3secret-" + secrets.token_hex(16)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        endpoint = f"http://{host}:{port}"
        # The client reads the dataset's metadata itself, through the same endpoint.
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")  # moto: an AWS region
        yield endpoint, secret
    finally:
        server.stop()


def test_code_variables_secrets_and_s3_data_reach_every_worker(sim, s3, tmp_path, caplog):
    import dask.dataframe as dd
    import pandas as pd
    import s3fs

    def _probe() -> dict:
        """On a worker: what the job's code sees (nested: pickled by value, workers lack this module)."""
        import hashlib
        import os

        import helpers  # uploaded loose module
        import jobpkg  # local package, wheel built on the client

        return {
            "helper": helpers.double(21),
            "pkg": jobpkg.VALUE,
            "plain": os.environ.get("JOB_MODE"),
            "secret": hashlib.sha256(os.environ.get("JOB_SECRET", "").encode()).hexdigest(),
        }

    def _sum_from_s3(path: str) -> float:
        """Runs on a worker: read the dataset with s3fs, credentials and endpoint from the environment."""
        import pandas as pd

        return float(pd.read_parquet(path)["x"].sum())

    endpoint, s3_secret = s3
    job_secret = "jobsecret-" + secrets.token_hex(16)
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.mkdir("data")
    pd.DataFrame({"x": range(100)}).to_parquet("s3://data/in/part.0.parquet", storage_options={"endpoint_url": endpoint})
    helpers = tmp_path / "helpers.py"
    helpers.write_text("def double(x):\n    return 2 * x\n")
    project = _project(tmp_path / "jobpkg-src", 1)
    caplog.set_level(logging.DEBUG)
    cluster = HetznerCluster(
        workers=2, name="job1", environment="minimal",
        packages=[f"s3fs=={metadata.version('s3fs')}", str(project)],
        upload=[str(helpers)], env={"JOB_MODE": "plain-value"}, secret_env={"JOB_SECRET": job_secret},
        object_storage=endpoint,
    )  # fmt: skip
    with cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=120)
        want = {"helper": 42, "pkg": 1, "plain": "plain-value",
                "secret": __import__("hashlib").sha256(job_secret.encode()).hexdigest()}  # fmt: skip
        assert list(client.run(_probe).values()) == [want, want]
        # Tasks read the dataset with dask.dataframe + s3fs, and write a result back.
        df = dd.read_parquet("s3://data/in/")
        assert df.x.sum().compute() == 4950
        df.assign(y=df.x * 2).to_parquet("s3://data/out/")
        assert pd.read_parquet("s3://data/out/", storage_options={"endpoint_url": endpoint}).y.sum() == 9900
        assert client.submit(_sum_from_s3, "s3://data/in/", pure=False).result(timeout=60) == 4950

        # The local package changes: the next scale-up builds and ships the new version.
        _project(project, 2)
        cluster.scale(3)
        client.wait_for_workers(3, timeout=180)
        new = cluster.workers["worker-2"].server
        (address,) = [a for a, w in client.scheduler_info()["workers"].items() if w["name"] == "worker-2"]
        assert client.run(_probe, workers=[address])[address] == {**want, "pkg": 2}
        assert client.submit(_sum_from_s3, "s3://data/in/", workers=[address], pure=False).result(timeout=60) == 4950

        _check_secrets_confined(sim, cluster, [job_secret, s3_secret], caplog.text)
        assert new is not None
    assert servers_of(sim, "job1") == []


def _check_secrets_confined(sim, cluster, hidden: list[str], client_log: str) -> None:
    """Each secret: in one 0600 file a server, and in none of the places anyone can look."""
    logs = cluster.get_logs()
    visible = {
        "repr": repr(cluster) + cluster._repr_html_() + repr(cluster.context.payload),
        "client log at DEBUG": client_log,
        "dask logs": json.dumps(dict(logs)),
        "local state": "".join(p.read_text(errors="replace") for p in Path(cluster.state_dir).rglob("*") if p.is_file()),
    }
    for server in servers_of(sim, "job1"):
        home = sim.hosts.directory(server.id) / ".dask-hetzner"
        env_file = home / "process.env"
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        assert all(s in env_file.read_text() for s in hidden)
        visible[f"{server.name} labels"] = json.dumps(server.labels)
        visible[f"{server.name} user_data"] = sim.store.servers[server.id].user_data or ""
        for log in home.glob("*.log"):
            visible[f"{server.name} {log.name}"] = log.read_text(errors="replace")
    for secret in hidden:
        assert processes_showing(secret) == [], "a secret shows in a process's arguments"
        leaks = [where for where, text in visible.items() if secret in text]
        assert leaks == [], f"a secret shows in {leaks}"


def test_bad_job_input_is_refused_before_anything_exists(sim, tmp_path, monkeypatch):
    secret = "s3cr3t-" + secrets.token_hex(8)
    cases = [
        ({"secret_env": {"bad-name": secret}}, "not a valid environment variable name"),
        ({"secret_env": {"TOKEN": b"bytes"}}, r"secret_env\['TOKEN'\] must be a string"),
        ({"upload": [str(tmp_path / "missing.py")]}, "missing.py does not exist"),
        ({"env": {"A": 1}}, r"env\['A'\] must be a string"),
        ({"environment": str(tmp_path / "nope.txt")}, "cannot read requirements file"),
        ({"apt_packages": ["libgomp1; rm -rf /"]}, "not a Debian package name"),
        ({"object_storage": "s3.example"}, "object_storage must be True or an endpoint URL"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            HetznerCluster(workers=1, name="badjob", **kwargs)
        assert secret not in str(info.value)
    # Credentials missing for object storage: named, nothing created.
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="no S3 credentials"):
        HetznerCluster(workers=1, name="badjob", object_storage=True)
    with pytest.raises(ConfigError, match="no endpoint in ash"):
        HetznerCluster(workers=1, name="badjob", object_storage=True, location="ash")
    # A package that does not exist, and a version that does not: named by the resolution
    # for the servers' platform, before any server exists.
    for spec in ("dask-hetzner-no-such-package-xyz", "six==0.0.1"):
        with pytest.raises(ConfigError, match="cannot be installed on x86 Linux") as info:
            HetznerCluster(workers=1, name="badjob", packages=[spec])
        assert spec.split("==")[0] in str(info.value)
    assert servers_of(sim, "badjob") == []


def test_system_setup_runs_before_the_environment_and_a_failure_rolls_back(sim, caplog):
    marker = "setup-" + secrets.token_hex(4)
    with HetznerCluster(
        workers=0, name="setup1", apt_packages=["libgomp1"],
        setup_commands=[f"echo {marker} >> setup-ran.txt", "test -w /tmp"],
    ) as cluster:  # fmt: skip
        server = cluster.scheduler.server
        home = sim.hosts.directory(server.id)
        # The simulator's apt shim records what Hetzner's Ubuntu would install.
        shims = (home / ".sim" / "shims.log").read_text()
        assert "apt-get install -y -q --no-install-recommends libgomp1" in shims
        assert (home / "setup-ran.txt").read_text() == f"{marker}\n"
        # Idempotent: the same inputs again change nothing (the bootstrap's marker).
        conn = cluster.scheduler.prepared.conn
        cluster.sync(conn.run, "bash .dask-hetzner/bootstrap.sh", timeout=120)
        assert (home / "setup-ran.txt").read_text() == f"{marker}\n"
    with pytest.raises(Exception, match=r"(?s)setup-about-to-fail.*a setup command failed") as info:
        HetznerCluster(workers=1, name="setup2", setup_commands=["echo setup-about-to-fail; exit 7"])
    assert "server setup2-scheduler: bootstrap failed" in str(info.value)
    assert servers_of(sim, "setup2") == []
