# ruff: noqa: B023  (every lambda is called at once, inside its loop iteration)
"""The bad-input corpus: every input a careless user or an attacker gives, through every door.

Doors: the constructor, ``scale``/``adapt``, ``hetzner.*`` config keys, ``DASK_HETZNER__*``
variables, every CLI verb (in-process, click's CliRunner) and ``cluster.json``. Each case
must be refused with one line naming the input, before anything is created (no POST reached
the simulator; the ``sim`` fixture checks nothing is left), without a traceback, and
without the token in any message. The table (input, where, outcome) and the counts are
printed (``pytest -s``) and asserted.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Callable
from typing import Any

import dask
import pytest
from click.testing import CliRunner

from dask_hetzner import HetznerCluster
from dask_hetzner.cli import cli
from dask_hetzner.launch import options_args, worker_command
from dask_hetzner.provision.context import ClusterKeys
from dask_hetzner.state import ClusterState, StateError

TOKEN_MARK = "SeCrEtToKeN"
# Shell metacharacters and line breaks: none may reach a remote command unquoted.
META = [
    "$(touch /tmp/x)", "`touch /tmp/x`", "a;touch /tmp/x", "a|touch", "a&&b", "a\nb", "a'b", 'a"b',
    "a\\b", "a>x", "a<x", "a*", "~a", "a{b,c}", "a#b", "a b", "--a", "a=b",
]  # fmt: skip
EXPECTED = (ValueError, TypeError, LookupError, StateError)  # ConfigError, UnknownCluster, ...


class Corpus:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def outcome(self, error: BaseException | None, names: str) -> str:
        if error is None:
            return "ACCEPTED"
        cause = error if isinstance(error, EXPECTED) or error.__cause__ is None else error.__cause__
        text = str(cause)
        if TOKEN_MARK in text:
            return f"TOKEN PRINTED: {text!r}"
        if not isinstance(cause, EXPECTED) or "Traceback" in text:
            return f"RAW {type(cause).__name__}: {text[:120]!r}"
        if "\n" in text.strip():
            return f"MULTI-LINE: {text[:120]!r}"
        if names.lower() not in text.lower():
            return f"UNNAMED ({names!r} not in): {text[:160]!r}"
        return "refused: " + text[:100]

    def check(self, where: str, shown: str, call: Callable[[], Any], names: str) -> None:
        error: BaseException | None = None
        try:
            call()
        except Exception as e:  # what the user would see
            error = e
        self.rows.append((shown, where, self.outcome(error, names)))

    async def acheck(self, where: str, shown: str, call: Callable[[], Any], names: str) -> None:
        error: BaseException | None = None
        try:
            await call()
        except Exception as e:
            error = e
        self.rows.append((shown, where, self.outcome(error, names)))

    def cli(self, runner: CliRunner, args: list[str], names: str, stdin: str | None = None) -> None:
        result = runner.invoke(cli, args, input=stdin)
        out = result.output
        errors = [line for line in out.splitlines() if line.startswith("Error")]
        if TOKEN_MARK in out:
            outcome = f"TOKEN PRINTED: {out[-200:]!r}"
        elif result.exit_code == 0:
            outcome = "ACCEPTED"
        elif result.exception is not None and not isinstance(result.exception, SystemExit):
            outcome = f"RAW {type(result.exception).__name__}: {str(result.exception)[:120]!r}"
        elif "Traceback" in out or len(errors) != 1:
            outcome = f"NOT ONE LINE: {out[-200:]!r}"
        elif names.lower() not in errors[0].lower():
            outcome = f"UNNAMED ({names!r} not in): {errors[0][:160]!r}"
        else:
            outcome = "refused: " + errors[0][:100]
        self.rows.append((" ".join(map(repr, args)), "cli", outcome))

    def report(self) -> list[tuple[str, str, str]]:
        print("\n| input | where | outcome |\n|---|---|---|")
        for shown, where, outcome in self.rows:
            print(f"| {shown.replace('|', '/')[:90]} | {where} | {outcome.replace('|', '/')} |")
        kinds: dict[str, int] = {}
        for _, _, outcome in self.rows:
            kind = outcome.split(":")[0].split(" (")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
        print(f"{len(self.rows)} cases: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
        return [r for r in self.rows if not r[2].startswith("refused")]


# keyword -> [(bad value, what the message must name)]
CONSTRUCTOR: dict[str, list[tuple[Any, str]]] = {
    "name": [("abc\n", "name"), ("ABC", "name"), ("-a", "name"), ("a" * 41, "name"), ("a_b", "name"),
             ("a;rm -rf /", "name"), (123, "name"), ("a.b", "name")],
    "workers": [(-1, "workers"), (True, "workers"), (1.5, "workers"), ("2", "workers"),
                (10**9, "workers"), (100, "workers")],
    "fallback_locations": [("fsn1", "fallback_locations"), ([1], "fallback_locations"), ([""], "fallback_locations")],
    "packages": [("numpy", "packages"), ([""], "packages"), ([1], "packages"), ({"numpy": 1}, "packages")],
    "connect": [("ssh", "connect"), (1, "connect")],
    "allowed_cidrs": [([], "allowed_cidrs"), ("0.0.0.0/0", "allowed_cidrs"), (["1.2.3.4"], "allowed_cidrs"),
                      (["1.2.3.4/33"], "allowed_cidrs"), (["10.0.0.1/8"], "allowed_cidrs"), (["x"], "allowed_cidrs"),
                      ([None], "allowed_cidrs"), ([""], "allowed_cidrs")],
    "worker_options": [("nthreads=2", "worker_options"), ({1: 2}, "worker_options")],
    "scheduler_options": [("x", "scheduler_options"), ({None: 2}, "scheduler_options")],
    "max_hourly_cost": [(-1, "max_hourly_cost"), (0, "max_hourly_cost"), ("cheap", "max_hourly_cost")],
    "idle_timeout": [(-5, "idle_timeout"), ("soon", "idle_timeout"), (0, "idle_timeout")],
    "security": [(False, "TLS")],
    "token": [(TOKEN_MARK + "\n\n", "token"), (TOKEN_MARK + "\nX", "token"), ("a b" + TOKEN_MARK, "token"),
              (TOKEN_MARK + "\x00", "token")],
    "api_endpoint": [("htp:/x", "endpoint"), ("not a url", "endpoint"), ("ftp://x/v1", "endpoint"),
                     ("http://", "endpoint"), ("http://a b/v1", "endpoint")],
}  # fmt: skip
# Refused by the API's catalog (an API call, but still before anything is created).
CATALOG = [
    ({"location": "mars"}, "mars"),
    ({"image": "windows-95"}, "windows-95"),
    ({"worker_server_type": "cx999"}, "cx999"),
    ({"scheduler_server_type": "cx999"}, "cx999"),
    ({"fallback_locations": ["mars"]}, "mars"),
    ({"fallback_locations": ["ash"]}, "ash"),
    ({"max_hourly_cost": 0.0001, "workers": 2}, "max_hourly_cost"),
]
CONFIG: list[tuple[str, Any, str]] = [
    ("packages", "numpy", "packages"), ("allowed-cidrs", [], "allowed_cidrs"),
    ("allowed-cidrs", "10.0.0.0/8", "allowed_cidrs"), ("network-ip-range", "10.0.0.0", "network_ip_range"),
    ("network-ip-range", "10.0.0.1/16", "network_ip_range"), ("connect", "x", "connect"),
    ("n-workers", -1, "workers"), ("n-workers", "2", "workers"), ("fallback-locations", "fsn1", "fallback_locations"),
    ("max-hourly-cost", "x", "max_hourly_cost"), ("idle-timeout", "x", "idle_timeout"), ("name", "A!", "name"),
    ("ssh-port", "22; rm", "ssh_port"), ("ssh-port", 0, "ssh_port"), ("scheduler-port", 70000, "scheduler_port"),
    ("dashboard-port", -1, "dashboard_port"), ("worker-options", "x", "worker_options"),
]  # fmt: skip
ENV: list[tuple[str, str, str]] = [
    ("PACKAGES", "numpy", "packages"), ("ALLOWED_CIDRS", "[]", "allowed_cidrs"),
    ("ALLOWED_CIDRS", "0.0.0.0/0", "allowed_cidrs"), ("NETWORK_IP_RANGE", "bad", "network_ip_range"),
    ("CONNECT", "ssh", "connect"), ("N_WORKERS", "-3", "workers"), ("N_WORKERS", "1e9", "workers"),
    ("FALLBACK_LOCATIONS", "nbg1", "fallback_locations"), ("MAX_HOURLY_COST", "-2", "max_hourly_cost"),
    ("IDLE_TIMEOUT", "never", "idle_timeout"), ("NAME", "Bad_Name", "name"), ("SSH_PORT", "ssh", "ssh_port"),
    ("SCHEDULER_PORT", "99999", "scheduler_port"), ("WORKER_OPTIONS", "nthreads", "worker_options"),
]  # fmt: skip


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def env_config(variable: str, value: str) -> dict[str, Any]:
    """What dask makes of ``DASK_HETZNER__<variable>=<value>`` (its own parser)."""
    return flat(dask.config.collect_env({f"DASK_HETZNER__{variable}": value}))


@pytest.fixture
def state_dir(sim, tmp_path):
    path = tmp_path / "state"
    with dask.config.set({"hetzner.state-dir": str(path)}):
        yield path


def write_state(state_dir, name: str, **changes: Any) -> None:
    """A complete local state of cluster ``name`` whose cluster.json has ``changes``."""
    keys = ClusterKeys.generate(name)
    metadata = {"name": name, "location": "fsn1", "connect": "tunnel", "allowed_cidrs": ["0.0.0.0/0"]}
    metadata.update(changes)
    ClusterState(state_dir, name).create(metadata, keys.secrets())


async def api_and_scaling(c: Corpus) -> None:
    """The cases that need an event loop: the catalog's refusals, ``scale`` and ``adapt``."""
    for kwargs, names in CATALOG:
        await c.acheck("constructor+API", repr(kwargs), lambda: HetznerCluster(asynchronous=True, **kwargs), names)
    # scale/adapt on a cluster object that is not started: nothing to create anyway.
    cluster = HetznerCluster(asynchronous=True, name="notstarted")
    try:
        for n in (-1, 1.5, True, "2", None, 100):
            c.check("scale", f"scale({n!r})", lambda: cluster.scale(n), "scal")
        for memory in ("-1GB", -5, 0, "lots", [1]):
            c.check("scale", f"scale(memory={memory!r})", lambda: cluster.scale(memory=memory), "memory")
        for cores in (-2, 0, "many", float("nan")):
            c.check("scale", f"scale(cores={cores!r})", lambda: cluster.scale(cores=cores), "cores")
        for lo, hi in ((3, 1), (-1, 2), (0, -1), ("a", 2), (1, "b"), (100, 200), (float("nan"), 1)):
            c.check("adapt", f"adapt(minimum={lo!r}, maximum={hi!r})", lambda: cluster.adapt(minimum=lo, maximum=hi), "m")
    finally:
        await cluster.close()


def test_every_bad_input_is_refused_in_one_line_before_anything_exists(sim, state_dir, capsys):
    c = Corpus()
    # The constructor, keyword by keyword; then the metacharacter corpus through option keys.
    for key, cases in CONSTRUCTOR.items():
        for value, names in cases:
            c.check("constructor", f"{key}={value!r}", lambda: HetznerCluster(**{key: value}), names)
    c.check("constructor", "foo=1 (unknown keyword)", lambda: HetznerCluster(foo=1), "foo")
    c.check("constructor", "workers=1, n_workers=2", lambda: HetznerCluster(1, n_workers=2), "worker")
    for meta in META:
        for key in ("worker_options", "scheduler_options"):
            c.check("constructor", f"{key}={{{meta!r}: 1}}", lambda: HetznerCluster(**{key: {meta: 1}}), repr(meta))
        c.check("constructor", f"name={meta!r}", lambda: HetznerCluster(name=meta), "name")
        c.check("constructor", f"packages=[{meta!r}]", lambda: HetznerCluster(packages=[meta]), "")
        with dask.config.set({"hetzner.worker-options": {meta: 1}}):
            c.check("config", f"hetzner.worker-options={{{meta!r}: 1}}", lambda: HetznerCluster(), "worker_options")
    asyncio.run(api_and_scaling(c))
    for key, value, names in CONFIG:
        with dask.config.set({f"hetzner.{key}": value}):
            c.check("config", f"hetzner.{key}={value!r}", lambda: HetznerCluster(), names)
    for variable, value, names in ENV:
        with dask.config.set(env_config(variable, value)):
            c.check("env", f"DASK_HETZNER__{variable}={value}", lambda: HetznerCluster(), names)
    with dask.config.set(env_config("WORKER_OPTIONS", "{'$(touch /tmp/x)': 1}")):
        c.check("env", "DASK_HETZNER__WORKER_OPTIONS={'$(touch /tmp/x)': 1}", lambda: HetznerCluster(), "worker_options")

    # cluster.json, as from_name reads it (a foreign or forged file among them).
    forged: list[tuple[dict[str, Any], str]] = [
        ({"worker_options": {"$(touch /tmp/x)": 1}}, "worker_options"),
        ({"scheduler_options": {"a;b": 1}}, "scheduler_options"),
        ({"allowed_cidrs": []}, "allowed_cidrs"),
        ({"packages": "numpy"}, "packages"),
        ({"start": "x;rm"}, "start"),
        ({"connect": "bash"}, "connect"),
        ({"network_ip_range": "everything"}, "network_ip_range"),
        ({"ssh_port": "22; touch /tmp/x"}, "ssh_port"),
        ({"scheduler_port": -4}, "scheduler_port"),
        ({"fallback_locations": "fsn1"}, "fallback_locations"),
        ({"idle_timeout": "soon"}, "idle_timeout"),
        ({"max_hourly_cost": "free"}, "max_hourly_cost"),
    ]
    for i, (changes, names) in enumerate(forged):
        name = f"forged{i}"
        write_state(state_dir, name, **changes)
        c.check("cluster.json", f"{name}: {changes!r}", lambda: HetznerCluster.from_name(name), names)
    write_state(state_dir, "elsewhere", endpoint="http://127.0.0.1:9/v1")
    with dask.config.set({"hetzner.api-endpoint": None}):
        c.check("cluster.json", "endpoint of another API", lambda: HetznerCluster.from_name("elsewhere"), "endpoint")
    (state_dir / "garbled").mkdir(mode=0o700)
    (state_dir / "garbled" / "cluster.json").write_text("{not json")
    c.check("cluster.json", "not JSON", lambda: HetznerCluster.from_name("garbled"), "garbled")
    write_state(state_dir, "future", format=99)
    c.check("cluster.json", "format 99", lambda: HetznerCluster.from_name("future"), "format")
    write_state(state_dir, "loose")
    (state_dir / "loose" / "ca.key").chmod(0o644)
    c.check("cluster.json", "ca.key loosened to 0644", lambda: HetznerCluster.from_name("loose"), "ca.key")
    c.check("from_name", "name='../etc'", lambda: HetznerCluster.from_name("../etc"), "name")
    c.check("from_name", "name='nothere'", lambda: HetznerCluster.from_name("nothere"), "nothere")

    # Every CLI verb, in-process.
    runner = CliRunner(env={"HCLOUD_TOKEN": sim.token, "HCLOUD_ENDPOINT": sim.endpoint, "COLUMNS": "200"})
    for verb in (["ls"], ["types"], ["nuke", "x", "-y"], ["logs", "x"]):
        c.cli(runner, [*verb, "--token", TOKEN_MARK + "\n"], "token")
        c.cli(runner, [*verb, "--token", "wrong" + TOKEN_MARK], "token")
        c.cli(runner, [*verb, "--endpoint", "htp:/nowhere"], "endpoint")
    # These read the local state first: an unknown cluster is refused before the token is used.
    for verb in (["destroy", "x"], ["scale", "x", "1"]):
        c.cli(runner, [*verb, "--token", TOKEN_MARK + "\n"], "'x'")
        c.cli(runner, [*verb, "--endpoint", "htp:/nowhere"], "'x'")
    for verb in (["nuke", "-y"], ["destroy"], ["scale"], ["logs"], ["ssh"]):
        for bad in ("ABC", "a;b", "../x", "abc\n"):
            c.cli(runner, [*verb, bad] + (["1"] if verb == ["scale"] else []), "name")
        c.cli(runner, [*verb, "nothere"] + (["1"] if verb == ["scale"] else []), "nothere")
    c.cli(runner, ["ls", "--token", "-"], "token", stdin=TOKEN_MARK + " x\n")
    c.cli(runner, ["nuke"], "name")
    c.cli(runner, ["scale", "x", "-1"], "n")
    c.cli(runner, ["scale", "x", "1.5"], "n")
    c.cli(runner, ["logs", "x", "--lines", "0"], "lines")
    c.cli(runner, ["types", "--location", "mars"], "mars")
    c.cli(runner, ["demo", "--workers", "0"], "workers")
    for args, names in (
        (["--name", "ABC"], "name"), (["--name", "a;b"], "name"), (["--workers", "-1"], "workers"),
        (["--workers", "1000"], "workers"), (["--location", "mars"], "mars"), (["--worker-type", "cx999"], "cx999"),
        (["--package", ""], "packages"), (["--connect", "ssh"], "connect"), (["--max-hourly-cost", "-1"], "max_hourly_cost"),
        (["--idle-timeout", "soon"], "idle_timeout"), (["--fallback-location", "mars"], "mars"),
        (["--token", TOKEN_MARK + "\n"], "token"), (["--endpoint", "nope"], "endpoint"),
    ):  # fmt: skip
        c.cli(runner, ["create", *args], names)

    # The token from stdin works; one on the command line works too, with a warning.
    assert runner.invoke(cli, ["ls", "--token", "-"], input=sim.token + "\n").exit_code == 0
    visible = runner.invoke(cli, ["ls", "--token", sim.token])
    assert visible.exit_code == 0 and "visible to other users" in visible.output

    with capsys.disabled():
        failures = c.report()
    assert len(c.rows) >= 150
    assert failures == [], failures
    creates = {k: n for k, n in sim.stats.requests.items() if k.startswith(("POST", "PUT", "DELETE"))}
    assert creates == {}, f"requests that change something were sent: {creates}"


@pytest.mark.parametrize("value", META)
def test_option_values_reach_the_command_line_quoted(value):
    """Values may hold anything: they arrive at the remote shell as one word, unchanged."""
    assert shlex.split(" ".join(options_args({"memory_limit": value}))) == ["--memory-limit", value]
    with pytest.raises(ValueError, match="invalid option name"):
        options_args({value: 1})


def test_worker_listens_on_its_private_address_only():
    """Every listener of ``dask worker`` (its comm and its HTTP server) is on the private IP."""
    command = shlex.split(
        worker_command(scheduler="tls://10.0.0.2:8786", name="worker-0", ip="10.0.0.3", preload="p", options={}, wait=1)
    )
    assert command[command.index("--host") + 1] == "10.0.0.3"
    assert command[command.index("--dashboard-address") + 1] == "10.0.0.3:0"
