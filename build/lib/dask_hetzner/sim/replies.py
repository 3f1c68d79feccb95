"""What a route handler gets (``Ctx``) and gives (``Reply``), and the route itself."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .store import Store


@dataclass
class Ctx:
    store: Store
    path: dict[str, int]
    query: dict[str, Any]
    body: Any
    url: str  # absolute URL of the request without its query (for Link headers)
    raw_query: list[tuple[str, str]]


@dataclass
class Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Ctx], Reply]


@dataclass
class Route:
    method: str
    template: str
    operation_id: str
    handler: Handler
    regex: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        pattern = re.sub(r"\{(\w+)\}", lambda m: f"(?P<{m.group(1)}>\\d+)", self.template)
        self.regex = re.compile(f"^{pattern}$")
