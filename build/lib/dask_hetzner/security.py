"""Every key and certificate of a cluster.

* SSH: the client's ed25519 key pair (registered with Hetzner as an SSH key) and one ed25519
  host key per server, handed to cloud-init so the client can pin it (no trust on first use).
* TLS: one ECDSA P-256 certificate authority per cluster, whose private key never leaves the
  client, and one key + certificate per node (scheduler, each worker, the client).

Only ``cryptography`` is used here; OpenSSH formats come from its serialization, so this module
works without ``asyncssh``.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "SSHKeyPair",
    "HostKey",
    "cloud_config",
    "ClusterCA",
    "TLSCert",
]

# --------------------------------------------------------------------------------------------
# SSH keys


_K = TypeVar("_K", bound="_Ed25519Key")


class _Ed25519Key:
    """An ed25519 key with OpenSSH serializations."""

    default_comment = "dask-hetzner"

    def __init__(self, key: ed25519.Ed25519PrivateKey, comment: str | None = None) -> None:
        comment = self.default_comment if comment is None else comment
        if "\n" in comment or "\r" in comment:
            raise ValueError("an SSH key comment must be a single line")
        self._key = key
        self.comment = comment

    @classmethod
    def generate(cls: type[_K], comment: str | None = None) -> _K:
        return cls(ed25519.Ed25519PrivateKey.generate(), comment)

    @classmethod
    def from_private_openssh(cls: type[_K], text: str | bytes, comment: str | None = None) -> _K:
        data = text.encode() if isinstance(text, str) else text
        key = serialization.load_ssh_private_key(data, password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError(f"expected an ed25519 key, got {type(key).__name__}")
        return cls(key, comment)

    @functools.cached_property
    def private_openssh(self) -> str:
        """The private key as an OpenSSH PEM (``-----BEGIN OPENSSH PRIVATE KEY-----``).

        Cached: the format embeds a random check number, and callers compare these strings.
        """
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ).decode()

    @property
    def _public_blob(self) -> bytes:
        """The SSH wire-format public key (what fingerprints are computed over)."""
        line = self._key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        return base64.b64decode(line.split()[1])

    @property
    def public_openssh(self) -> str:
        """One ``ssh-ed25519 AAAA... comment`` line (no newline)."""
        line = (
            self._key.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )
        return f"{line} {self.comment}" if self.comment else line

    @property
    def fingerprint_md5(self) -> str:
        """``aa:bb:...``: the form the Hetzner API reports for SSH keys."""
        digest = hashlib.md5(self._public_blob, usedforsecurity=False).hexdigest()
        return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))

    @property
    def fingerprint_sha256(self) -> str:
        """``SHA256:...``: the form ``ssh`` prints."""
        digest = hashlib.sha256(self._public_blob).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    def __repr__(self) -> str:
        # Never the private key: reprs end up in logs and tracebacks.
        return f"{type(self).__name__}({self.fingerprint_sha256} {self.comment!r})"


class SSHKeyPair(_Ed25519Key):
    """The client's SSH key: registered with Hetzner, used to log in as root."""


class HostKey(_Ed25519Key):
    """A server's SSH host key, made on the client so the client can pin it."""

    default_comment = "dask-hetzner-host"


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings (PEMs) as ``|`` blocks: readable, and exactly what cloud-init docs show."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _represent_str)

_CLOUD_CONFIG_SSH_KEYS = ("ssh_keys", "ssh_deletekeys", "ssh_genkeytypes")


def cloud_config(host_key: HostKey, extra: Mapping[str, Any] | None = None) -> str:
    """cloud-config user data that installs ``host_key`` as the server's only host key.

    The image's own host keys are deleted and no others are generated, so the key the client
    pins is the only one sshd can offer.  ``extra`` adds more (non-secret) cloud-config keys.
    """
    doc: dict[str, Any] = {
        "ssh_deletekeys": True,
        "ssh_genkeytypes": [],
        "ssh_keys": {
            "ed25519_private": host_key.private_openssh,
            "ed25519_public": host_key.public_openssh,
        },
    }
    for key, value in (extra or {}).items():
        if key in _CLOUD_CONFIG_SSH_KEYS:
            raise ValueError(f"cloud_config: extra may not set {key!r} (host keys are managed)")
        doc[key] = value
    return "#cloud-config\n" + yaml.dump(
        doc, Dumper=_LiteralDumper, sort_keys=False, default_flow_style=False, width=1 << 16
    )


# --------------------------------------------------------------------------------------------
# TLS


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(tz=datetime.timezone.utc)


# Servers' clocks may lag the client's by a little; a certificate "not yet valid" there would
# make the first TLS handshake fail.
_CLOCK_SKEW = datetime.timedelta(minutes=10)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dask-hetzner"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates; a node signs its handshakes and agrees on keys (ECDHE)."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class TLSCert:
    """One node's certificate and its own private key (PEM strings)."""

    cert_pem: str
    key_pem: str = field(repr=False)  # secret: keep it out of reprs and logs

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem.encode())

    @property
    def common_name(self) -> str:
        attrs = self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(attrs[0].value) if attrs else ""

    @property
    def not_valid_after(self) -> datetime.datetime:
        return self.certificate.not_valid_after_utc


class ClusterCA:
    """A per-cluster certificate authority (ECDSA P-256).

    P-256 because every OpenSSL that Python's ``ssl`` links against accepts it for TLS 1.2 and
    1.3 both as server and client certificates (ed25519 certificates are not universally
    supported by TLS stacks).  The CA key stays on the client: servers only get the CA
    certificate plus their own key and certificate.
    """

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        cert_key = cert.public_key()
        if (
            not isinstance(cert_key, ec.EllipticCurvePublicKey)
            or cert_key.public_numbers() != key.public_key().public_numbers()
        ):
            raise ValueError("the CA private key does not belong to the CA certificate")
        self._cert = cert
        self._key = key

    @classmethod
    def generate(cls, cluster_name: str, *, days: int = 3650) -> ClusterCA:
        key = ec.generate_private_key(ec.SECP256R1())
        name = _name(f"dask-hetzner CA {cluster_name}")
        now = _utcnow()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    # serialization for the local state directory -----------------------------------------

    @property
    def cert_pem(self) -> str:
        return self._cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def key_pem(self) -> str:
        """Unencrypted PKCS#8 PEM of the CA key: the caller stores it 0600, on the client only."""
        return _key_pem(self._key)

    @classmethod
    def from_pem(cls, cert_pem: str | bytes, key_pem: str | bytes) -> ClusterCA:
        cert_data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
        key_data = key_pem.encode() if isinstance(key_pem, str) else key_pem
        cert = x509.load_pem_x509_certificate(cert_data)
        key = serialization.load_pem_private_key(key_data, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"expected an EC CA key, got {type(key).__name__}")
        return cls(cert, key)

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    def __repr__(self) -> str:
        cn = self._cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        return f"ClusterCA({cn!r}, valid until {self._cert.not_valid_after_utc:%Y-%m-%d})"

    # issuing -------------------------------------------------------------------------------

    def issue(
        self,
        common_name: str,
        *,
        ips: Iterable[str] = (),
        dns: Iterable[str] = (),
        client: bool = True,
        server: bool = True,
        days: int = 365,
    ) -> TLSCert:
        """A fresh key and a certificate for one node.

        dask verifies peers against the cluster CA (mutual TLS) but does not check host names,
        so ``ips``/``dns`` only make the certificates correct for other TLS clients too.
        """
        if not (client or server):
            raise ValueError("a certificate must allow client or server use (or both)")
        key = ec.generate_private_key(ec.SECP256R1())
        now = _utcnow()
        not_after = min(now + datetime.timedelta(days=days), self._cert.not_valid_after_utc)
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        names += [x509.DNSName(d) for d in dns]
        ca_ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return TLSCert(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            key_pem=_key_pem(key),
        )
