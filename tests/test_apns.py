"""APNs direct delivery over real HTTP/2 (TLS + ALPN) against a local hypercorn stand-in."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey

from streamer.config import ApnsConfig, ConfigError
from streamer.delivery.apns import PRODUCTION_URL, SANDBOX_URL, ApnsPushkin
from streamer.delivery.base import Device
from streamer.delivery.errors import CredentialsError, Outcome, TemporaryDeliveryError
from tests import factories
from tests.credentials import ManualClock, write_apns_key
from tests.servers import Recorded, Reply, StubApp, serve_http2

pytestmark = pytest.mark.anyio

KEY_ID = "ABC123DEFG"
TEAM_ID = "TEAM123456"
DEVICE = Device(token_id="tok-9", kind="apn", token="a1b2c3d4", app_name="chat.rocket.ios")
DEVICE_PATH = "/3/device/a1b2c3d4"
CONTENT = factories.push_content(
    mid="m-42",
    title="general",
    text="alice: lunch?",
    badge=3,
    payload={"host": "https://chat.example.org", "rid": "GENERAL", "messageId": "m-42"},
    category="MESSAGE_NOREPLY",
)


class Apple:
    def __init__(self, app: StubApp, url: str, ca: str) -> None:
        self.app, self.url, self.ca = app, url, ca

    def pushes(self) -> list[Recorded]:
        return self.app.received(DEVICE_PATH)


class _Router:
    """Forwards to the current test's StubApp, so each test starts with no history."""

    def __init__(self) -> None:
        self.app = StubApp()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[_Router, str, str]]:
    """One HTTP/2 server for the module (TLS setup is the slow part); apps swap per test."""
    router = _Router()
    with serve_http2(router) as (url, ca):
        yield router, url, ca


@pytest.fixture
def apple(server: tuple[_Router, str, str]) -> Apple:
    router, url, ca = server
    router.app = StubApp()
    return Apple(router.app, url, ca)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@contextlib.asynccontextmanager
async def apns_pushkin(
    tmp_path: Path, apple: Apple, clock: ManualClock, **config: Any
) -> AsyncIterator[tuple[ApnsPushkin, EllipticCurvePublicKey]]:
    path, public_key = write_apns_key(tmp_path, KEY_ID)
    settings = {
        "key_file": str(path),
        "key_id": KEY_ID,
        "team_id": TEAM_ID,
        "base_url": apple.url,
        **config,
    }
    async with httpx.AsyncClient(
        http2=True, verify=ssl.create_default_context(cafile=apple.ca)
    ) as client:
        pushkin = ApnsPushkin(ApnsConfig(**settings), production=True, client=client, clock=clock)
        yield pushkin, public_key
        await pushkin.aclose()


def provider_token(push: Recorded, public_key: EllipticCurvePublicKey) -> dict[str, Any]:
    scheme, _, token = push.headers["authorization"].partition(" ")
    assert scheme == "bearer"
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": KEY_ID, "typ": "JWT"}
    claims: dict[str, Any] = jwt.decode(
        token, public_key, algorithms=["ES256"], options={"verify_iat": False}
    )
    return claims


def reason(status: int, why: str) -> Reply:
    return Reply(status=status, body={"reason": why})


async def test_push_goes_over_http2_with_headers_body_and_provider_token(
    tmp_path: Path, apple: Apple, clock: ManualClock
) -> None:
    async with apns_pushkin(tmp_path, apple, clock) as (pushkin, public_key):
        assert await pushkin.dispatch(CONTENT, DEVICE) is Outcome.SENT

    [push] = apple.pushes()
    assert push.http_version == "2"
    assert push.method == "POST"
    assert provider_token(push, public_key) == {"iss": TEAM_ID, "iat": int(clock.now)}
    assert {k: v for k, v in push.headers.items() if k.startswith("apns-")} == {
        "apns-topic": "chat.rocket.ios",
        "apns-push-type": "alert",
        "apns-priority": "10",
        "apns-expiration": str(int(clock.now) + 3600),
        "apns-collapse-id": "m-42",
    }
    assert push.json() == {
        "aps": {
            "alert": {"title": "general", "body": "alice: lunch?"},
            "badge": 3,
            "sound": "default",
            "category": "MESSAGE_NOREPLY",
            "mutable-content": 1,
            "thread-id": "1666299236",
        },
        "ejson": '{"host":"https://chat.example.org","rid":"GENERAL","messageId":"m-42"}',
        "messageFrom": "push",
    }


async def test_configured_topic_beats_the_app_name(
    tmp_path: Path, apple: Apple, clock: ManualClock
) -> None:
    async with apns_pushkin(tmp_path, apple, clock, topic="com.example.chat") as (pushkin, _):
        await pushkin.dispatch(CONTENT, DEVICE)
    assert apple.pushes()[0].headers["apns-topic"] == "com.example.chat"


async def test_provider_token_is_reused_then_renewed_within_the_hour(
    tmp_path: Path, apple: Apple, clock: ManualClock
) -> None:
    async with apns_pushkin(tmp_path, apple, clock) as (pushkin, public_key):
        started = int(clock.now)
        await pushkin.dispatch(CONTENT, DEVICE)
        clock.advance(49 * 60)
        await pushkin.dispatch(CONTENT, DEVICE)
        clock.advance(60)
        await pushkin.dispatch(CONTENT, DEVICE)
    issued = [provider_token(p, public_key)["iat"] for p in apple.pushes()]
    assert issued == [started, started, started + 50 * 60]


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        (reason(410, "Unregistered"), Outcome.DEAD_TOKEN),
        (reason(400, "BadDeviceToken"), Outcome.DEAD_TOKEN),
        (reason(400, "DeviceTokenNotForTopic"), Outcome.DEAD_TOKEN),
        (reason(400, "PayloadEmpty"), Outcome.REJECTED),
        (reason(413, "PayloadTooLarge"), Outcome.REJECTED),
    ],
    ids=["unregistered", "bad-token", "not-for-topic", "bad-request", "too-large"],
)
async def test_permanent_refusals(
    tmp_path: Path, apple: Apple, clock: ManualClock, reply: Reply, outcome: Outcome
) -> None:
    apple.app.script(DEVICE_PATH, reply)
    async with apns_pushkin(tmp_path, apple, clock) as (pushkin, _):
        assert await pushkin.dispatch(CONTENT, DEVICE) is outcome
    assert len(apple.pushes()) == 1


@pytest.mark.parametrize(
    ("reply", "retry_after"),
    [
        (
            Reply(status=429, body={"reason": "TooManyRequests"}, headers={"retry-after": "12"}),
            12.0,
        ),
        (reason(503, "ServiceUnavailable"), None),
        (reason(500, "InternalServerError"), None),
    ],
    ids=["429", "503", "500"],
)
async def test_throttling_and_server_errors_are_temporary(
    tmp_path: Path, apple: Apple, clock: ManualClock, reply: Reply, retry_after: float | None
) -> None:
    apple.app.script(DEVICE_PATH, reply)
    async with apns_pushkin(tmp_path, apple, clock) as (pushkin, _):
        with pytest.raises(TemporaryDeliveryError) as raised:
            await pushkin.dispatch(CONTENT, DEVICE)
    assert raised.value.retry_after == retry_after


async def test_expired_provider_token_is_renewed_once(
    tmp_path: Path, apple: Apple, clock: ManualClock
) -> None:
    apple.app.script(DEVICE_PATH, reason(403, "ExpiredProviderToken"))
    async with apns_pushkin(tmp_path, apple, clock) as (pushkin, _):
        assert await pushkin.dispatch(CONTENT, DEVICE) is Outcome.SENT
    first, second = (p.headers["authorization"] for p in apple.pushes())
    assert first != second


async def test_invalid_fresh_provider_token_is_a_credentials_error(
    tmp_path: Path, apple: Apple, clock: ManualClock
) -> None:
    invalid = reason(403, "InvalidProviderToken")
    apple.app.script(DEVICE_PATH, invalid, invalid)
    async with apns_pushkin(tmp_path, apple, clock) as (pushkin, _):
        with pytest.raises(CredentialsError, match=f"InvalidProviderToken.*{KEY_ID}"):
            await pushkin.dispatch(CONTENT, DEVICE)
    assert len(apple.pushes()) == 2


async def test_a_key_that_stays_invalid_renews_the_provider_token_once_per_20_minutes(
    tmp_path: Path, apple: Apple, clock: ManualClock
) -> None:
    """Apple answers TooManyProviderTokenUpdates to more: then every push would fail for
    that, hiding the key's real problem."""
    invalid = reason(403, "InvalidProviderToken")
    apple.app.script(DEVICE_PATH, *[invalid] * 8)
    async with apns_pushkin(tmp_path, apple, clock) as (pushkin, _):
        for _ in range(5):
            with pytest.raises(CredentialsError, match="InvalidProviderToken"):
                await pushkin.dispatch(CONTENT, DEVICE)
            clock.now += 60
        clock.now += 20 * 60
        with pytest.raises(CredentialsError):
            await pushkin.dispatch(CONTENT, DEVICE)
    tokens = [p.headers["authorization"] for p in apple.pushes()]
    assert len(tokens) == 8  # two requests for the first push and the late one, one between
    assert len(set(tokens)) == 3  # the first token, one renewal, one 20 minutes later


async def test_a_topic_the_key_may_not_push_to_is_a_credentials_error(
    tmp_path: Path, apple: Apple, clock: ManualClock
) -> None:
    """Every push would fail alike: loud and kept for retries, not dropped one by one."""
    apple.app.script(DEVICE_PATH, reason(400, "TopicDisallowed"))
    async with apns_pushkin(tmp_path, apple, clock) as (pushkin, _):
        with pytest.raises(CredentialsError, match="may not push to topic"):
            await pushkin.dispatch(CONTENT, DEVICE)


async def test_push_without_topic_is_rejected_without_a_request(
    tmp_path: Path, apple: Apple, clock: ManualClock
) -> None:
    nameless = Device(token_id="tok-9", kind="apn", token="a1b2c3d4")
    async with apns_pushkin(tmp_path, apple, clock) as (pushkin, _):
        assert await pushkin.dispatch(CONTENT, nameless) is Outcome.REJECTED
    assert apple.pushes() == []


async def test_own_client_speaks_http2(
    tmp_path: Path, apple: Apple, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an injected client the pushkin makes its own HTTP/2 one (APNs needs it)."""
    monkeypatch.setenv("SSL_CERT_FILE", apple.ca)
    path, _ = write_apns_key(tmp_path, KEY_ID)
    config = ApnsConfig(key_file=str(path), key_id=KEY_ID, team_id=TEAM_ID, base_url=apple.url)
    pushkin = ApnsPushkin(config, production=True)
    try:
        assert await pushkin.dispatch(CONTENT, DEVICE) is Outcome.SENT
    finally:
        await pushkin.aclose()
    assert [p.http_version for p in apple.pushes()] == ["2"]
    assert apple.pushes()[0].headers["accept-encoding"] == "identity"


async def test_an_answer_that_cannot_be_decoded_is_a_temporary_failure(
    tmp_path: Path, apple: Apple, clock: ManualClock
) -> None:
    """httpx's client decodes as it reads, so the status is lost with the body: the
    push may have gone out, and is retried like a timeout, not left to crash."""
    apple.app.script(DEVICE_PATH, Reply(200, b"<html>OK</html>", {"content-encoding": "gzip"}))
    async with apns_pushkin(tmp_path, apple, clock) as (pushkin, _):
        with pytest.raises(TemporaryDeliveryError, match="could not be decoded"):
            await pushkin.dispatch(CONTENT, DEVICE)


@pytest.mark.parametrize(("production", "host"), [(True, PRODUCTION_URL), (False, SANDBOX_URL)])
async def test_apple_host_follows_push_production(
    tmp_path: Path, production: bool, host: str
) -> None:
    path, _ = write_apns_key(tmp_path)
    config = ApnsConfig(key_file=str(path), key_id=KEY_ID, team_id=TEAM_ID)
    pushkin = ApnsPushkin(config, production=production)
    assert pushkin.base_url == host
    await pushkin.aclose()


async def test_world_readable_key_is_refused(tmp_path: Path) -> None:
    path, _ = write_apns_key(tmp_path)
    path.chmod(0o644)
    config = ApnsConfig(key_file=str(path), key_id=KEY_ID, team_id=TEAM_ID)
    with pytest.raises(ConfigError, match=f"chmod 600 {path}"):
        ApnsPushkin(config, production=True)


async def test_missing_key_settings_are_named(tmp_path: Path) -> None:
    path, _ = write_apns_key(tmp_path)
    with pytest.raises(ConfigError, match=r"\[apns\] key_id, team_id not set"):
        ApnsPushkin(ApnsConfig(key_file=str(path)), production=True)
