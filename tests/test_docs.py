"""The documentation stays true to the code: the configuration reference and the CLI page.

The reference is generated from ``dask_hetzner/hetzner.yaml`` by ``docs/_ext/config_reference``
at every Sphinx build; these tests run that generator directly (no Sphinx build) and check
that every key is in it, described, and named by the environment variable dask really reads.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import dask.config
import pytest
import yaml

DOCS = Path(__file__).resolve().parents[1] / "docs"
sys.path.insert(0, str(DOCS / "_ext"))

import config_reference  # noqa: E402


@pytest.fixture(scope="module")
def yaml_path() -> Path:
    return config_reference.default_yaml_path()


@pytest.fixture(scope="module")
def defaults(yaml_path: Path) -> dict:
    return yaml.safe_load(yaml_path.read_text())


@pytest.fixture(scope="module")
def options(yaml_path: Path) -> list[config_reference.Option]:
    return [opt for group in config_reference.parse(yaml_path) for opt in group.options]


@pytest.fixture(scope="module")
def reference(yaml_path: Path) -> str:
    return config_reference.render_rst(config_reference.parse(yaml_path))


def test_every_key_is_in_the_reference(defaults: dict, options: list, reference: str) -> None:
    leaves = config_reference.leaf_paths(defaults)
    assert leaves, "hetzner.yaml has no keys?"
    assert sorted(opt.path for opt in options) == sorted(leaves)
    for path in leaves:
        name = ".".join(path)
        assert f"``{name}``" in reference, name
        assert f"``{config_reference.env_var(path)}``" in reference, name


def test_defaults_are_the_yaml_values(defaults: dict, options: list, reference: str) -> None:
    for opt in options:
        value = defaults
        for part in opt.path:
            value = value[part]
        assert opt.default == value, opt.name
        # The rendered default reads back as the same YAML value.
        assert yaml.safe_load(config_reference.format_default(value)) == value, opt.name
        assert f":Default: ``{config_reference.format_default(value)}``" in reference


def test_every_key_is_described(options: list) -> None:
    missing = [opt.name for opt in options if not opt.description.strip()]
    assert not missing, (
        f"keys without a description: {missing}; add a comment to their line in "
        "dask_hetzner/hetzner.yaml"
    )


def test_fallback_descriptions_name_real_keys(options: list) -> None:
    names = {opt.name for opt in options}
    stale = sorted(set(config_reference.FALLBACK_DESCRIPTIONS) - names)
    assert not stale, f"FALLBACK_DESCRIPTIONS for keys that no longer exist: {stale}"


def test_yaml_comments_are_the_descriptions(yaml_path: Path, options: list) -> None:
    # A key whose line carries a comment is described by exactly that comment.
    by_name = {opt.name: opt for opt in options}
    line = re.compile(r"^\s*(?P<key>[a-z0-9-]+):[^#]*#\s*(?P<comment>.+)$")
    checked = 0
    stack: list[tuple[int, str]] = []
    for text in yaml_path.read_text().splitlines():
        m = re.match(r"^(?P<indent> *)(?P<key>[a-z0-9-]+):", text)
        if not m:
            continue
        indent = len(m.group("indent"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group("key")))
        c = line.match(text)
        name = ".".join(k for _, k in stack)
        if c and name in by_name:
            assert c.group("comment").strip() in by_name[name].description, name
            checked += 1
    assert checked >= len(options) // 2


def _same_keys(merged: dict, template: dict) -> bool:
    """``merged`` has exactly the keys of ``template`` (``_`` and ``-`` alike), recursively."""
    canon = {k.replace("_", "-"): v for k, v in merged.items()}
    if set(canon) != set(template):
        return False
    return all(_same_keys(canon[k], v) for k, v in template.items() if isinstance(v, dict) and v)


@pytest.mark.parametrize("as_defaults_first", [False, True])
def test_env_var_names_round_trip(defaults: dict, options: list, as_defaults_first: bool) -> None:
    """``DASK_HETZNER__...`` as documented sets exactly that key, nothing else."""
    for i, opt in enumerate(options):
        # A mapping for mapping-valued keys (worker-options): dask merges those.
        value = {"sentinel": i} if isinstance(opt.default, dict) else f"sentinel-value-{i}"
        env = {opt.env: repr(value) if isinstance(value, dict) else value}
        from_env = dask.config.collect(paths=[], env=env)
        if as_defaults_first:
            # What `dask.config.update_defaults` does when hetzner.yaml is registered after
            # dask collected the environment at import: env values win, keys merge by name.
            merged = copy.deepcopy(from_env)
            dask.config.update(merged, copy.deepcopy(defaults), priority="old")
        else:
            merged = dask.config.merge(copy.deepcopy(defaults), from_env)
        assert dask.config.get(opt.name, config=merged) == value, opt.env
        # No stray key: the variable named an existing key, not a new one beside it.
        assert _same_keys(merged, defaults), (opt.env, merged)


def test_env_var_values_are_typed() -> None:
    env = {
        "DASK_HETZNER__N_WORKERS": "4",
        "DASK_HETZNER__ALLOWED_CIDRS": '["203.0.113.0/24"]',
        "DASK_HETZNER__TIMEOUTS__BOOTSTRAP": "30m",
    }
    cfg = dask.config.collect(paths=[], env=env)
    assert dask.config.get("hetzner.n-workers", config=cfg) == 4
    assert dask.config.get("hetzner.allowed-cidrs", config=cfg) == ["203.0.113.0/24"]
    assert dask.config.get("hetzner.timeouts.bootstrap", config=cfg) == "30m"


def test_env_var_naming() -> None:
    assert config_reference.env_var("hetzner.scheduler-server-type") == (
        "DASK_HETZNER__SCHEDULER_SERVER_TYPE"
    )
    assert config_reference.env_var(("hetzner", "timeouts", "api-request")) == (
        "DASK_HETZNER__TIMEOUTS__API_REQUEST"
    )


def test_parser_on_a_small_file(tmp_path: Path) -> None:
    f = tmp_path / "x.yaml"
    f.write_text(
        "hetzner:\n"
        "  # Group one. Its introduction.\n"
        "  a: 1                 # the a\n"
        '  b: "x # not a comment"  # the b\n'
        "  # about c\n"
        "  c: []\n"
        "\n"
        "  # Bounds.\n"
        "  nested:\n"
        "    d: 2s              # the d\n"
        "\n"
        "  e: null\n"
    )
    groups = config_reference.parse(f)
    assert [g.title for g in groups] == ["Group one", "``hetzner.nested``", "Other options"]
    assert groups[0].intro == "Its introduction."
    described = {o.name: (o.default, o.description) for g in groups for o in g.options}
    assert described == {
        "hetzner.a": (1, "the a"),
        "hetzner.b": ("x # not a comment", "the b"),
        "hetzner.c": ([], "about c"),
        "hetzner.nested.d": ("2s", "the d"),
        "hetzner.e": (None, ""),
    }
    assert groups[1].intro == "Bounds."
    rst = config_reference.render_rst(groups)
    assert "``hetzner.nested.d``" in rst and "DASK_HETZNER__NESTED__D" in rst


def test_rst_markup_in_comments_is_safe() -> None:
    assert config_reference._rst_text("passed to `dask worker` (memory_limit, *)") == (
        r"passed to ``dask worker`` (memory\_limit, \*)"
    )
    assert config_reference._rst_text("a ` b") == r"a \` b"


def test_cli_page_names_real_commands() -> None:
    import click

    from dask_hetzner.cli import cli

    ctx = click.Context(cli)
    commands = set(cli.list_commands(ctx))
    text = (DOCS / "cli.md").read_text()
    documented = set(re.findall(r"`dask-hetzner ([a-z]+)", text))
    assert documented, "no commands found in docs/cli.md"
    assert documented <= commands, f"documented but missing: {sorted(documented - commands)}"
    assert commands <= documented, f"not documented in docs/cli.md: {sorted(commands - documented)}"
    create = cli.get_command(ctx, "create")
    assert create is not None
    flags = {opt for param in create.params for opt in getattr(param, "opts", [])}
    for flag in re.findall(r"`(--[a-z-]+)", text[text.index("`create` takes") :].split("\n\n")[0]):
        assert flag in flags, f"docs/cli.md names create {flag}, which does not exist"
