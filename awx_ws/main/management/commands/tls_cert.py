"""`manage.py tls_cert`: a self-signed certificate for nginx's HTTPS/WSS port, made once."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser


def self_signed(names: list[str], days: int = 365) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for the DNS names and IP addresses given."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    alternatives: list[x509.GeneralName] = []
    for name in names:
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternatives.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


class Command(BaseCommand):
    help = "Write a self-signed certificate and key under DIR (kept if already there); print their paths."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--dir", default=str(Path(settings.VAR_DIR) / "tls"))
        parser.add_argument("--name", action="append", help="DNS name or IP (default: localhost, 127.0.0.1)")

    def handle(self, *args: Any, **options: Any) -> None:
        directory = Path(options["dir"])
        certificate, key = directory / "cert.pem", directory / "key.pem"
        if not (certificate.exists() and key.exists()):
            directory.mkdir(parents=True, exist_ok=True)
            cert_pem, key_pem = self_signed(options["name"] or ["localhost", "127.0.0.1", "::1"])
            key.touch(mode=0o600)
            key.write_bytes(key_pem)
            certificate.write_bytes(cert_pem)
        self.stdout.write(f"{certificate}\n{key}")
