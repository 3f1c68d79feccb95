"""Keys, host keys, cloud-config, the cluster CA and real mutual TLS with dask."""

from __future__ import annotations

import asyncio
import datetime
import shutil
import ssl
import subprocess
from pathlib import Path

import asyncssh
import dask
import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from dask_hetzner.security import (
    ClusterCA,
    HostKey,
    SSHKeyPair,
    TLSCert,
    cloud_config,
)

SSH_KEYGEN = shutil.which("ssh-keygen")


# --------------------------------------------------------------------------------------------
# SSH keys


def test_ssh_key_formats_are_openssh():
    key = SSHKeyPair.generate(comment="me@laptop")
    assert key.private_openssh.startswith("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    kind, blob, comment = key.public_openssh.split(" ")
    assert kind == "ssh-ed25519" and blob.startswith("AAAA") and comment == "me@laptop"
    # asyncssh (what dask_hetzner.remote uses) reads both and agrees they are one pair.
    private = asyncssh.import_private_key(key.private_openssh)
    public = asyncssh.import_public_key(key.public_openssh)
    assert private.export_public_key("openssh").decode().split()[:2] == [kind, blob]
    assert public.get_fingerprint("md5") == "MD5:" + key.fingerprint_md5
    assert public.get_fingerprint("sha256") == key.fingerprint_sha256
    assert "PRIVATE" not in repr(key)


def test_keys_differ_per_generate():
    assert SSHKeyPair.generate().public_openssh != SSHKeyPair.generate().public_openssh
    assert HostKey.generate().public_openssh != HostKey.generate().public_openssh


@pytest.mark.skipif(SSH_KEYGEN is None, reason="ssh-keygen not installed")
def test_fingerprint_matches_ssh_keygen(tmp_path: Path):
    key = SSHKeyPair.generate()
    (tmp_path / "id").write_text(key.private_openssh)
    (tmp_path / "id").chmod(0o600)  # ssh-keygen refuses a private key others can read
    (tmp_path / "id.pub").write_text(key.public_openssh + "\n")
    out = subprocess.run(
        [SSH_KEYGEN, "-l", "-E", "md5", "-f", str(tmp_path / "id.pub")],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert out.split()[1] == "MD5:" + key.fingerprint_md5
    # ssh-keygen accepts the private key file and derives the same public key from it.
    derived = subprocess.run(
        [SSH_KEYGEN, "-y", "-f", str(tmp_path / "id")],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert derived.split()[:2] == key.public_openssh.split()[:2]


def test_load_rejects_non_ed25519(tmp_path: Path):
    rsa = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
    with pytest.raises(ValueError, match="ed25519"):
        SSHKeyPair.from_private_openssh(rsa.export_private_key("openssh"))


# --------------------------------------------------------------------------------------------
# cloud-config


def test_cloud_config_pins_host_key_and_nothing_else():
    host = HostKey.generate()
    text = cloud_config(host)
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    assert doc == {
        "ssh_deletekeys": True,
        "ssh_genkeytypes": [],
        "ssh_keys": {
            "ed25519_private": host.private_openssh,
            "ed25519_public": host.public_openssh,
        },
    }
    # The private key in the user data is the one whose public half the client pins.
    assert (
        asyncssh.import_private_key(doc["ssh_keys"]["ed25519_private"])
        .export_public_key("openssh")
        .decode()
        .split()[1]
        == host.public_openssh.split()[1]
    )


def test_cloud_config_extra():
    host = HostKey.generate()
    doc = yaml.safe_load(cloud_config(host, {"package_update": False, "runcmd": [["true"]]}))
    assert doc["package_update"] is False and doc["runcmd"] == [["true"]]
    with pytest.raises(ValueError, match="ssh_keys"):
        cloud_config(host, {"ssh_keys": {}})


# --------------------------------------------------------------------------------------------
# CA and certificates


def test_ca_issue_certificates():
    ca = ClusterCA.generate("test-cluster")
    sched = ca.issue("scheduler", ips=["127.64.0.5", "10.0.0.2"], dns=["scheduler"])
    worker = ca.issue("worker-1", ips=["127.64.0.6"])
    client = ca.issue("client", server=False)
    assert sched.key_pem != worker.key_pem != client.key_pem  # a key per node
    assert "key_pem" not in repr(sched)

    ca_cert = ca.certificate
    for tls in (sched, worker, client):
        cert = tls.certificate
        cert.verify_directly_issued_by(ca_cert)
        assert cert.not_valid_before_utc <= datetime.datetime.now(datetime.timezone.utc)
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert bc.ca is False
    assert sched.common_name == "scheduler"
    san = sched.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == [
        "127.64.0.5",
        "10.0.0.2",
    ]
    assert san.get_values_for_type(x509.DNSName) == ["scheduler"]
    eku = client.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with pytest.raises(ValueError):
        ca.issue("nothing", client=False, server=False)


def test_ca_roundtrip():
    ca = ClusterCA.generate("c")
    again = ClusterCA.from_pem(ca.cert_pem, ca.key_pem)
    assert again.cert_pem == ca.cert_pem
    again.issue("w").certificate.verify_directly_issued_by(ca.certificate)
    other = ClusterCA.generate("c")
    with pytest.raises(ValueError, match="does not belong"):
        ClusterCA.from_pem(ca.cert_pem, other.key_pem)
    assert "PRIVATE" not in repr(ca)


# --------------------------------------------------------------------------------------------
# real TLS with a dask scheduler


@pytest.fixture
def short_timeouts():
    # Failing connections must fail fast; these bound every wait in the TLS test.
    with dask.config.set({"distributed.comm.timeouts.connect": "3s"}):
        yield


def _security(role: str, ca_pem: str, cert: TLSCert):
    """What the cluster gives dask: mutual TLS with the cluster CA, encryption required."""
    from distributed import Security

    return Security(
        require_encryption=True,
        tls_ca_file=ca_pem,
        **{f"tls_{role}_cert": cert.cert_pem, f"tls_{role}_key": cert.key_pem},
    )


def client_security(ca_pem: str, cert: TLSCert):
    return _security("client", ca_pem, cert)


async def _connect(address: str, security, timeout: float = 10) -> dict:
    from distributed import Client

    client = Client(address, security=security, asynchronous=True, timeout=3)
    try:
        await asyncio.wait_for(client, timeout)
        return await asyncio.wait_for(client.scheduler.identity(), timeout)
    finally:
        await asyncio.wait_for(client.close(), timeout)


async def test_mutual_tls_with_scheduler(short_timeouts):
    from distributed import Scheduler, Security

    ca = ClusterCA.generate("tls-test")
    sched_cert = ca.issue("scheduler", ips=["127.0.0.1"])
    client_cert = ca.issue("client", server=False)

    async with Scheduler(
        host="tls://127.0.0.1",
        port=0,
        dashboard=False,
        dashboard_address="127.0.0.1:0",  # the HTTP server starts anyway: loopback, free port
        security=_security("scheduler", ca.cert_pem, sched_cert),
    ) as scheduler:
        address = scheduler.address
        assert address.startswith("tls://127.0.0.1:")

        # the client with a certificate from the cluster CA works
        info = await _connect(address, client_security(ca.cert_pem, client_cert))
        assert info["address"] == address

        # plain TCP to the TLS listener fails
        port = address.rsplit(":", 1)[1]
        with pytest.raises((OSError, asyncio.TimeoutError)):
            await _connect(f"tcp://127.0.0.1:{port}", Security(require_encryption=False))

        # TLS without a client certificate is refused by the scheduler (distributed's own
        # client would not even try, so use a raw TLS client that trusts the cluster CA)
        ctx = ssl.create_default_context(cadata=ca.cert_pem)
        ctx.check_hostname = False
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", int(port), ssl=ctx), 10
        )
        try:
            with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
                await asyncio.wait_for(reader.read(1), 10)
        finally:
            writer.close()

        # a certificate from ANOTHER CA fails (both directions distrust each other)
        other = ClusterCA.generate("other")
        with pytest.raises((OSError, asyncio.TimeoutError)):
            await _connect(address, client_security(other.cert_pem, other.issue("client")))

        # a foreign client certificate fails even when the client trusts our CA
        foreign = other.issue("client", server=False)
        with pytest.raises((OSError, asyncio.TimeoutError)):
            await _connect(
                address, client_security(ca.cert_pem, TLSCert(foreign.cert_pem, foreign.key_pem))
            )

        # and the legitimate client still works afterwards
        assert (await _connect(address, client_security(ca.cert_pem, client_cert)))[
            "address"
        ] == address
