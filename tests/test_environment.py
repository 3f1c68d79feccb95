"""environment.py: versions, requirements, and the real bootstrap script run locally with bash.

The bootstrap runs against a package index on 127.0.0.1 (tests/localindex.py) in a temporary
HOME, so nothing leaves the machine.  A test against the real PyPI with the real dask stack is
opt-in (DASK_HETZNER_NETWORK_TESTS=1) and marked slow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import dask
import distributed
import pytest
from localindex import LocalIndex, build_probe_wheel, build_uv_wheels

from dask_hetzner import environment, layout
from dask_hetzner.environment import (
    DASHBOARD_DEFAULT,
    REQUIRED_PACKAGES,
    VersionMismatch,
    bootstrap_script,
    check_versions,
    local_versions,
    requirements,
)

PY = f"{sys.version_info[0]}.{sys.version_info[1]}"
# Every run of the script is bounded by this (seconds).
BOUND = 300


# --------------------------------------------------------------------------------------------
# versions and requirements


def test_local_versions():
    v = local_versions()
    assert v["python"] == PY
    assert v["dask"] == dask.__version__ and v["distributed"] == distributed.__version__
    for name in REQUIRED_PACKAGES:
        assert v[name] == metadata.version(name)
    for name in environment.OPTIONAL_PACKAGES:
        try:
            expected = metadata.version(name)
        except metadata.PackageNotFoundError:
            assert name not in v
        else:
            assert v[name] == expected


def test_default_uv_version(monkeypatch):
    assert environment.default_uv_version() == metadata.version("uv")

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(environment.metadata, "version", missing)
    assert environment.default_uv_version() == environment.DEFAULT_UV_VERSION


VERSIONS = {
    "python": "3.11",
    "dask": "2026.8.0",
    "distributed": "2026.8.0",
    "cloudpickle": "3.1.3",
    "msgpack": "1.2.4",
    "toolz": "1.2.0",
    "tornado": "6.6.1",
    "numpy": "2.4.6",
    "bokeh": "3.9.2",
}


def test_requirements_pin_client_versions():
    sched = requirements("scheduler", VERSIONS, ["xarray>=2024.1", "scipy"])
    assert sched[:8] == [
        "dask==2026.8.0",
        "distributed==2026.8.0",
        "cloudpickle==3.1.3",
        "msgpack==1.2.4",
        "toolz==1.2.0",
        "tornado==6.6.1",
        "numpy==2.4.6",
        "bokeh==3.9.2",
    ]
    assert sched[8:] == ["xarray>=2024.1", "scipy"]
    assert not any(r.startswith("python") for r in sched)
    worker = requirements("worker", VERSIONS, ["scipy"])
    assert "bokeh==3.9.2" not in worker and "numpy==2.4.6" in worker and worker[-1] == "scipy"


def test_requirements_dashboard_default_without_client_bokeh():
    versions = {k: v for k, v in VERSIONS.items() if k != "bokeh"}
    assert DASHBOARD_DEFAULT in requirements("scheduler", versions, [])
    assert DASHBOARD_DEFAULT not in requirements("worker", versions, [])
    assert requirements("scheduler", versions, ["bokeh==3.4.0"])[-1] == "bokeh==3.4.0"
    assert DASHBOARD_DEFAULT not in requirements("scheduler", versions, ["bokeh==3.4.0"])


@pytest.mark.parametrize(
    "bad", ["numpy>>1", "pandas==", "-e .", "", "   ", "scipy; python_version >"]
)
def test_requirements_reject_bad_specs(bad):
    with pytest.raises(ValueError, match="invalid package spec"):
        requirements("worker", VERSIONS, ["scipy", bad])


def test_requirements_reject_conflicts_and_bad_arguments():
    with pytest.raises(ValueError, match="conflicts with the client's dask 2026.8.0"):
        requirements("worker", VERSIONS, ["dask<2025"])
    with pytest.raises(ValueError, match="conflicts"):
        requirements("worker", VERSIONS, ["numpy @ https://example.invalid/numpy.whl"])
    # compatible specs for pinned packages are fine (extras too)
    assert requirements("worker", VERSIONS, ["dask[dataframe]>=2024.1"])[-1] == (
        "dask[dataframe]>=2024.1"
    )
    with pytest.raises(ValueError, match="role"):
        requirements("client", VERSIONS, [])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        requirements("worker", VERSIONS, "numpy")
    with pytest.raises(ValueError, match="invalid package spec"):
        requirements("worker", VERSIONS, [None])  # type: ignore[list-item]


def test_check_versions():
    remote = dict(VERSIONS, python="3.11")
    check_versions(VERSIONS, remote)
    check_versions(VERSIONS, {k: v for k, v in remote.items() if k != "bokeh"})  # a worker
    check_versions({"python": "3.11", "numpy": "2.0"}, {"python": "3.11", "numpy": "2.0.0"})
    with pytest.raises(VersionMismatch) as info:
        check_versions(
            VERSIONS,
            dict(remote, python="3.12", dask="2024.1.0", numpy=None) | {"numpy": "1.26.4"},
            where="worker-3",
        )
    err = info.value
    assert set(err.differences) == {"python", "dask", "numpy"}
    message = str(err)
    assert "dask: client 2026.8.0, worker-3 2024.1.0" in message
    assert "python: client 3.11, worker-3 3.12" in message
    with pytest.raises(VersionMismatch, match="cloudpickle: client 3.1.3, remote missing"):
        check_versions(VERSIONS, {k: v for k, v in remote.items() if k != "cloudpickle"})


def test_compare_step_names_mismatches(tmp_path: Path):
    """Step 4 of the script: the pins against the environment's report."""
    report = tmp_path / "versions.json"
    report.write_text(json.dumps({"python": PY, "dask": "2024.1.0", "numpy": "2.0.0"}))
    pins = {"python": PY, "dask": "2026.8.0", "numpy": "2.0", "toolz": "1.2.0"}
    proc = subprocess.run(
        [sys.executable, "-c", environment.script("compare_versions.py"), str(report), json.dumps(pins)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "dask: installed 2024.1.0, pinned 2026.8.0" in proc.stderr
    assert "toolz: not installed (pinned 1.2.0)" in proc.stderr
    assert "numpy" not in proc.stderr  # 2.0 == 2.0.0
    ok = dict(pins, dask="2024.1.0", toolz=None)
    del ok["toolz"]
    proc = subprocess.run(
        [sys.executable, "-c", environment.script("compare_versions.py"), str(report), json.dumps(ok)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def test_bootstrap_script_validates_and_quotes():
    with pytest.raises(ValueError):
        bootstrap_script("worker", ["ok", "bad spec ((("], python=PY, uv_version="0.13.9")
    with pytest.raises(ValueError):
        bootstrap_script("worker", ["ok"], python="3.11; rm -rf /", uv_version="0.13.9")
    with pytest.raises(ValueError):
        bootstrap_script("worker", ["ok"], python=PY, uv_version="$(reboot)")
    script = bootstrap_script(
        "worker",
        ['probe; python_version >= "3"'],
        python=PY,
        uv_version="0.13.9",
        index_url="http://127.0.0.1:1/simple/?a=$(touch x)&b='c'",
    )
    assert "'probe; python_version >= \"3\"'" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True, timeout=60)
    # same inputs, same script (and marker hash); different inputs, different hash
    again = bootstrap_script(
        "worker",
        ['probe; python_version >= "3"'],
        python=PY,
        uv_version="0.13.9",
        index_url="http://127.0.0.1:1/simple/?a=$(touch x)&b='c'",
    )
    assert again == script
    other = bootstrap_script("worker", ["probe"], python=PY, uv_version="0.13.9")
    hash_of = re.compile(r"^HASH=(\S+)$", re.M)
    assert hash_of.search(other)[1] != hash_of.search(script)[1]


# --------------------------------------------------------------------------------------------
# running the script


@pytest.fixture(scope="session")
def uv_binary() -> tuple[Path, str]:
    try:
        from uv import find_uv_bin
    except ImportError:
        pytest.skip("the uv package is not installed next to the tests")
    path = Path(find_uv_bin())
    version = subprocess.run(
        [str(path), "--version"], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()[1]
    return path, version


@pytest.fixture(scope="session")
def wheels(tmp_path_factory, uv_binary) -> Path:
    directory = tmp_path_factory.mktemp("wheels")
    build_uv_wheels(directory, uv_binary[0], uv_binary[1])
    build_probe_wheel(directory, "dhz-probe", "1.0")
    build_probe_wheel(directory, "dhz-probe", "2.0")
    build_probe_wheel(directory, "dhz-extra", "0.3")
    return directory


@pytest.fixture
def index(wheels):
    with LocalIndex(wheels) as idx:
        yield idx


@pytest.fixture
def machine(tmp_path) -> dict[str, str]:
    """The environment of a fresh "server": its own HOME and cache, nothing inherited."""
    home = tmp_path / "home"
    home.mkdir()
    base_python = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    return {
        "HOME": str(home),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "PATH": f"{base_python.parent}:/usr/bin:/bin",
        # Tests must never download an interpreter: use the one that runs the tests.
        "UV_PYTHON_DOWNLOADS": "never",
        "LANG": "C.UTF-8",
    }


def for_this_machine(script: str) -> str:
    """This machine is no server: the bootstrap must never add a user to it (bootstrap.sh's
    dask_user, which the simulator's servers run in their own /etc)."""
    return script.replace("\nDASK_USER=dask\n", "\nDASK_USER=''\n")


def run_script(script: str, env: dict[str, str], *, stdin: bool = False):
    script = for_this_machine(script)
    if stdin:
        return subprocess.run(
            ["bash", "-s"], input=script, env=env, capture_output=True, text=True, timeout=BOUND
        )
    path = Path(env["HOME"]) / "bootstrap.sh"
    path.write_text(script)
    return subprocess.run(
        ["bash", str(path)], env=env, capture_output=True, text=True, timeout=BOUND
    )


def base(env: dict[str, str]) -> Path:
    return Path(env["HOME"]) / ".dask-hetzner"


TIMESTAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} ")


def test_bootstrap_builds_env_then_is_a_noop(index, machine, uv_binary):
    uv_version = uv_binary[1]
    reqs = ["dhz-probe==1.0", 'dhz-extra; python_version >= "3"']
    script = bootstrap_script("worker", reqs, python=PY, uv_version=uv_version, index_url=index.url)
    first = run_script(script, machine)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report == {"python": PY, "dhz-probe": "1.0", "dhz-extra": "0.3"}
    b = base(machine)
    assert json.loads((b / "versions.json").read_text()) == report
    env_python = b / "env" / "bin" / "python"
    out = subprocess.run(
        [str(env_python), "-c", "import dhz_probe, dhz_extra, sys; print(dhz_probe.VERSION)"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert out == "1.0\n"
    assert (b / "bin" / "uv").stat().st_mode & 0o111
    assert (b / "bootstrap.done").read_text().strip() in script
    assert oct((b).stat().st_mode & 0o777) == "0o700"
    wheel_cache = Path(machine["XDG_CACHE_HOME"]) / "dask-hetzner" / "uv-wheels"
    assert [p.name for p in wheel_cache.iterdir()] == [
        f"uv-{uv_version}-py3-none-manylinux_2_17_{_arch()}.manylinux2014_{_arch()}.whl"
    ]
    log = (b / "bootstrap.log").read_text().splitlines()
    assert log and all(TIMESTAMPED.match(line) for line in log)
    assert any("bootstrap complete" in line for line in log)

    # same inputs again (this time on stdin): nothing is done, nothing is fetched
    sentinel = b / "env" / "sentinel"
    sentinel.write_text("still here")
    requests_before = len(index.requests)
    second = run_script(script, machine, stdin=True)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout) == report
    assert "nothing to do" in second.stderr
    assert sentinel.exists()
    assert len(index.requests) == requests_before

    # new inputs: the env is rebuilt, uv (already at the pinned version) is not fetched again
    script2 = bootstrap_script(
        "worker", ["dhz-probe==2.0"], python=PY, uv_version=uv_version, index_url=index.url
    )
    third = run_script(script2, machine)
    assert third.returncode == 0, third.stderr
    assert json.loads(third.stdout) == {"python": PY, "dhz-probe": "2.0"}
    assert not sentinel.exists()
    assert not any("/uv" in r for r in index.requests[requests_before:])

    # what the cluster does with the report
    check_versions({"python": PY, "dhz-probe": "2.0"}, json.loads(third.stdout))
    with pytest.raises(VersionMismatch, match="dhz-probe: client 1.0, remote 2.0"):
        check_versions({"python": PY, "dhz-probe": "1.0"}, json.loads(third.stdout))


def _arch() -> str:
    import platform

    return {"arm64": "aarch64", "amd64": "x86_64"}.get(platform.machine(), platform.machine())


def test_bootstrap_json_index_and_shared_cache(wheels, tmp_path, uv_binary):
    """PEP 691 JSON index; two fresh servers at once share one wheel cache."""
    cache = tmp_path / "shared-cache"
    base_python = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    with LocalIndex(wheels, json=True) as index:
        script = bootstrap_script(
            "scheduler",
            ["dhz-probe==1.0"],
            python=PY,
            uv_version=uv_binary[1],
            index_url=index.url,
        )
        envs = []
        procs = []
        for i in range(2):
            home = tmp_path / f"home{i}"
            home.mkdir()
            env = {
                "HOME": str(home),
                "XDG_CACHE_HOME": str(cache),
                "PATH": f"{base_python.parent}:/usr/bin:/bin",
                "UV_PYTHON_DOWNLOADS": "never",
                "LANG": "C.UTF-8",
            }
            (home / "b.sh").write_text(for_this_machine(script))
            envs.append(env)
            procs.append(
                subprocess.Popen(
                    ["bash", str(home / "b.sh")],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for proc in procs:
            out, err = proc.communicate(timeout=BOUND)
            assert proc.returncode == 0, err
            assert json.loads(out)["dhz-probe"] == "1.0"
        # both the uv fetcher and uv itself asked for (and got) JSON project pages
        assert any(r.startswith("GET /simple/uv/") for r in index.requests)
        assert index.json_responses >= 4
        # a third server with the same cache does not download the uv wheel again
        fetched = [r for r in index.requests if "/files/uv-" in r]
        home = tmp_path / "home3"
        home.mkdir()
        env = dict(envs[0], HOME=str(home))
        result = run_script(script, env)
        assert result.returncode == 0, result.stderr
        assert "using cached" in result.stderr
        assert [r for r in index.requests if "/files/uv-" in r] == fetched
        leftovers = [p.name for p in (cache / "dask-hetzner" / "uv-wheels").iterdir()]
        assert all(name.endswith(".whl") for name in leftovers)


def test_bootstrap_bad_requirement_fails_with_log(index, machine, uv_binary):
    script = bootstrap_script(
        "worker", ["dhz-missing==9.9"], python=PY, uv_version=uv_binary[1], index_url=index.url
    )
    result = run_script(script, machine)
    assert result.returncode != 0
    assert result.stdout == ""
    b = base(machine)
    assert not (b / "bootstrap.done").exists()
    tail = (b / "bootstrap.log").read_text().splitlines()[-8:]
    assert any("dhz-missing" in line for line in tail)
    assert "bootstrap FAILED" in tail[-1]
    assert "bootstrap FAILED" in result.stderr  # what RemoteCommandError would show


def test_bootstrap_refuses_a_wheel_with_wrong_sha256(index, machine, uv_binary):
    uv_version = uv_binary[1]
    index.bad_sha.add(
        f"uv-{uv_version}-py3-none-manylinux_2_17_{_arch()}.manylinux2014_{_arch()}.whl"
    )
    script = bootstrap_script(
        "worker", ["dhz-probe==1.0"], python=PY, uv_version=uv_version, index_url=index.url
    )
    result = run_script(script, machine)
    assert result.returncode != 0
    assert "sha256 mismatch" in result.stderr
    assert not (base(machine) / "bin" / "uv").exists()
    cache = Path(machine["XDG_CACHE_HOME"]) / "dask-hetzner" / "uv-wheels"
    assert list(cache.iterdir()) == []  # nothing unverified is kept


def test_bootstrap_unknown_uv_version(index, machine):
    script = bootstrap_script(
        "worker", ["dhz-probe==1.0"], python=PY, uv_version="0.0.2", index_url=index.url
    )
    result = run_script(script, machine)
    assert result.returncode != 0
    assert "no manylinux wheel of uv 0.0.2" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("DASK_HETZNER_NETWORK_TESTS") != "1",
    reason="talks to the real PyPI: set DASK_HETZNER_NETWORK_TESTS=1",
)
def test_bootstrap_real_dask_stack_from_pypi(tmp_path, uv_binary):
    """The real thing: uv's wheel from PyPI's simple API and the client's dask stack."""
    home = tmp_path / "home"
    home.mkdir()
    base_python = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    env = {
        "HOME": str(home),
        "XDG_CACHE_HOME": str(Path.home() / ".cache" / "dask-hetzner-test"),
        "PATH": f"{base_python.parent}:/usr/bin:/bin",
        "UV_PYTHON_DOWNLOADS": "never",
        "LANG": "C.UTF-8",
    }
    client = local_versions()
    reqs = requirements("worker", client, [])
    script = bootstrap_script("worker", reqs, python=PY, uv_version=uv_binary[1])
    result = run_script(script, env)
    assert result.returncode == 0, result.stderr[-3000:]
    check_versions(client, json.loads(result.stdout))


# --------------------------------------------------------------------------------------------
# the scripts that run on the servers, as files


SCRIPTS = Path(environment.__file__).parent / "scripts"


@pytest.mark.parametrize("path", sorted(SCRIPTS.glob("*.sh")), ids=lambda p: p.name)
def test_shell_scripts_parse(path: Path):
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=60)


def test_bootstrap_template_has_one_inputs_line():
    template = environment.script("bootstrap.sh")
    assert template.count("\n# @INPUTS@\n") == 1
    script = bootstrap_script("worker", ["probe"], python=PY, uv_version="0.13.9")
    assert "\n# @INPUTS@\n" not in script
    assert f"REMOTE_DIR={layout.REMOTE_DIR}\n" in script
