"""Environment variables for the dask processes: plain ones, secret ones, Object Storage's.

Plain variables (``env=``) and secret ones (``secret_env=``) reach the scheduler's and every
worker's processes through one 0600 file per server (``layout.PROCESS_ENV``), written over
SFTP and read by the shell that starts the process: never a command line, user_data, label,
local state, log line, repr or exception message. :class:`SecretEnv` keeps the values out
of every repr; errors name the variable, never its value.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .cloud import ConfigError

# POSIX shell variable names: what `export NAME=...` accepts.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# Hetzner Object Storage's locations and endpoints (docs.hetzner.com/storage/object-storage/overview).
OBJECT_STORAGE_LOCATIONS = ("fsn1", "nbg1", "hel1")


def check_env(values: Any, what: str) -> dict[str, str]:
    """``values`` as ``{name: str}``, or a :class:`ConfigError` naming the bad entry (never its value)."""
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{what} must be a mapping of variable names to strings")
    checked: dict[str, str] = {}
    for name, value in values.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{what}: {name!r} is not a valid environment variable name")
        if not isinstance(value, str):
            # The value's type only: a secret passed as bytes or a number is still a secret.
            raise ConfigError(f"{what}[{name!r}] must be a string, got a {type(value).__name__}")
        if "\0" in value:
            raise ConfigError(f"{what}[{name!r}] contains a NUL byte")
        checked[name] = value
    return checked


class SecretEnv(Mapping[str, str]):
    """Secret environment variables: a mapping whose repr shows the names, never the values."""

    def __init__(self, values: Mapping[str, str] | None = None) -> None:
        self._values = dict(values or {})

    def __getitem__(self, key: str) -> str:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"<SecretEnv {sorted(self._values)} (values hidden)>"

    __str__ = __repr__

    def merged(self, other: Mapping[str, str]) -> SecretEnv:
        return SecretEnv({**self._values, **other})


def object_storage(option: Any, location: str, environ: Mapping[str, str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """``object_storage=``: (plain, secret) variables giving S3 clients Hetzner Object Storage.

    ``True`` means the endpoint of the cluster's location; a string is the endpoint itself.
    Credentials come from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (and
    ``AWS_SESSION_TOKEN``), else from the shared credentials file's ``AWS_PROFILE`` (default
    ``default``): the usual places of every S3 client.
    """
    if not option:
        return {}, {}
    env = os.environ if environ is None else environ
    if option is True:
        if location not in OBJECT_STORAGE_LOCATIONS:
            raise ConfigError(
                f"object_storage=True: Hetzner Object Storage has no endpoint in {location} (it has "
                f"{', '.join(OBJECT_STORAGE_LOCATIONS)}); give the endpoint URL as object_storage="
            )
        endpoint, region = f"https://{location}.your-objectstorage.com", location
    elif isinstance(option, str) and option.startswith(("https://", "http://")):
        endpoint = option.rstrip("/")
        region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or location
    else:
        raise ConfigError(f"object_storage must be True or an endpoint URL, got {option!r}")
    secret = _credentials(env)
    plain = {
        # botocore (and so s3fs/aiobotocore, boto3, pandas) reads the endpoint from here ...
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ENDPOINT_URL": endpoint,
        # ... and fsspec's own configuration from FSSPEC_<PROTOCOL>_<ARGUMENT>.
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": region,
    }
    return plain, secret


def _credentials(env: Mapping[str, str]) -> dict[str, str]:
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    if all(env.get(k) for k in keys):
        found = {k: env[k] for k in keys}
        if env.get("AWS_SESSION_TOKEN"):
            found["AWS_SESSION_TOKEN"] = env["AWS_SESSION_TOKEN"]
        return found
    profile = env.get("AWS_PROFILE") or "default"
    path = Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or Path.home() / ".aws" / "credentials").expanduser()
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except configparser.Error:
        raise ConfigError(f"object_storage: cannot parse the credentials file {path}") from None
    if parser.has_option(profile, "aws_access_key_id") and parser.has_option(profile, "aws_secret_access_key"):
        return {
            "AWS_ACCESS_KEY_ID": parser.get(profile, "aws_access_key_id"),
            "AWS_SECRET_ACCESS_KEY": parser.get(profile, "aws_secret_access_key"),
        }
    raise ConfigError(
        "object_storage: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
        f"or profile {profile!r} in {path}"
    )


def process_env_file(plain: Mapping[str, str], secret: Mapping[str, str], pythonpath: str | None) -> str:
    """The text of ``layout.PROCESS_ENV``: ``export`` lines, every value quoted."""
    lines = ["# dask-hetzner: read by the shell that starts the dask process (0600)"]
    values = {**plain, **secret}
    for name, value in values.items():
        lines.append(f"export {name}={shlex.quote(value)}")
    if pythonpath:
        # Uploaded files first; what the user set in env= for PYTHONPATH after them.
        lines.append(f'export PYTHONPATH="$HOME/"{shlex.quote(pythonpath)}"${{PYTHONPATH:+:$PYTHONPATH}}"')
    return "\n".join(lines) + "\n"
