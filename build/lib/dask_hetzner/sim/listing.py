"""Lists as Hetzner serves them: ``name`` and label-selector filters, ``sort``, pages and ``Link``."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlencode

from .labels import SelectorError, parse_selector
from .replies import Ctx, Reply
from .store import invalid_input

PER_PAGE_DEFAULT = 25
PER_PAGE_MAX = 50
QUERY_ERROR_STATUS = 400  # invalid query parameters (label selector, sort, page ...)

BASIC_SORT: dict[str, Callable[[Any], Any]] = {
    "id": lambda o: o.id,
    "name": lambda o: o.name,
    "created": lambda o: o.created,
}


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, "") if value is None else (1, value)


def _keyed(getter: Callable[[Any], Any], obj: Any) -> tuple[int, Any]:
    return _sort_key(getter(obj))


def sort_items(items: list[Any], sorts: Iterable[str] | None, getters: dict[str, Callable[[Any], Any]]) -> list[Any]:
    items = sorted(items, key=lambda o: getters["id"](o))
    for spec in reversed(list(sorts or [])):
        name, _, direction = spec.partition(":")
        getter = getters.get(name)
        if getter is None:  # the spec enum already rejected unknown fields
            continue
        items.sort(key=functools.partial(_keyed, getter), reverse=direction == "desc")
    return items


def name_filter(items: list[Any], ctx: Ctx) -> list[Any]:
    name = ctx.query.get("name")
    return items if name is None else [o for o in items if getattr(o, "name", None) == name]


def selector_filter(items: list[Any], ctx: Ctx, labels: Callable[[Any], dict[str, str]]) -> list[Any]:
    text = ctx.query.get("label_selector")
    if text is None or text == "":
        return items
    try:
        sel = parse_selector(text)
    except SelectorError as exc:
        raise invalid_input([("label_selector", str(exc))], status=QUERY_ERROR_STATUS) from None
    return [o for o in items if sel.matches(labels(o))]


def labelled(items: list[Any], ctx: Ctx) -> list[Any]:
    """The usual list of a labelled kind: ``name`` and ``label_selector`` filters, then ``sort``."""
    items = selector_filter(name_filter(items, ctx), ctx, lambda o: o.labels)
    return sort_items(items, ctx.query.get("sort"), BASIC_SORT)


def paginate(ctx: Ctx, key: str, items: list[Any], render: Callable[[Any], Any]) -> Reply:
    page = ctx.query.get("page", 1)
    per_page = ctx.query.get("per_page", PER_PAGE_DEFAULT)
    if page < 1:
        raise invalid_input([("page", "page must be >= 1")], status=QUERY_ERROR_STATUS)
    if per_page < 1:
        raise invalid_input([("per_page", "per_page must be >= 1")], status=QUERY_ERROR_STATUS)
    per_page = min(per_page, PER_PAGE_MAX)
    total = len(items)
    last = max(1, math.ceil(total / per_page))
    chunk = items[(page - 1) * per_page : page * per_page]
    prev_page = page - 1 if page > 1 else None
    next_page = page + 1 if page < last else None
    body = {
        key: [render(o) for o in chunk],
        "meta": {
            "pagination": {
                "page": page,
                "per_page": per_page,
                "previous_page": prev_page,
                "next_page": next_page,
                "last_page": last,
                "total_entries": total,
            }
        },
    }
    return Reply(200, body, _link_header(ctx, per_page, prev_page, next_page, last))


def _link_header(ctx: Ctx, per_page: int, prev_page: int | None, next_page: int | None, last: int) -> dict[str, str]:
    links = []
    kept = [(k, v) for k, v in ctx.raw_query if k not in ("page", "per_page")]
    for rel, target in (("prev", prev_page), ("next", next_page), ("last", last)):
        if target is not None:
            qs = urlencode([*kept, ("page", str(target)), ("per_page", str(per_page))])
            links.append(f'<{ctx.url}?{qs}>; rel="{rel}"')
    return {"Link": ", ".join(links)} if links else {}
