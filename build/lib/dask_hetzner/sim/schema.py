"""Hetzner's OpenAPI description: operations, request and response validation.

The spec (``cloud.spec.json.gz``, OpenAPI 3.1 = JSON Schema 2020-12) ships in the
package.  Every schema is addressed through a ``referencing`` registry holding the
whole document, so validators are compiled once per operation and cached.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_FILE = "cloud.spec.json.gz"
SPEC_URI = "urn:dask-hetzner:hcloud-cloud-spec"
METHODS = ("get", "post", "put", "delete", "patch")


class SpecViolation(AssertionError):
    """A simulator answer does not match Hetzner's spec (a simulator bug)."""


@dataclass(frozen=True)
class FieldError:
    """One invalid request field, as Hetzner reports it in ``details.fields``."""

    name: str
    message: str


@dataclass
class Operation:
    operation_id: str
    method: str  # upper case
    path: str  # template, e.g. /servers/{id}
    pointer: str  # JSON pointer of the operation object inside the spec
    spec: dict[str, Any] = field(repr=False)

    @property
    def query_parameters(self) -> dict[str, dict[str, Any]]:
        return {
            p["name"]: p.get("schema", {})
            for p in self.spec.get("parameters", [])
            if p.get("in") == "query"
        }

    @property
    def has_body(self) -> bool:
        return "requestBody" in self.spec

    @property
    def body_required(self) -> bool:
        return bool(self.spec.get("requestBody", {}).get("required"))


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


# Where the real API (and the SDK) is more lenient than the published schema:
# the SDK sends ids where the spec says "ID or name" but types it as a string,
# and may send ``start_after_create: null``.  Keyed by operation id, then by a
# path of property names ("[]" = array items) to the replacement schema.
_ID_OR_NAME = {"type": ["string", "integer"]}
REQUEST_RELAXATIONS: dict[str, dict[tuple[str, ...], dict[str, Any]]] = {
    "create_server": {
        ("server_type",): _ID_OR_NAME,
        ("image",): _ID_OR_NAME,
        ("location",): _ID_OR_NAME,
        ("ssh_keys", "[]"): _ID_OR_NAME,
        ("start_after_create",): {"type": ["boolean", "null"]},
    },
}

_TYPE_MESSAGES = {
    "string": "Not a valid string.",
    "integer": "Not a valid integer.",
    "number": "Not a valid number.",
    "boolean": "Not a valid boolean.",
    "array": "Not a valid list.",
    "object": "Not a valid mapping type.",
    "null": "Field may not be null.",
}


def _type_message(expected: Any) -> str:
    if isinstance(expected, list):
        non_null = [t for t in expected if t != "null"]
        expected = non_null[0] if non_null else "null"
    return _TYPE_MESSAGES.get(expected, "Invalid input type.")


def _error_to_field(err: jsonschema.ValidationError) -> FieldError:
    path = [str(p) for p in err.absolute_path]
    if err.validator == "required":
        # One error per missing property; its name is only in the message.
        m = re.match(r"^'(.+)' is a required property$", err.message)
        missing = [m.group(1)] if m else [k for k in err.validator_value if k not in (err.instance or {})]
        name = ".".join([*path, missing[0] if missing else "?"])
        return FieldError(name, "Missing data for required field.")
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = set(err.schema.get("properties", {}))
        extra = [k for k in err.instance if k not in allowed]
        return FieldError(".".join([*path, str(extra[0]) if extra else "?"]), "Unknown field.")
    name = ".".join(path) or "body"
    if err.validator == "type":
        return FieldError(name, _type_message(err.validator_value))
    if err.validator == "enum":
        return FieldError(name, "Must be one of: " + ", ".join(map(str, err.validator_value)) + ".")
    if err.validator in ("maxLength", "minLength"):
        return FieldError(name, "Length is out of range.")
    if err.validator in ("maxItems", "minItems"):
        return FieldError(name, "Number of items is out of range.")
    if err.validator in ("minimum", "maximum"):
        return FieldError(name, "Value is out of range.")
    if err.validator == "pattern":
        return FieldError(name, "String does not match expected pattern.")
    return FieldError(name, "Invalid input.")


# Objects the simulator shares between answers and never mutates (server types,
# locations, system images).  A validator remembers that such an object was
# valid against a given sub-schema, so long lists do not re-validate them per item.
_FROZEN: dict[int, Any] = {}
_FROZEN_VALID: set[tuple[int, int]] = set()


def freeze(obj: Any) -> Any:
    """Declare ``obj`` immutable (kept alive, so its id stays unique)."""
    _FROZEN[id(obj)] = obj
    return obj


def _memo_properties(validator: Any, properties: Any, instance: Any, schema: Any) -> Iterator[Any]:
    key = (id(instance), id(schema))
    if key in _FROZEN_VALID:
        return
    errors = list(_PROPERTIES(validator, properties, instance, schema))
    if not errors and id(instance) in _FROZEN:
        _FROZEN_VALID.add(key)
    yield from errors


_PROPERTIES = jsonschema.Draft202012Validator.VALIDATORS["properties"]
Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"properties": _memo_properties})


class Spec:
    """The loaded spec with per-operation compiled validators."""

    def __init__(self, document: dict[str, Any]):
        self.document = document
        self.registry: Registry = Registry().with_resource(
            SPEC_URI, Resource.from_contents(document, default_specification=DRAFT202012)
        )
        self._by_route: dict[tuple[str, str], Operation] = {}
        self._by_id: dict[str, Operation] = {}
        for path, item in document["paths"].items():
            for method, op in item.items():
                if method not in METHODS or not isinstance(op, dict):
                    continue
                operation = Operation(
                    operation_id=op["operationId"],
                    method=method.upper(),
                    path=path,
                    pointer=f"/paths/{_escape(path)}/{method}",
                    spec=op,
                )
                self._by_route[(operation.method, path)] = operation
                self._by_id[operation.operation_id] = operation

    # -- lookup -------------------------------------------------------------
    def operation(self, method: str, path_template: str) -> Operation | None:
        return self._by_route.get((method.upper(), path_template))

    def operation_by_id(self, operation_id: str) -> Operation:
        return self._by_id[operation_id]

    def operations(self) -> Iterable[Operation]:
        return self._by_id.values()

    # -- validators ---------------------------------------------------------
    def _ref_validator(self, pointer: str) -> jsonschema.protocols.Validator:
        schema = {"$ref": f"{SPEC_URI}#{pointer}"}
        return Validator(schema, registry=self.registry)

    def _response_key(self, operation_id: str, status: int) -> str | None:
        """The key of ``responses`` that covers ``status`` ("201", "4xx" ...)."""
        responses = self._by_id[operation_id].spec.get("responses", {})
        for key in (str(status), f"{str(status)[0]}xx", "default"):
            if key in responses:
                return key
        return None

    @functools.cache  # noqa: B019 - one Spec per process, cached on purpose
    def _response_pointer(self, operation_id: str, status: int) -> str | None:
        op = self._by_id[operation_id]
        key = self._response_key(operation_id, status)
        if key is None or "application/json" not in op.spec["responses"][key].get("content", {}):
            return None
        return f"{op.pointer}/responses/{key}/content/application~1json/schema"

    @functools.cache  # noqa: B019
    def response_validator(self, operation_id: str, status: int) -> jsonschema.protocols.Validator | None:
        pointer = self._response_pointer(operation_id, status)
        return None if pointer is None else self._ref_validator(pointer)

    @functools.cache  # noqa: B019
    def item_validator(self, operation_id: str, status: int, key: str) -> jsonschema.protocols.Validator | None:
        """Validator of one item of the list ``key`` in an answer (lists are checked item by item)."""
        pointer = self._response_pointer(operation_id, status)
        if pointer is None:
            return None
        schema = self.registry.resolver().lookup(f"{SPEC_URI}#{pointer}").contents
        items = schema.get("properties", {}).get(key, {}).get("items")
        if items is None:
            return None
        return self._ref_validator(f"{pointer}/properties/{_escape(key)}/items")

    def response_allows_body(self, operation_id: str, status: int) -> bool:
        key = self._response_key(operation_id, status)
        return key is not None and "content" in self._by_id[operation_id].spec["responses"][key]

    @functools.cache  # noqa: B019
    def request_validator(self, operation_id: str) -> jsonschema.protocols.Validator | None:
        op = self._by_id[operation_id]
        body = op.spec.get("requestBody")
        if body is None:
            return None
        schema = copy.deepcopy(body["content"]["application/json"]["schema"])
        for path, replacement in REQUEST_RELAXATIONS.get(operation_id, {}).items():
            node = schema
            for part in path[:-1]:
                node = node["items"] if part == "[]" else node["properties"][part]
            last = path[-1]
            target = node["items"] if last == "[]" else node["properties"][last]
            description = target.get("description")
            target.clear()
            target.update(replacement)
            if description:
                target["description"] = description
        return jsonschema.Draft202012Validator(schema, registry=self.registry)

    # -- checks -------------------------------------------------------------
    def request_errors(self, operation_id: str, body: Any) -> list[FieldError]:
        validator = self.request_validator(operation_id)
        if validator is None:
            return []
        errors = sorted(validator.iter_errors(body), key=lambda e: list(map(str, e.absolute_path)))
        seen: dict[str, FieldError] = {}
        for err in errors:
            fe = _error_to_field(err)
            seen.setdefault(fe.name, fe)
        return list(seen.values())

    def response_errors(self, operation_id: str, status: int, body: Any) -> list[str]:
        if self._response_key(operation_id, status) is None:
            return [f"{operation_id} has no response {status} in the spec"]
        if body is None:
            if self.response_allows_body(operation_id, status):
                return [f"{operation_id} {status}: body expected, none sent"]
            return []
        if not self.response_allows_body(operation_id, status):
            return [f"{operation_id} {status}: no body allowed"]
        validator = self.response_validator(operation_id, status)
        if validator is None:
            return []
        return [
            f"{operation_id} {status} at /{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}"
            for e in validator.iter_errors(body)
        ]

    def check_response(self, operation_id: str, status: int, body: Any) -> None:
        errors = self.response_errors(operation_id, status, body)
        if errors:
            raise SpecViolation("; ".join(errors))

    def parse_query(
        self, operation_id: str, query: Mapping[str, list[str]]
    ) -> tuple[dict[str, Any], list[FieldError]]:
        """Typed query parameters of an operation, and what was invalid.

        ``query`` maps each name to all its values (arrays repeat the key).
        Unknown parameters are ignored, as by the real API.
        """
        op = self._by_id[operation_id]
        params: dict[str, Any] = {}
        errors: list[FieldError] = []
        for name, schema in op.query_parameters.items():
            if name not in query:
                continue
            values = query[name]
            try:
                if schema.get("type") == "array":
                    item_schema = schema.get("items", {})
                    params[name] = [_coerce(v, item_schema) for v in values]
                else:
                    params[name] = _coerce(values[-1], schema)
            except ValueError as exc:
                errors.append(FieldError(name, str(exc)))
        return params, errors


def _coerce(raw: str, schema: dict[str, Any]) -> Any:
    kind = schema.get("type")
    if kind == "integer":
        if not re.fullmatch(r"[+-]?\d+", raw.strip()):
            raise ValueError("Not a valid integer.")
        value: Any = int(raw)
        if "minimum" in schema and value < schema["minimum"]:
            raise ValueError("Value is out of range.")
        if "maximum" in schema and value > schema["maximum"]:
            raise ValueError("Value is out of range.")
        return value
    if kind == "boolean":
        low = raw.strip().lower()
        if low in ("true", "1"):
            return True
        if low in ("false", "0"):
            return False
        raise ValueError("Not a valid boolean.")
    if "enum" in schema and raw not in schema["enum"]:
        raise ValueError("Must be one of: " + ", ".join(map(str, schema["enum"])) + ".")
    return raw


@functools.cache
def load_spec() -> Spec:
    """The packaged spec, parsed once per process."""
    data = resources.files(__package__).joinpath(SPEC_FILE).read_bytes()
    return Spec(json.loads(gzip.decompress(data)))
