"""What every resource kind shares: error answers, field checks, timestamps, id-or-name values."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any, TypeVar

from ..labels import labels_errors
from ..schema import FieldError

T = TypeVar("T")

_HOSTNAME_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


class ApiError(Exception):
    """An error answer: ``{"error": {"code", "message", "details"}}`` with a status."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


def invalid_input(errors: Iterable[FieldError | tuple[str, str]], status: int = 422) -> ApiError:
    by_name: dict[str, list[str]] = {}
    for err in errors:
        name, message = (err.name, err.message) if isinstance(err, FieldError) else err
        by_name.setdefault(name, []).append(message)
    names = list(by_name)
    if len(names) == 1:
        message = f"invalid input in field '{names[0]}'"
    else:
        message = "invalid input in fields " + ", ".join(f"'{n}'" for n in names)
    fields = [{"name": n, "messages": m} for n, m in by_name.items()]
    return ApiError(status, "invalid_input", message, {"fields": fields})


def not_found(what: str = "resource") -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def uniqueness_error(field_name: str, message: str) -> ApiError:
    return ApiError(409, "uniqueness_error", message, {"fields": [{"name": field_name}]})


def limit_exceeded(message: str, limit: str) -> ApiError:
    return ApiError(403, "resource_limit_exceeded", message, {"limits": [{"name": limit}]})


def get_or_404(table: dict[int, T], obj_id: int, what: str) -> T:
    try:
        return table[obj_id]
    except KeyError:
        raise not_found(what) from None


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+00:00")


def name_errors(name: Any, field_name: str = "name", max_len: int = 128) -> list[FieldError]:
    if not isinstance(name, str) or not name.strip():
        return [FieldError(field_name, "name must not be empty")]
    if len(name) > max_len:
        return [FieldError(field_name, f"name is longer than {max_len} characters")]
    return []


def hostname_errors(name: Any) -> list[FieldError]:
    if not isinstance(name, str) or not name:
        return [FieldError("name", "name must not be empty")]
    if len(name) > 253 or not all(_HOSTNAME_LABEL.match(p) for p in name.split(".")):
        return [FieldError("name", "name must be a valid hostname as per RFC 1123")]
    return []


def labels_field_errors(labels: Any) -> list[FieldError]:
    if labels is None:
        return []
    return [FieldError("labels", msg) for msg in labels_errors(labels)]


def parse_cidr(value: Any) -> ipaddress.IPv4Network | None:
    if not isinstance(value, str):
        return None
    try:
        return ipaddress.IPv4Network(value, strict=True)
    except ValueError:
        return None


def id_or_name(value: Any) -> tuple[int | None, str | None]:
    """Request bodies name resources by id (int or digits) or by name."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, None
    if isinstance(value, str) and value.isdigit():
        return int(value), value
    return None, value if isinstance(value, str) else None
