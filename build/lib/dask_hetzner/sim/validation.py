"""Answers checked against the spec (``Simulator(validate_responses=True)``), cheaply.

Identical answers (catalog pages, polls) are validated once; big lists item by item,
an item already seen (same JSON) not again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict

from .replies import Reply
from .schema import Spec

log = logging.getLogger(__name__)

_REMEMBERED_MAX = 50000


class ResponseChecker:
    def __init__(self, spec: Spec, violations: list[str]) -> None:
        self.spec = spec
        self.violations = violations  # shared with the Api: every violation found
        self._validated: OrderedDict[bytes, None] = OrderedDict()

    def check(self, operation_id: str, reply: Reply, text: bytes | None) -> Reply:
        """``reply``, or a 500 naming the first spec violation (recorded in ``violations``)."""
        key = hashlib.blake2b(
            operation_id.encode() + str(reply.status).encode() + (text or b""), digest_size=16
        ).digest()
        if key in self._validated:  # identical answers (catalog pages, polls) validate once
            return reply
        errors = self._errors(operation_id, reply)
        if errors:
            self.violations.extend(errors)
            log.error("spec violation: %s", errors)
            return Reply(
                500,
                {"error": {"code": "server_error", "message": "simulator spec violation: " + errors[0], "details": None}},
                reply.headers,
            )
        self._remember(key)
        return reply

    def _errors(self, operation_id: str, reply: Reply) -> list[str]:
        """Spec errors of an answer; big lists are validated item by item, and an
        item already seen (same JSON) is not validated again, so polling stays cheap."""
        body = reply.body
        list_keys = [k for k, v in body.items() if isinstance(v, list)] if isinstance(body, dict) else []
        if len(list_keys) != 1 or "meta" not in body or len(body[list_keys[0]]) < 2:
            return self.spec.response_errors(operation_id, reply.status, body)
        key = list_keys[0]
        item_validator = self.spec.item_validator(operation_id, reply.status, key)
        if item_validator is None:
            return self.spec.response_errors(operation_id, reply.status, body)
        items = body[key]
        errors = self.spec.response_errors(operation_id, reply.status, {**body, key: items[:1]})
        for i, item in enumerate(items[1:], start=1):
            digest = hashlib.blake2b(
                operation_id.encode() + json.dumps(item, sort_keys=True).encode(), digest_size=16
            ).digest()
            if digest in self._validated:
                continue
            item_errors = [f"{operation_id} {reply.status} at /{key}/{i}: {e.message[:300]}" for e in item_validator.iter_errors(item)]
            if item_errors:
                errors += item_errors
            else:
                self._remember(digest)
        return errors

    def _remember(self, digest: bytes) -> None:
        self._validated[digest] = None
        if len(self._validated) > _REMEMBERED_MAX:
            self._validated.popitem(last=False)
