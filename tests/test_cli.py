"""``dask-hetzner``: every verb through its real entry point, against the test's simulator.

One cluster is created once and then listed, logged into, scaled, read and destroyed by
separate CLI processes, as a user would from several terminals.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_support import CLI, cli_env, make_leftovers, read_until, run, servers_of, start
from click.testing import CliRunner
from support import wait_until

from dask_hetzner.cli import cli

pytestmark = pytest.mark.slow

VERBS = ["create", "ls", "ssh", "scale", "logs", "destroy", "nuke", "types", "sim", "demo", "dashboard", "access"]


def one_line_error(result) -> str:
    """An expected failure: exit status 1, one ``Error:`` line, no traceback."""
    # A warning (e.g. that --token is visible in the process list) is not the error.
    err = "\n".join(x for x in result.stderr.strip().splitlines() if not x.startswith("Warning: "))
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert len(err.splitlines()) == 1 and err.startswith("Error: "), err
    return err


@pytest.mark.timeout(600)  # a dozen imports of dask's CLI; slow on a loaded machine
def test_help_on_every_verb():
    runner = CliRunner()
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for verb in VERBS:
        assert verb in result.output
        sub = runner.invoke(cli, [verb, "--help"])
        assert sub.exit_code == 0, (verb, sub.output)
        assert "Usage:" in sub.output
    assert "[-- COMMAND...]" in runner.invoke(cli, ["ssh", "--help"]).output
    # The real entry points: the console script and `dask hetzner`.
    bindir = Path(sys.executable).parent
    for argv in ([str(bindir / "dask-hetzner"), "--help"], [str(bindir / "dask"), "hetzner", "--help"]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
        assert "destroy" in done.stdout and "nuke" in done.stdout


@pytest.mark.timeout(600)
def test_expected_errors_are_one_line(sim, tmp_path):
    env = cli_env(sim, tmp_path / "state")
    cases = {
        "unknown cluster": (["destroy", "nosuch"], "nosuch"),
        "unknown cluster ssh": (["ssh", "nosuch", "--", "true"], "nosuch"),
        "unknown cluster nuke": (["nuke", "nosuch", "--yes"], "no cluster named 'nosuch'"),
        "unknown type": (["create", "--name", "bad1", "--worker-type", "cx999"], "cx23"),
        "unknown location": (["types", "--location", "mars1"], "fsn1"),
        "bad name": (["scale", "Not_A_Name", "2"], "invalid cluster name"),
        "bad token": (["ls", "--token", "wrong-token"], "token"),
    }
    # In parallel: each process pays the import of dask once.
    procs = {
        case: subprocess.Popen(
            [*CLI, *argv], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        for case, (argv, _) in cases.items()
    }
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        assert cases[case][1] in one_line_error(result), case
    assert sim.leaks() == {}
    assert not (tmp_path / "state" / "bad1").exists()


def test_no_token_is_an_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HCLOUD_TOKEN", "HCLOUD_ENDPOINT")}
    env["DASK_HETZNER__STATE_DIR"] = str(tmp_path)
    result = subprocess.run(
        [*CLI, "ls"], env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL
    )
    assert "token" in one_line_error(result)


@pytest.mark.timeout(900)  # one cluster, a dozen CLI processes; slow on a loaded machine
def test_cluster_lifecycle_through_the_cli(sim, tmp_path):
    state = tmp_path / "state"
    env = cli_env(sim, state)
    try:
        lifecycle(sim, env, state)
    finally:
        if servers_of(sim, "cli1"):  # a failure above: leave the simulator empty all the same
            run(env, "nuke", "cli1", "--yes")


def lifecycle(sim, env, state) -> None:
    created = run(env, "create", "--name", "cli1", "--workers", "1")
    assert created.returncode == 0, created.stderr
    out = created.stdout
    assert "worker-0: installing" in out and "scheduler: running" in out  # progress, per server
    assert "Scheduler address: tls://" in out
    assert "Dashboard: http://" in out
    assert "EUR/h" in out
    # The process has exited, the cluster is still there (nothing deleted at exit).
    assert len(servers_of(sim, "cli1")) == 2

    # Local state: private, complete, no token.
    cdir = state / "cli1"
    assert stat.S_IMODE(cdir.stat().st_mode) == 0o700
    files = [p for p in cdir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {
        "cluster.json", "ca.pem", "ca.key", "client.pem", "client.key", "ssh_key",
        "cli1-scheduler.json", "cli1-worker-0.json",
    }
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        assert sim.token not in p.read_text(), p
    meta = json.loads((cdir / "cluster.json").read_text())
    assert meta["location"] == "fsn1" and meta["endpoint"] == sim.endpoint

    listed = run(env, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    (info,) = json.loads(listed.stdout)
    assert (info["name"], info["schedulers"], info["workers"], info["status"]) == ("cli1", 1, 1, "running")
    assert info["hourly_cost"] > 0 and info["age_seconds"] >= 0 and info["local_state"] is True
    table = run(env, "ls")
    assert table.returncode == 0 and "cli1" in table.stdout and "running" in table.stdout
    # The same through `dask hetzner`.
    via_dask = subprocess.run(
        [str(Path(sys.executable).parent / "dask"), "hetzner", "ls", "--json"],
        env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
    )
    assert via_dask.returncode == 0 and json.loads(via_dask.stdout)[0]["name"] == "cli1"

    # ssh: a command's output and exit status; a shell reading stdin; a pty.
    done = run(env, "ssh", "cli1", "--", "hostname")
    assert (done.returncode, done.stdout.strip()) == (0, "cli1-scheduler"), done.stderr
    done = run(env, "ssh", "cli1", "worker-0", "--", "hostname; exit 3")
    assert (done.returncode, done.stdout.strip()) == (3, "cli1-worker-0"), done.stderr
    done = run(env, "ssh", "cli1", input="echo from-a-shell; exit 4\n")
    assert done.returncode == 4 and "from-a-shell" in done.stdout, done.stderr
    assert_interactive_pty(env)

    logs = run(env, "logs", "cli1")
    assert logs.returncode == 0, logs.stderr
    for header in ("scheduler", "scheduler bootstrap", "worker-0", "worker-0 bootstrap"):
        assert f"==> {header} <==" in logs.stdout
    assert "distributed.scheduler" in logs.stdout and "distributed.worker" in logs.stdout
    assert "bootstrap complete" in logs.stdout
    one = run(env, "logs", "cli1", "worker-0", "--lines", "5")
    assert "==> worker-0 <==" in one.stdout and "==> scheduler <==" not in one.stdout

    assert_dashboard(env)

    scaled = run(env, "scale", "cli1", "2")
    assert scaled.returncode == 0, scaled.stderr
    assert "1 -> 2 workers" in scaled.stdout
    assert "worker-1: installing" in scaled.stdout and "reattaching" in scaled.stdout  # progress
    assert sorted(s.name for s in servers_of(sim, "cli1")) == ["cli1-scheduler", "cli1-worker-0", "cli1-worker-1"]
    assert (cdir / "hosts" / "cli1-worker-1.json").is_file()  # pinned as it came
    scaled = run(env, "scale", "cli1", "1")
    assert scaled.returncode == 0, scaled.stderr
    # The retired worker's delete is sent before the command returns; on a loaded machine the
    # API may list the server until its delete action ends (as Hetzner does).
    wait_until(lambda: len(servers_of(sim, "cli1")) == 2, timeout=60, what="the retired worker's server deleted")
    assert not (cdir / "hosts" / "cli1-worker-1.json").exists()  # and forgotten as it went

    # Another machine: the access in one passphrase-protected file, imported into a second
    # state directory, from where the cluster is scaled and destroyed.
    other, shared = state.parent / "other-state", state.parent / "cli1.access"
    env_b = {**env, "DASK_HETZNER__STATE_DIR": str(other)}
    exported = run(env, "access", "export", "cli1", str(shared), "--encrypt", input="pw\npw\n")
    assert exported.returncode == 0, exported.stderr
    assert stat.S_IMODE(shared.stat().st_mode) == 0o600
    assert sim.token not in shared.read_text() and "PRIVATE KEY" not in shared.read_text()
    wrong = run(env_b, "access", "import", str(shared), input="nope\n")
    assert wrong.returncode == 1 and "wrong passphrase" in wrong.stderr and "Traceback" not in wrong.stderr
    imported = run(env_b, "access", "import", str(shared), input="pw\n")
    assert imported.returncode == 0, imported.stderr
    scaled = run(env_b, "scale", "cli1", "0")
    assert scaled.returncode == 0, scaled.stderr
    assert "retiring 1 worker(s)" in scaled.stdout
    assert [s.name for s in servers_of(sim, "cli1")] == ["cli1-scheduler"]

    destroyed = run(env_b, "destroy", "cli1")
    assert destroyed.returncode == 0, destroyed.stderr
    assert "deleting 1 server," in destroyed.stdout
    assert sim.leaks() == {}
    assert not (other / "cli1").exists()
    # The first machine's state now names a cluster that is gone: nuke clears it.
    assert run(env, "nuke", "cli1", "--yes").returncode == 0
    assert not cdir.exists()
    assert run(env, "ls").stdout.strip() == "No clusters in this project."


def assert_dashboard(env) -> None:
    """`dashboard`: a tunnel whose printed link answers, closed by Ctrl-C without a traceback."""
    import urllib.request

    proc = start(env, "dashboard", "cli1")
    try:
        (line,) = read_until(proc.stdout, "Dashboard: http://127.0.0.1:", timeout=120)[-1:]
        link = line.split()[1]
        with urllib.request.urlopen(link, timeout=30) as r:
            assert r.status == 200 and b"Dask" in r.read()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def assert_interactive_pty(env) -> None:
    """No command and a terminal as stdin: a shell on a pty, the local terminal in raw mode."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen([*CLI, "ssh", "cli1"], env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    seen = b""

    def read_until(wanted: bytes, timeout: float = 60) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while wanted not in seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{wanted!r} not on the pty within {timeout} s: {seen!r}")
            if select.select([master], [], [], left)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:  # EIO: the other side closed
                    break

    try:
        read_until(b"#")  # the prompt: the local terminal is raw by now, as when a user types
        os.write(master, b"tty >/dev/null && echo on-a-$((6*7))-pty; exit 5\r")
        read_until(b"on-a-42-pty")
        assert proc.wait(timeout=60) == 5, seen
        assert b"Traceback" not in seen, seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


@pytest.mark.timeout(600)
def test_nuke_goes_by_label_equality(sim, tmp_path):
    state = tmp_path / "state"
    env = cli_env(sim, state)
    make_leftovers(sim, "c")
    make_leftovers(sim, "c2", server=False)
    (state / "c").mkdir(parents=True)
    (state / "c" / "cluster.json").write_text("{}")
    (state / "c2").mkdir()
    (state / "c2" / "cluster.json").write_text("{}")

    listed = {c["name"]: c for c in json.loads(run(env, "ls", "--json").stdout)}
    assert set(listed) == {"c", "c2"}
    assert listed["c"]["status"] == "no scheduler" and listed["c2"]["status"] == "no servers"

    refused = run(env, "nuke", "c", input="n\n")
    assert refused.returncode != 0 and "Delete c for good?" in refused.stdout
    assert len(servers_of(sim, "c")) == 1

    done = run(env, "nuke", "c", "--yes")
    assert done.returncode == 0, done.stderr
    assert servers_of(sim, "c") == [] and not (state / "c").exists()
    left = sim.leaks()
    assert left and all(
        item["labels"]["dask-hetzner/cluster"] == "c2" for items in left.values() for item in items
    ), left
    assert (state / "c2").exists()

    done = run(env, "nuke", "--all", "--yes")
    assert done.returncode == 0, done.stderr
    assert sim.leaks() == {}
    assert not (state / "c2").exists()
    assert run(env, "nuke", "--all", "--yes").stdout.strip() == "No clusters in this project."


def test_sigterm_during_create_rolls_back(sim, tmp_path):
    env = cli_env(sim, tmp_path / "state")
    proc = start(env, "create", "--name", "term1", "--workers", "1")
    try:
        read_until(proc.stdout, "installing")
        assert servers_of(sim, "term1")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "everything created was deleted" in err
    assert sim.leaks() == {}
    assert not (tmp_path / "state" / "term1").exists()


def test_sigkill_during_create_then_ls_and_nuke(sim, tmp_path):
    state = tmp_path / "state"
    env = cli_env(sim, state)
    proc = start(env, "create", "--name", "kill1", "--workers", "2")
    try:
        read_until(proc.stdout, "booting")  # a server exists: its create was answered
    finally:
        proc.kill()  # SIGKILL: no handler, no atexit, no rollback
        proc.communicate(timeout=60)
    assert servers_of(sim, "kill1")

    (info,) = json.loads(run(env, "ls", "--json").stdout)
    assert info["name"] == "kill1" and info["schedulers"] + info["workers"] + info["not_joined"] >= 1
    assert info["local_state"] is True

    done = run(env, "nuke", "kill1", "--yes")
    assert done.returncode == 0, done.stderr
    assert sim.leaks() == {}
    assert not (state / "kill1").exists()


def test_types(sim, tmp_path):
    env = cli_env(sim, tmp_path)
    done = run(env, "types", "--location", "fsn1", "--json")
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    cx23 = rows["cx23"]
    assert (cx23["cores"], cx23["memory_gb"], cx23["architecture"]) == (2, 4.0, "x86")
    assert cx23["available"] is True and cx23["hourly"] > 0 and cx23["monthly"] > cx23["hourly"]
    assert any(r["architecture"] == "arm" for r in rows.values())
    table = run(env, "types")
    assert table.returncode == 0 and "cx23" in table.stdout and "fsn1" in table.stdout
    # At 80 columns: the header on one line, a type's numbers on its own line.
    narrow = run({**env, "COLUMNS": "80"}, "types")
    lines = narrow.stdout.splitlines()
    assert lines[0].split() == ["name", "vCPU", "GB", "disk", "arch", "cpu", "EUR/h", "EUR/mo", "where"]
    assert max(len(line) for line in lines) <= 80
    for line in lines:
        if line.split() and line.split()[0] in rows:
            assert len(line.split()) >= 9, line
    assert "recommended" in table.stdout
    # Per location, as the catalog says: cpx32 is sold out in sin (docs/simulator.md).
    sin = {r["name"]: r for r in json.loads(run(env, "types", "--location", "sin", "--json").stdout)}
    assert (sin["cpx32"]["available"], sin["cpx32"]["recommended"]) == (False, False)
    assert (sin["cpx22"]["available"], sin["cpx22"]["recommended"]) == (True, True)


def test_sim_verb():
    proc = subprocess.Popen(
        [*CLI, "sim", "--port", "0", "--no-hosts"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().startswith("HCLOUD_ENDPOINT=http://127.0.0.1:")
        assert proc.stdout.readline().startswith("HCLOUD_TOKEN=")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_demo_verb(tmp_path):
    env = {**os.environ, "DASK_HETZNER__STATE_DIR": str(tmp_path), "COLUMNS": "200"}
    done = subprocess.run(
        [*CLI, "demo", "--workers", "1"], env=env, capture_output=True, text=True, timeout=240,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    # `make demo` is a user's first minute: it explains itself and leaves nothing behind.
    for words in ("Creating a cluster", "Scaling to 3 workers", "Closing", "demo summary"):
        assert words in done.stdout, words
    rows = dict(re.findall(r"│ ([^│]+?)\s+│\s+([^│]+?) │", done.stdout))
    assert rows["servers created"] == "4", rows  # scheduler, a worker, two more when scaling up
    assert rows["resources left behind"] == "0", rows
    assert int(rows["tasks computed"]) > 0, rows
    (cost,) = [v for k, v in rows.items() if k.startswith("what it would have cost")]
    assert float(cost.split()[0]) > 0, rows
    assert list(tmp_path.iterdir()) == []


def test_listing_verbs_import_neither_distributed_nor_asyncssh(sim, tmp_path):
    """`ls` and `types` start fast: they load neither distributed nor asyncssh (seconds here)."""
    code = (
        "import sys\n"
        "from dask_hetzner.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'distributed', 'asyncssh'}), file=sys.stderr)\n"
    )
    for verb in ("ls", "types"):
        done = subprocess.run(
            [sys.executable, "-c", code, verb], env=cli_env(sim, tmp_path), capture_output=True, text=True, timeout=120
        )
        assert done.stderr.strip().splitlines()[-1] == "[]", (verb, done.stderr)
