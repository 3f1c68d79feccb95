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
    toks = _tokens(text)
    reqs: list[Requirement] = []
    i = 0

    def peek(offset: int = 0) -> tuple[str, str, int] | None:
        return toks[i + offset] if i + offset < len(toks) else None

    def expect_word(what: str) -> tuple[str, int]:
        nonlocal i
        tok = peek()
        if tok is None or tok[0] != "word":
            where = tok[2] if tok else len(text)
            raise SelectorError(f"invalid label_selector: expected {what} at pos {where}")
        i += 1
        return tok[1], tok[2]

    def check_key(key: str, pos: int) -> None:
        if label_key_error(key, allow_reserved=True):
            raise SelectorError(f"invalid label_selector: invalid identifier at pos {pos}")

    def check_value(value: str, pos: int) -> None:
        if label_value_error(value):
            raise SelectorError(f"invalid label_selector: invalid value at pos {pos}")

    if not toks:
        raise SelectorError("invalid label_selector: empty selector")
    while True:
        tok = peek()
        if tok is None:
            raise SelectorError(f"invalid label_selector: expected identifier at pos {len(text)}")
        if tok == ("op", "!", tok[2]):
            i += 1
            key, pos = expect_word("identifier")
            check_key(key, pos)
            reqs.append(Requirement(key, "!exists"))
        else:
            key, pos = expect_word("identifier")
            check_key(key, pos)
            nxt = peek()
            if nxt is None or nxt[1] == ",":
                reqs.append(Requirement(key, "exists"))
            elif nxt[0] == "op" and nxt[1] in ("=", "==", "!="):
                i += 1
                after = peek()
                if after is None or after[1] == ",":
                    value, vpos = "", after[2] if after else len(text)
                else:
                    value, vpos = expect_word("value")
                check_value(value, vpos)
                reqs.append(Requirement(key, "!=" if nxt[1] == "!=" else "=", (value,)))
            elif nxt[0] == "word" and nxt[1] in ("in", "notin"):
                i += 1
                op = nxt[1]
                paren = peek()
                if paren is None or paren[1] != "(":
                    where = paren[2] if paren else len(text)
                    raise SelectorError(f"invalid label_selector: expected '(' at pos {where}")
                i += 1
                values: list[str] = []
                while True:
                    value, vpos = expect_word("value")
                    check_value(value, vpos)
                    values.append(value)
                    sep = peek()
                    if sep is not None and sep[1] == ",":
                        i += 1
                        continue
                    if sep is not None and sep[1] == ")":
                        i += 1
                        break
                    where = sep[2] if sep else len(text)
                    raise SelectorError(f"invalid label_selector: expected ',' or ')' at pos {where}")
                reqs.append(Requirement(key, op, tuple(values)))
            else:
                raise SelectorError(f"invalid label_selector: expected comma at pos {nxt[2]}")
        tok = peek()
        if tok is None:
            break
        if tok[1] != ",":
            raise SelectorError(f"invalid label_selector: expected comma at pos {tok[2]}")
        i += 1
    return Selector(tuple(reqs))
