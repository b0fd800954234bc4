"""Fixtures both test folders use: self-signed TLS certificates for the remote backend's HTTPS service."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import types
from pathlib import Path
from typing import Callable

import pytest


def make_certificate(folder: Path, name: str = "server") -> types.SimpleNamespace:
    """A self-signed certificate for 127.0.0.1 and its key (PEM), with `cryptography` or else the openssl command."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
        return types.SimpleNamespace(cert=cert, key=key)
    private = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(private.public_key()), critical=False)
        .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    key.chmod(0o600)
    return types.SimpleNamespace(cert=cert, key=key)


@pytest.fixture(scope="session")
def certificate_maker() -> Callable[..., types.SimpleNamespace]:
    """``certificate_maker(folder, name="server")``: a self-signed certificate for 127.0.0.1 and its key."""
    return make_certificate
