"""What the nodes of one cluster share, each part doing one job.

The settings record, the API, the cluster's keys, the shared resources, the server
factory, the host-key pins, the lazy watcher, where workers find their scheduler, and
progress reports. Built once by the cluster; nodes and provisioning read it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .. import environment
from ..cloud import Cloud, ServerInfo, ServerWatcher, owned
from ..idle import IdleSettings
from ..jobenv import SecretEnv
from ..payload import Payload, Snapshot
from ..security import ClusterCA, SSHKeyPair, TLSCert
from ..settings import ClusterSettings
from ..state import Secrets
from .kept import KeptServers
from .meeting import SchedulerAddress
from .pins import HostKeyPins
from .servers import Login, ServerFactory
from .shared import SharedResources

logger = logging.getLogger(__name__)


class ClusterKeys:
    """The cluster's SSH key, its CA and the client's certificate (never in a repr)."""

    def __init__(self, ssh_key: SSHKeyPair, ca: ClusterCA, client_cert: TLSCert) -> None:
        self.ssh_key = ssh_key
        self.ca = ca
        self.client_cert = client_cert

    def __repr__(self) -> str:
        return "<ClusterKeys>"

    @classmethod
    def generate(cls, cluster: str) -> ClusterKeys:
        ca = ClusterCA.generate(cluster)
        return cls(SSHKeyPair.generate(comment=f"dask-hetzner-{cluster}"), ca, ca.issue("dask-client"))

    @classmethod
    def from_secrets(cls, cluster: str, s: Secrets) -> ClusterKeys:
        """The keys as the local state stores them (see :meth:`secrets`)."""
        return cls(
            SSHKeyPair.from_private_openssh(s.ssh_private, f"dask-hetzner-{cluster}"),
            ClusterCA.from_pem(s.ca_cert, s.ca_key),
            TLSCert(s.client_cert, s.client_key),
        )

    def secrets(self) -> Secrets:
        """The keys as the local state stores them (read back by :meth:`from_secrets`)."""
        return Secrets(
            ca_cert=self.ca.cert_pem,
            ca_key=self.ca.key_pem,
            client_cert=self.client_cert.cert_pem,
            client_key=self.client_cert.key_pem,
            ssh_private=self.ssh_key.private_openssh,
            ssh_public=self.ssh_key.public_openssh,
        )


class ClusterContext:
    def __init__(
        self,
        settings: ClusterSettings,
        cloud: Cloud,
        keys: ClusterKeys,
        *,
        versions: dict[str, str],
        start: str | None,
        idle: IdleSettings | None = None,
        progress: Callable[[str, str], None] | None = None,
        payload: Payload | None = None,
    ) -> None:
        self.settings = settings
        # This cluster's start id (LABEL_START); None for a cluster made before they existed.
        self.start = start
        self.cloud = cloud
        self.keys = keys
        self.versions = versions
        # With idle_timeout on: the scheduler's server gets the token (docs/security-idle.md).
        self.idle = idle
        self.progress = progress
        # The user's job: packages, local code, files, variables and secrets (payload.py).
        self.payload = payload if payload is not None else Payload(settings, SecretEnv(), versions)
        self.watcher = ServerWatcher(cloud, owned(settings.name, start), cloud.poll_interval)
        self.pins = HostKeyPins()
        self.shared = SharedResources(cloud, settings, keys.ssh_key.public_openssh, start)
        self.ssh = Login(settings.ssh_port, keys.ssh_key.private_openssh, settings.timeouts["ssh"])
        self.factory = ServerFactory(cloud, settings, self.shared, self.watcher, self.pins, self.ssh)
        self.kept = KeptServers(self.factory, settings.keep_margin)  # retired workers' paid servers
        self.scheduler = SchedulerAddress(settings.start_timeout)

    def bootstrap_script(self, role: str, snap: Snapshot) -> str:
        """The bootstrap of a ``role`` server with this reading of the local code."""
        s = self.settings
        return environment.bootstrap_script(
            role,  # type: ignore[arg-type]
            self.payload.requirements(role),
            python=self.versions["python"],
            uv_version=s.uv_version,
            index_url=s.index_url,
            apt_packages=s.apt_packages,
            setup_commands=s.setup_commands,
            local_wheels=tuple(snap.wheel_paths()),
            python_downloads=_python_downloads(s),
        )

    @property
    def ca(self) -> ClusterCA:
        return self.keys.ca

    @property
    def servers(self) -> dict[str, ServerInfo]:
        """This cluster's servers by name, as the API last showed them."""
        return self.factory.servers

    def report(self, node: str, phase: str) -> None:
        logger.info("%s %s: %s", self.settings.name, node, phase)
        if self.progress is not None:
            self.progress(node, phase)


def _python_downloads(s: ClusterSettings) -> dict[str, str]:
    """The bootstrap's say in where uv gets a Python the image lacks (nothing: uv's defaults)."""
    chosen = {"json_url": s.python_downloads_json_url, "preference": s.python_preference}
    return {k: v for k, v in chosen.items() if v}
