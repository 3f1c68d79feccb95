"""SSH to the cluster's servers: the only production package that imports ``asyncssh``.

Every connection pins the server's host key (made by :mod:`dask_hetzner.security` and handed to
cloud-init), logs in as root with the cluster's own key, and reads nothing from the user's
``~/.ssh`` (no known_hosts, no config, no agent): the cluster's trust is exactly what this
library created.

Long-running processes (dask scheduler/worker) are started detached in their own session and
stopped explicitly by process group through a command, never with an SSH signal request (which
OpenSSH ignores for non-pty sessions and the simulator refuses).

* :mod:`.login`: :func:`connect` (pinned host key, TCP probes while a server boots, retries);
* :mod:`.connection`: :class:`Remote`, one open connection (run, SFTP, forwards, sessions);
* :mod:`.detached`: the scripts that start and stop detached processes;
* :mod:`.tunnel`: :class:`Tunnel`, forwards that reconnect;
* :mod:`.errors`: the exceptions.
"""

from __future__ import annotations

from .connection import Remote, Result
from .detached import StopOutcome
from .errors import (
    HostKeyMismatch,
    RemoteCommandError,
    RemoteError,
    RemoteTimeout,
    SSHConnectError,
    SSHTimeout,
)
from .login import connect
from .tunnel import Tunnel

__all__ = [
    "connect",
    "Remote",
    "Result",
    "RemoteError",
    "SSHConnectError",
    "SSHTimeout",
    "HostKeyMismatch",
    "RemoteCommandError",
    "RemoteTimeout",
    "StopOutcome",
    "Tunnel",
]
