"""A cluster's access in one file: export it here, import it on another machine.

What ``from_name``, ``connect``, ``ssh``, ``scale`` and ``destroy`` need besides the token:
the cluster's local state (``cluster.json``, the CA, the client certificate, the SSH key,
the pinned host keys). The file is written 0600; with a passphrase its content is encrypted
(Fernet, the key derived from the passphrase by scrypt with a random salt). The token is
never in it.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import secrets as _random
from pathlib import Path
from typing import Any

from . import config
from .state import ClusterState, Secrets, StateError, root_dir

KIND = "dask-hetzner-access"


def _fernet(passphrase: str, salt: bytes) -> Any:
    from cryptography.fernet import Fernet
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    key = Scrypt(salt=salt, length=32, n=2**15, r=8, p=1).derive(passphrase.encode())
    return Fernet(base64.urlsafe_b64encode(key))


def _state(name: str) -> ClusterState:
    return ClusterState(root_dir(config.get("state-dir")), name)


def export_access(name: str, path: str | os.PathLike[str], passphrase: str | None = None) -> Path:
    """Write cluster ``name``'s access (from the local state) to ``path`` (0600, never replaced)."""
    state = _state(name)
    payload = {
        "name": name,
        "metadata": state.metadata(),
        "secrets": dataclasses.asdict(state.secrets()),
        "hosts": {server: [sid, key] for server, (sid, key) in state.host_keys().items()},
    }
    data = json.dumps(payload).encode()
    document: dict[str, Any] = {"kind": KIND, "version": 1, "name": name}
    if passphrase:
        salt = _random.token_bytes(16)
        document["salt"] = base64.b64encode(salt).decode()
        document["encrypted"] = _fernet(passphrase, salt).encrypt(data).decode()
    else:
        document["access"] = payload
    target = Path(path).expanduser()
    # O_EXCL: never over another file; 0600 from the first byte.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(document, f)
    return target


def read_access(path: str | os.PathLike[str], passphrase: str | None = None) -> dict[str, Any]:
    """The exported access in ``path``; a one-line error for a wrong file or passphrase."""
    try:
        document = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as e:
        raise StateError(f"{path}: not a readable access file ({type(e).__name__})") from None
    if not isinstance(document, dict) or document.get("kind") != KIND:
        raise StateError(f"{path}: not a dask-hetzner access file")
    if "encrypted" not in document:
        return dict(document["access"])
    if not passphrase:
        raise StateError(f"{path} is protected by a passphrase: give it")
    from cryptography.fernet import InvalidToken

    try:
        data = _fernet(passphrase, base64.b64decode(document["salt"])).decrypt(document["encrypted"].encode())
    except InvalidToken:
        raise StateError(f"{path}: wrong passphrase") from None
    return dict(json.loads(data))


def import_access(path: str | os.PathLike[str], passphrase: str | None = None) -> str:
    """Write the access in ``path`` into this machine's local state; the cluster's name.

    Refused when a state of that name exists here (it would be another cluster's keys)."""
    access = read_access(path, passphrase)
    name = str(access["name"])
    state = _state(name)
    if state.path.exists():
        raise StateError(f"a local state for cluster {name!r} already exists in {state.root}: not replaced")
    metadata = {k: v for k, v in access["metadata"].items() if k != "format"}
    state.create(metadata, Secrets(**access["secrets"]))
    for server, (sid, key) in access["hosts"].items():
        state.pin_host_key(server, int(sid), str(key))
    return name
