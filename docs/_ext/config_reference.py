"""The ``hetzner.*`` configuration reference, generated from ``dask_hetzner/hetzner.yaml``.

The YAML file is the single source: its values are the defaults, its comments the
descriptions. A comment at the end of a key's line describes that key; a block of comment
lines after a blank line (or right after the parent key) opens a group, whose first sentence
is the group's title and the rest its introduction. Nested mappings (``timeouts``, ``api``)
are groups of their own.

Pure Python (PyYAML only), so ``tests/test_docs.py`` can run it without Sphinx; the Sphinx
directive that puts it into the documentation lives in ``hetzner_config.py``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "Option",
    "Group",
    "default_yaml_path",
    "parse",
    "leaf_paths",
    "env_var",
    "format_default",
    "render_rst",
]

# Descriptions for keys whose line in hetzner.yaml carries no comment. Only used when the
# YAML has none; a key with neither fails tests/test_docs.py, so nothing goes undocumented.
FALLBACK_DESCRIPTIONS: dict[str, str] = {
    "hetzner.image": "operating system image of every server (a Hetzner system image name)",
    "hetzner.worker-server-type": "server type of every worker (`dask-hetzner types` lists them)",
    "hetzner.network-ip-range": "IP range of the cluster's private network (at least a /24)",
    "hetzner.ssh-port": "port sshd listens on, on every server",
    "hetzner.uv-version": "version of uv that builds the environment on the servers",
    "hetzner.api.backoff-max": "longest wait between two retries of a transient API error",
}

_KEY_RE = re.compile(
    r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+|\"[^\"]*\"|'[^']*'):(?=\s|$)(?P<rest>.*)$"
)
_COMMENT_RE = re.compile(r"^(?P<indent> *)#(?P<text>.*)$")


@dataclass
class Option:
    """One leaf of the ``hetzner`` mapping."""

    path: tuple[str, ...]  # ("hetzner", "timeouts", "ssh")
    default: Any
    description: str = ""

    @property
    def name(self) -> str:
        return ".".join(self.path)

    @property
    def env(self) -> str:
        return env_var(self.path)


@dataclass
class Group:
    """Options shown together under one title."""

    title: str
    intro: str = ""
    path: tuple[str, ...] = ()  # set for nested mappings (hetzner.timeouts)
    options: list[Option] = field(default_factory=list)


def default_yaml_path() -> Path:
    """``hetzner.yaml`` of the installed ``dask_hetzner`` package."""
    import dask_hetzner

    return Path(dask_hetzner.__file__).with_name("hetzner.yaml")


def env_var(path: tuple[str, ...] | list[str] | str) -> str:
    """The environment variable dask reads for a key: ``DASK_`` + parts joined by ``__``.

    dask lower-cases the name, splits it at ``__`` and treats ``_`` and ``-`` in a key as the
    same, so ``hetzner.timeouts.api-request`` is ``DASK_HETZNER__TIMEOUTS__API_REQUEST``.
    """
    parts = path.split(".") if isinstance(path, str) else list(path)
    return "DASK_" + "__".join(p.upper().replace("-", "_") for p in parts)


def format_default(value: Any) -> str:
    """A default as it would be written in YAML (``null``, ``[]``, ``30s``, ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    return json.dumps(value)


def _inline_comment(rest: str) -> str:
    """The comment at the end of a line's value (``#`` outside quotes, after a blank)."""
    quote: str | None = None
    prev = " "
    for i, ch in enumerate(rest):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and prev.isspace():
            return rest[i + 1 :].strip()
        prev = ch
    return ""


def _sentence_split(text: str) -> tuple[str, str]:
    """First sentence (without its full stop) and the rest."""
    m = re.match(r"^(.*?[.!?])(\s+|$)(.*)$", text, re.S)
    if not m:
        return text.strip(), ""
    return m.group(1).rstrip(".").strip(), m.group(3).strip()


def _clean(text: str) -> str:
    """Whitespace collapsed; the comment's own wording and case are kept."""
    return " ".join(text.split())


def parse(path: Path | str | None = None) -> list[Group]:
    """Read the YAML file: values with PyYAML, comments line by line."""
    path = Path(path) if path is not None else default_yaml_path()
    text = path.read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict) or "hetzner" not in data:
        raise ValueError(f"{path}: expected a top-level 'hetzner' mapping")

    key_comments: dict[tuple[str, ...], str] = {}  # inline comments
    blocks: dict[tuple[str, ...], tuple[str, bool]] = {}  # comment block before a key, opens group?
    stack: list[tuple[int, str]] = []  # (indent, key)
    pending: list[str] = []
    pending_opens = False
    after_blank = True  # start of file counts as after a blank line
    last_was_parent = False
    for line in text.splitlines():
        if not line.strip():
            after_blank = True
            pending, pending_opens = [], False  # a block followed by a blank belongs to nobody
            continue
        c = _COMMENT_RE.match(line)
        if c:
            if not pending:
                pending_opens = after_blank or last_was_parent
            pending.append(c.group("text").strip())
            after_blank = False
            continue
        k = _KEY_RE.match(line)
        if not k:  # a block sequence item or a continuation line
            after_blank = False
            continue
        indent = len(k.group("indent"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = k.group("key").strip("\"'")
        full = tuple(s for _, s in stack) + (key,)
        stack.append((indent, key))
        comment = _inline_comment(k.group("rest"))
        if comment:
            key_comments[full] = comment
        if pending:
            blocks[full] = (" ".join(pending), pending_opens)
        pending, pending_opens = [], False
        after_blank = False
        value_text = k.group("rest").split("#", 1)[0].strip()
        last_was_parent = value_text == ""

    groups: list[Group] = []

    def walk(mapping: dict[str, Any], prefix: tuple[str, ...]) -> None:
        current: Group | None = None
        for key, value in mapping.items():
            full = prefix + (key,)
            block, opens = blocks.get(full, ("", False))
            if isinstance(value, dict) and value:
                title, rest = _sentence_split(block) if block else ("", "")
                intro = _clean(" ".join(x for x in (title + "." if title else "", rest) if x))
                if key_comments.get(full):
                    intro = _clean(" ".join(x for x in (intro, key_comments[full]) if x))
                groups.append(Group(title="``" + ".".join(full) + "``", intro=intro, path=full))
                # Its leaves go to that group; a later sibling leaf starts a new one.
                walk_nested(value, full, groups[-1])
                current = None
                continue
            description = key_comments.get(full, "")
            if block and not opens:
                description = " ".join(x for x in (block, description) if x)
            if block and opens:
                title, intro = _sentence_split(block)
                current = Group(title=_clean(title), intro=_clean(intro))
                groups.append(current)
            if current is None:
                current = Group(title="Other options")
                groups.append(current)
            name = ".".join(full)
            current.options.append(
                Option(full, value, _clean(description or FALLBACK_DESCRIPTIONS.get(name, "")))
            )

    def walk_nested(mapping: dict[str, Any], prefix: tuple[str, ...], group: Group) -> None:
        for key, value in mapping.items():
            full = prefix + (key,)
            if isinstance(value, dict) and value:
                walk_nested(value, full, group)
                continue
            block, _ = blocks.get(full, ("", False))
            description = " ".join(x for x in (block, key_comments.get(full, "")) if x)
            name = ".".join(full)
            group.options.append(
                Option(full, value, _clean(description or FALLBACK_DESCRIPTIONS.get(name, "")))
            )

    walk(data["hetzner"], ("hetzner",))
    return groups


def leaf_paths(mapping: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every leaf key of a nested mapping (an empty mapping is a leaf: a value users set)."""
    out: list[tuple[str, ...]] = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out += leaf_paths(value, prefix + (key,))
        else:
            out.append(prefix + (key,))
    return out


def _rst_escape(text: str) -> str:
    return re.sub(r"([\\*`|_])", r"\\\1", text)


def _rst_text(text: str) -> str:
    """A comment as reStructuredText: `code` spans become literals, other markup is escaped."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: no code spans at all
        return _rst_escape(text)
    return "".join(f"``{part}``" if i % 2 else _rst_escape(part) for i, part in enumerate(parts))


def render_rst(groups: list[Group] | None = None, *, underline: str = "-") -> str:
    """The reference as reStructuredText: a section per group, a field list per option."""
    groups = parse() if groups is None else groups
    out: list[str] = []
    for group in groups:
        title = group.title if group.path else _rst_text(group.title)
        out += [title, underline * max(len(title), 3), ""]
        if group.intro:
            out += [_rst_text(group.intro), ""]
        for opt in group.options:
            out += [
                f".. _config-{opt.name}:",
                "",
                f"``{opt.name}``",
                f"   :Default: ``{format_default(opt.default)}``",
                f"   :Environment: ``{opt.env}``",
                "",
                f"   {_rst_text(opt.description) if opt.description else '(no description)'}",
                "",
            ]
    return "\n".join(out).rstrip() + "\n"
