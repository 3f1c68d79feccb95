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
# The dask processes run as DASK_USER, never as root (docs/security.md): RUN_AS starts a
# command as that user; DASK_DIR is its home (0700, its own: work and spill directories, the
# scheduler file); it reads TLS_DIR through its group. The bootstrap makes all of them.
DASK_USER = "dask"
DASK_DIR = f"{REMOTE_DIR}/dask"
RUN_AS = f"{REMOTE_DIR}/bin/run-as-dask"
WORK_DIR = f"{DASK_DIR}/work"
TLS_DIR = f"{REMOTE_DIR}/tls"
SCHEDULER_FILE = f"{DASK_DIR}/scheduler.json"
# The dask user's bytecode cache (PYTHONPYCACHEPREFIX): the environment is root's and not
# writable for it, so without this every dask process compiled every module it imports again.
PYCACHE_DIR = f"{DASK_DIR}/pycache"
# Files the dask processes import (preloads): root's, in a directory the dask user may list
# (Python's import system lists a module's directory; the others here are not listable).
LIB_DIR = f"{REMOTE_DIR}/lib"
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
