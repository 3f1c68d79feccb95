"""Labels (Kubernetes rules, ``hetzner.cloud/`` reserved) and label selectors."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_NAME = re.compile(r"^[A-Za-z0-9]([-_.A-Za-z0-9]*[A-Za-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
RESERVED_PREFIX = "hetzner.cloud"


def label_key_error(key: str, *, allow_reserved: bool = False) -> str | None:
    """Why ``key`` is not a valid label key, or None."""
    if not isinstance(key, str) or not key:
        return "label key must not be empty"
    prefix, _, name = key.rpartition("/")
    if "/" in prefix:
        return f"label key {key!r} has more than one '/'"
    if not name or len(name) > 63 or not _NAME.match(name):
        return f"label key {key!r} has an invalid name segment"
    if prefix or key.startswith("/"):
        if not prefix or len(prefix) > 253 or not all(_DNS_LABEL.match(p) for p in prefix.split(".")):
            return f"label key {key!r} has an invalid prefix"
        reserved = prefix == RESERVED_PREFIX or prefix.endswith("." + RESERVED_PREFIX)
        if reserved and not allow_reserved:
            return f"label key prefix {RESERVED_PREFIX!r} is reserved"
    return None


def label_value_error(value: object) -> str | None:
    if not isinstance(value, str):
        return "label value must be a string"
    if value == "":
        return None
    if len(value) > 63 or not _NAME.match(value):
        return f"label value {value!r} is invalid"
    return None


def labels_errors(labels: Mapping[str, object]) -> list[str]:
    out = []
    for key, value in labels.items():
        err = label_key_error(key) or label_value_error(value)
        if err:
            out.append(err)
    return out


class SelectorError(ValueError):
    pass


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "exists", "!exists", "in", "notin"
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op == "=":
            return present and labels[self.key] == self.values[0]
        if self.op == "!=":
            return not present or labels[self.key] != self.values[0]
        if self.op == "in":
            return present and labels[self.key] in self.values
        return not present or labels[self.key] not in self.values  # notin


@dataclass(frozen=True)
class Selector:
    requirements: tuple[Requirement, ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)


_TOKEN = re.compile(
    r"\s*(?:(?P<op>==|!=|=|\(|\)|,|!)|(?P<word>[A-Za-z0-9][-_./A-Za-z0-9]*|[-_.A-Za-z0-9]+))"
)


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise SelectorError(f"invalid label_selector: unexpected character at pos {pos}")
        kind = "op" if m.group("op") else "word"
        value = m.group("op") or m.group("word")
        out.append((kind, value, m.start(kind)))
        pos = m.end()
    return out


def parse_selector(text: str) -> Selector:
    """Parse Hetzner's label selector language; raises SelectorError."""
    return _Parser(text).selector()


class _Parser:
    """Recursive descent over the tokens: requirements separated by commas."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0

    def _fail(self, what: str, pos: int) -> SelectorError:
        return SelectorError(f"invalid label_selector: {what} at pos {pos}")

    def _where(self, tok: tuple[str, str, int] | None) -> int:
        return tok[2] if tok else len(self.text)

    def peek(self) -> tuple[str, str, int] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def expect_word(self, what: str) -> tuple[str, int]:
        tok = self.peek()
        if tok is None or tok[0] != "word":
            raise self._fail(f"expected {what}", self._where(tok))
        self.i += 1
        return tok[1], tok[2]

    def key(self) -> str:
        key, pos = self.expect_word("identifier")
        if label_key_error(key, allow_reserved=True):
            raise self._fail("invalid identifier", pos)
        return key

    def check_value(self, value: str, pos: int) -> None:
        if label_value_error(value):
            raise self._fail("invalid value", pos)

    def selector(self) -> Selector:
        if not self.toks:
            raise SelectorError("invalid label_selector: empty selector")
        reqs: list[Requirement] = []
        while True:
            reqs.append(self.requirement())
            tok = self.peek()
            if tok is None:
                break
            if tok[1] != ",":
                raise self._fail("expected comma", tok[2])
            self.i += 1
        return Selector(tuple(reqs))

    def requirement(self) -> Requirement:
        tok = self.peek()
        if tok is None:
            raise self._fail("expected identifier", len(self.text))
        if tok == ("op", "!", tok[2]):
            self.i += 1
            return Requirement(self.key(), "!exists")
        key = self.key()
        nxt = self.peek()
        if nxt is None or nxt[1] == ",":
            return Requirement(key, "exists")
        if nxt[0] == "op" and nxt[1] in ("=", "==", "!="):
            self.i += 1
            return Requirement(key, "!=" if nxt[1] == "!=" else "=", (self.equals_value(),))
        if nxt[0] == "word" and nxt[1] in ("in", "notin"):
            self.i += 1
            return Requirement(key, nxt[1], self.value_set())
        raise self._fail("expected comma", nxt[2])

    def equals_value(self) -> str:
        after = self.peek()
        if after is None or after[1] == ",":
            value, vpos = "", self._where(after)
        else:
            value, vpos = self.expect_word("value")
        self.check_value(value, vpos)
        return value

    def value_set(self) -> tuple[str, ...]:
        paren = self.peek()
        if paren is None or paren[1] != "(":
            raise self._fail("expected '('", self._where(paren))
        self.i += 1
        values: list[str] = []
        while True:
            value, vpos = self.expect_word("value")
            self.check_value(value, vpos)
            values.append(value)
            sep = self.peek()
            if sep is not None and sep[1] in (",", ")"):
                self.i += 1
                if sep[1] == ")":
                    return tuple(values)
                continue
            raise self._fail("expected ',' or ')'", self._where(sep))
