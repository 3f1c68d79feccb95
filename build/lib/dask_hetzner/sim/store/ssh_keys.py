"""SSH keys: ``/ssh_keys``."""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from dataclasses import dataclass
from typing import Any

from ..schema import FieldError
from .actions import Core
from .base import (
    get_or_404,
    id_or_name,
    invalid_input,
    iso,
    labels_field_errors,
    name_errors,
    uniqueness_error,
)


@dataclass(eq=False)
class SSHKey:
    id: int
    name: str
    public_key: str
    fingerprint: str
    labels: dict[str, str]
    created: float

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "fingerprint": self.fingerprint,
            "public_key": self.public_key,
            "labels": dict(self.labels),
            "created": iso(self.created),
        }


def fingerprint(public_key: str) -> str:
    """MD5 fingerprint of an OpenSSH public key line; ValueError if it is none."""
    parts = public_key.strip().split()
    if len(parts) < 2 or not (parts[0].startswith(("ssh-", "ecdsa-", "sk-"))):
        raise ValueError("invalid public key")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("invalid public key") from exc
    # The key blob starts with its own type name, length-prefixed.
    if len(blob) < 4:
        raise ValueError("invalid public key")
    n = int.from_bytes(blob[:4], "big")
    if blob[4 : 4 + n].decode("ascii", "replace") != parts[0]:
        raise ValueError("invalid public key")
    digest = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, 32, 2))


class SSHKeyStore:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.items: dict[int, SSHKey] = {}

    def get(self, key_id: int) -> SSHKey:
        return get_or_404(self.items, key_id, "ssh key")

    def create(self, body: dict[str, Any]) -> SSHKey:
        errors = name_errors(body["name"]) + labels_field_errors(body.get("labels"))
        try:
            fp = fingerprint(body["public_key"])
        except ValueError:
            errors.append(FieldError("public_key", "invalid public key"))
            fp = ""
        if errors:
            raise invalid_input(errors)
        self.core.claim_name("ssh_key", body["name"], -1)
        if any(k.fingerprint == fp for k in self.items.values()):
            raise uniqueness_error("public_key", "SSH key with the same fingerprint already exists")
        key = SSHKey(
            id=self.core.next_id("ssh_key"),
            name=body["name"],
            public_key=body["public_key"].strip(),
            fingerprint=fp,
            labels=dict(body.get("labels") or {}),
            created=time.time(),
        )
        self.items[key.id] = key
        self.core.names["ssh_key"][key.name] = key.id
        return key

    def delete(self, key_id: int) -> None:
        key = self.get(key_id)
        del self.items[key.id]
        self.core.names["ssh_key"].pop(key.name, None)

    def resolve(self, values: list[Any]) -> list[SSHKey]:
        """The keys a create request names (``ssh_keys``: ids or names)."""
        keys = []
        for i, value in enumerate(values):
            kid, name = id_or_name(value)
            key = self.items.get(kid) if kid is not None else None
            if key is None and name is not None:
                owner = self.core.names["ssh_key"].get(name)
                key = self.items.get(owner) if owner is not None else None
            if key is None:
                raise invalid_input([(f"ssh_keys.{i}", f"ssh key {value!r} not found")])
            keys.append(key)
        return keys
