"""Throwaway provider credentials: a Google service-account file and an APNs .p8 key.

Freshly generated per test, written with the 0600 mode a real deployment must
use; the public halves come back so tests verify the JWTs the code signs.
"""

from __future__ import annotations

from pathlib import Path

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

SERVICE_ACCOUNT_EMAIL = "streamer@demo-project.iam.gserviceaccount.com"
SERVICE_ACCOUNT_KEY_ID = "0123456789abcdef"


def _pkcs8(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    path.chmod(0o600)
    return path


def write_service_account(
    directory: Path, *, token_uri: str, project_id: str = "demo-project"
) -> tuple[Path, rsa.RSAPublicKey]:
    """A service-account JSON as the Firebase console downloads it, and its public key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    document = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": SERVICE_ACCOUNT_KEY_ID,
        "private_key": _pkcs8(key).decode(),
        "client_email": SERVICE_ACCOUNT_EMAIL,
        "client_id": "123456789",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    }
    path = _write_private(directory / "service-account.json", orjson.dumps(document))
    return path, key.public_key()


def write_apns_key(
    directory: Path, key_id: str = "ABC123DEFG"
) -> tuple[Path, ec.EllipticCurvePublicKey]:
    """An AuthKey_<id>.p8 like Apple's (PKCS#8 P-256), and its public key."""
    key = ec.generate_private_key(ec.SECP256R1())
    path = _write_private(directory / f"AuthKey_{key_id}.p8", _pkcs8(key))
    return path, key.public_key()


class ManualClock:
    """The time tokens are minted and cached against; tests move it, nobody waits."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
