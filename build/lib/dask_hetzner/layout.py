"""Where things live on a server: one directory below root's home, the same on every server.

Paths here are relative to root's home (SSH and SFTP start there). Modules that run on the
servers themselves (``idle.py``, ``early_start.py``) are copied there as single files and
cannot import this one: they receive these paths as arguments or environment variables.
"""

from __future__ import annotations

REMOTE_DIR = ".dask-hetzner"

ENV_DIR = f"{REMOTE_DIR}/env"
DASK = f"{ENV_DIR}/bin/dask"
PYTHON = f"{ENV_DIR}/bin/python"
BOOTSTRAP_SCRIPT = f"{REMOTE_DIR}/bootstrap.sh"
BOOTSTRAP_LOG = f"{REMOTE_DIR}/bootstrap.log"
VERSIONS = f"{REMOTE_DIR}/versions.json"
WORK_DIR = f"{REMOTE_DIR}/work"
TLS_DIR = f"{REMOTE_DIR}/tls"
SCHEDULER_FILE = f"{REMOTE_DIR}/scheduler.json"
# The user's job (payload.py): wheels of local packages (relative to REMOTE_DIR: the bootstrap
# installs from there), uploaded files (on the processes' PYTHONPATH), variables and secrets.
WHEELS_DIR = "wheels"
UPLOAD_DIR = f"{REMOTE_DIR}/upload"
UPLOAD_ARCHIVE = f"{REMOTE_DIR}/upload.tar.gz"
PROCESS_ENV = f"{REMOTE_DIR}/process.env"


def log(role: str) -> str:
    """The dask process's log of ``role`` (scheduler or worker)."""
    return f"{REMOTE_DIR}/{role}.log"


def pidfile(role: str) -> str:
    return f"{REMOTE_DIR}/{role}.pid"
