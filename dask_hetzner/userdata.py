"""What a server's cloud-config asks for besides its host key (security.cloud_config).

``hetzner.ssh-port``: Hetzner's images run sshd on port 22 and nothing on Hetzner's side
changes that, so another port is configured on the server itself, by cloud-init: a drop-in
in ``/etc/ssh/sshd_config.d/`` (Ubuntu's and Debian's ``sshd_config`` include it), then
sshd restarted. On Ubuntu 22.10 and later sshd is socket-activated: the port is the
socket's, regenerated from ``sshd_config`` on ``systemctl daemon-reload``, so the socket is
restarted there and the service elsewhere (docs/simulator.md, "Deliberate behaviours").
"""

from __future__ import annotations

from typing import Any

SSHD_DROP_IN = "/etc/ssh/sshd_config.d/60-dask-hetzner-port.conf"
DEFAULT_SSH_PORT = 22

_RESTART_SSHD = (
    "systemctl daemon-reload; "
    "if systemctl is-enabled --quiet ssh.socket 2>/dev/null; then systemctl restart ssh.socket; "
    "else systemctl restart ssh; fi"
)


def sshd_port(port: int) -> dict[str, Any]:
    """cloud-config keys that move sshd to ``port`` (none for the image's port 22)."""
    if port == DEFAULT_SSH_PORT:
        return {}
    return {
        "write_files": [{"path": SSHD_DROP_IN, "permissions": "0644", "content": f"Port {port}\n"}],
        "runcmd": [["sh", "-c", _RESTART_SSHD]],
    }
