"""FCM HTTP v1 direct delivery, against real local OAuth and FCM stand-ins."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anyio
import httpx
import jwt
import pytest

from streamer.config import ConfigError, DeliveryConfig, FcmConfig
from streamer.delivery.base import Device
from streamer.delivery.direct import FAILED_MINT_HOLD, QUOTA_BACKOFF
from streamer.delivery.errors import CredentialsError, Outcome, TemporaryDeliveryError
from streamer.delivery.fcm import FCM_SCOPE, JWT_BEARER_GRANT, FcmPushkin, fcm_message
from streamer.delivery.http import make_http_client
from streamer.devmongo import free_port
from tests import factories
from tests.credentials import (
    SERVICE_ACCOUNT_EMAIL,
    SERVICE_ACCOUNT_KEY_ID,
    ManualClock,
    write_service_account,
)
from tests.servers import Recorded, Reply, StubApp, serve_http

pytestmark = pytest.mark.anyio

SEND_PATH = "/v1/projects/demo-project/messages:send"
TOKEN_PATH = "/token"
CONTENT = factories.push_content(
    mid="m-42",
    title="general",
    text="alice: lunch?",
    badge=3,
    payload={"host": "https://chat.example.org", "rid": "GENERAL", "messageId": "m-42"},
)
DEVICE = Device(token_id="tok-1", kind="gcm", token="fcm-device-token", app_name="chat.example")


def access_token(value: str, expires_in: int = 3600) -> Reply:
    return Reply(body={"access_token": value, "expires_in": expires_in, "token_type": "Bearer"})


def fcm_error(status: int, code: str, message: str = "", **details: Any) -> Reply:
    error_details = [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", **details}]
    body = {"error": {"code": status, "message": message, "status": code, "details": error_details}}
    return Reply(status=status, body=body)


class Google:
    """The OAuth token endpoint and FCM, each a real local server."""

    def __init__(self, oauth: StubApp, oauth_url: str, fcm: StubApp, fcm_url: str) -> None:
        self.oauth, self.oauth_url, self.fcm, self.fcm_url = oauth, oauth_url, fcm, fcm_url

    def token_requests(self) -> list[Recorded]:
        return self.oauth.received(TOKEN_PATH)

    def sends(self) -> list[Recorded]:
        return self.fcm.received(SEND_PATH)


@pytest.fixture
def google() -> Iterator[Google]:
    oauth = StubApp(default=access_token("token-1"))
    fcm = StubApp(default=Reply(body={"name": "projects/demo-project/messages/1"}))
    with serve_http(oauth) as oauth_url, serve_http(fcm) as fcm_url:
        yield Google(oauth, oauth_url, fcm, fcm_url)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@contextlib.asynccontextmanager
async def fcm_pushkin(
    tmp_path: Path, google: Google, clock: ManualClock, **config: Any
) -> AsyncIterator[tuple[FcmPushkin, Any]]:
    path, public_key = write_service_account(tmp_path, token_uri=google.oauth_url + TOKEN_PATH)
    settings = {"service_account_file": str(path), "base_url": google.fcm_url, **config}
    # The process's shared client (aiohttp transport), as the daemon uses it.
    async with make_http_client(DeliveryConfig()) as client:
        pushkin = FcmPushkin(FcmConfig(**settings), client=client, clock=clock)
        yield pushkin, public_key
        await pushkin.aclose()


@pytest.mark.parametrize(
    ("answer", "error"),
    [(Reply(status=503), TemporaryDeliveryError), (Reply(status=400), CredentialsError)],
    ids=["token-server-down", "key-revoked"],
)
async def test_a_failed_token_request_answers_every_push_waiting_for_it(
    tmp_path: Path, google: Google, clock: ManualClock, answer: Reply, error: type[Exception]
) -> None:
    """Each push waiting on the token lock tried again in turn, each for a whole timeout
    when Google's token server hangs, or one request per push when the key is revoked."""
    google.oauth.default = answer
    failed: list[BaseException] = []

    async def push() -> None:
        try:
            await pushkin.prepare()
        except error as exc:
            failed.append(exc)

    async with fcm_pushkin(tmp_path, google, clock) as (pushkin, _):
        async with anyio.create_task_group() as pushes:
            for _ in range(8):
                pushes.start_soon(push)
        assert len(failed) == 8 and len(google.token_requests()) == 1
        clock.advance(FAILED_MINT_HOLD)
        google.oauth.default = access_token("token-2")
        await pushkin.prepare()  # tried again once the failure is old enough
    assert len(google.token_requests()) == 2


async def test_sends_the_message_with_a_signed_oauth_token(
    tmp_path: Path, google: Google, clock: ManualClock
) -> None:
    async with fcm_pushkin(tmp_path, google, clock) as (pushkin, public_key):
        assert await pushkin.dispatch(CONTENT, DEVICE) is Outcome.SENT

    [token_request] = google.token_requests()
    form = {k: v for k, [v] in parse_qs(token_request.body.decode()).items()}
    assert form["grant_type"] == JWT_BEARER_GRANT
    assertion = form["assertion"]
    assert jwt.get_unverified_header(assertion)["kid"] == SERVICE_ACCOUNT_KEY_ID
    claims = jwt.decode(
        assertion,
        public_key,
        algorithms=["RS256"],
        audience=google.oauth_url + TOKEN_PATH,
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims == {
        "iss": SERVICE_ACCOUNT_EMAIL,
        "scope": FCM_SCOPE,
        "aud": google.oauth_url + TOKEN_PATH,
        "iat": int(clock.now),
        "exp": int(clock.now) + 3600,
    }

    [send] = google.sends()
    assert send.method == "POST"
    assert send.headers["authorization"] == "Bearer token-1"
    assert send.headers["content-type"] == "application/json"
    assert send.json() == {
        "message": {
            "token": "fcm-device-token",
            "notification": {"title": "general", "body": "alice: lunch?"},
            "data": {
                "ejson": '{"host":"https://chat.example.org","rid":"GENERAL","messageId":"m-42"}',
                "title": "general",
                "message": "alice: lunch?",
                "notId": "1666299236",
                "msgcnt": "3",
                "soundname": "default",
                "style": "inbox",
            },
            "android": {"priority": "high", "notification": {"tag": "m-42", "sound": "default"}},
        }
    }


def test_the_servers_icon_goes_with_the_data_when_known() -> None:
    iconic = dataclasses.replace(CONTENT, image="https://chat.example.org/images/logo.png")
    assert fcm_message(iconic, DEVICE)["message"]["data"]["image"] == iconic.image
    assert "image" not in fcm_message(CONTENT, DEVICE)["message"]["data"]


async def test_access_token_is_fetched_once_and_reused(
    tmp_path: Path, google: Google, clock: ManualClock
) -> None:
    async with fcm_pushkin(tmp_path, google, clock) as (pushkin, _):
        for _ in range(3):
            assert await pushkin.dispatch(CONTENT, DEVICE) is Outcome.SENT
    assert len(google.token_requests()) == 1
    assert [r.headers["authorization"] for r in google.sends()] == ["Bearer token-1"] * 3


async def test_concurrent_pushes_share_one_token_request(
    tmp_path: Path, google: Google, clock: ManualClock
) -> None:
    async with (
        fcm_pushkin(tmp_path, google, clock) as (pushkin, _),
        anyio.create_task_group() as tg,
    ):
        for _ in range(5):
            tg.start_soon(pushkin.dispatch, CONTENT, DEVICE)
    assert len(google.token_requests()) == 1
    assert len(google.sends()) == 5


async def test_access_token_is_renewed_shortly_before_it_expires(
    tmp_path: Path, google: Google, clock: ManualClock
) -> None:
    google.oauth.script(TOKEN_PATH, access_token("token-1"), access_token("token-2"))
    async with fcm_pushkin(tmp_path, google, clock) as (pushkin, _):
        await pushkin.dispatch(CONTENT, DEVICE)
        clock.advance(3600 - 301)
        await pushkin.dispatch(CONTENT, DEVICE)
        clock.advance(2)
        await pushkin.dispatch(CONTENT, DEVICE)
    assert len(google.token_requests()) == 2
    assert [r.headers["authorization"] for r in google.sends()] == [
        "Bearer token-1",
        "Bearer token-1",
        "Bearer token-2",
    ]


async def test_project_id_from_config_beats_the_file(
    tmp_path: Path, google: Google, clock: ManualClock
) -> None:
    async with fcm_pushkin(tmp_path, google, clock, project_id="white-label") as (pushkin, _):
        await pushkin.dispatch(CONTENT, DEVICE)
    assert [r.path for r in google.fcm.received()] == ["/v1/projects/white-label/messages:send"]


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        (fcm_error(404, "NOT_FOUND", "Requested entity was not found.", errorCode="UNREGISTERED"),
         Outcome.DEAD_TOKEN),
        (fcm_error(400, "INVALID_ARGUMENT", "The registration token is not a valid FCM "
                   "registration token", errorCode="INVALID_ARGUMENT"), Outcome.DEAD_TOKEN),
        (Reply(status=400, body={"error": {"code": 400, "status": "INVALID_ARGUMENT",
               "message": "Invalid value", "details": [{
                   "@type": "type.googleapis.com/google.rpc.BadRequest",
                   "fieldViolations": [{"field": "message.token", "description": "bad"}]}]}}),
         Outcome.DEAD_TOKEN),
        (fcm_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received. message.data",
                   errorCode="INVALID_ARGUMENT"), Outcome.REJECTED),
        (fcm_error(403, "PERMISSION_DENIED", "SenderId mismatch", errorCode="SENDER_ID_MISMATCH"),
         Outcome.REJECTED),
    ],
    ids=["unregistered", "invalid-token", "token-field-violation", "bad-payload", "other-sender"],
)  # fmt: skip
async def test_permanent_refusals(
    tmp_path: Path, google: Google, clock: ManualClock, reply: Reply, outcome: Outcome
) -> None:
    google.fcm.script(SEND_PATH, reply)
    async with fcm_pushkin(tmp_path, google, clock) as (pushkin, _):
        assert await pushkin.dispatch(CONTENT, DEVICE) is outcome
    assert len(google.sends()) == 1


@pytest.mark.parametrize(
    ("status", "header", "retry_after"),
    [(429, "30", 30.0), (429, None, QUOTA_BACKOFF), (503, None, None)],
)
async def test_throttling_and_server_errors_are_temporary(
    tmp_path: Path,
    google: Google,
    clock: ManualClock,
    status: int,
    header: str | None,
    retry_after: float | None,
) -> None:
    headers = {"retry-after": header} if header else {}
    google.fcm.script(SEND_PATH, Reply(status=status, headers=headers))
    async with fcm_pushkin(tmp_path, google, clock) as (pushkin, _):
        with pytest.raises(TemporaryDeliveryError) as raised:
            await pushkin.dispatch(CONTENT, DEVICE)
    assert raised.value.retry_after == retry_after


@pytest.mark.parametrize(
    "reply",
    [
        fcm_error(404, "NOT_FOUND", "Requested entity was not found."),  # a wrong project id
        Reply(status=404, body=b"<html><title>404 Not Found</title></html>"),  # an incident
    ],
    ids=["not-found", "html"],
)
async def test_a_404_that_is_not_about_the_device_keeps_the_token(
    tmp_path: Path, google: Google, clock: ManualClock, reply: Reply
) -> None:
    google.fcm.script(SEND_PATH, reply)
    async with fcm_pushkin(tmp_path, google, clock) as (pushkin, _):
        with pytest.raises(TemporaryDeliveryError, match=r"without UNREGISTERED.*project_id"):
            await pushkin.dispatch(CONTENT, DEVICE)


async def test_refused_access_token_is_renewed_once(
    tmp_path: Path, google: Google, clock: ManualClock
) -> None:
    google.oauth.script(TOKEN_PATH, access_token("token-1"), access_token("token-2"))
    google.fcm.script(SEND_PATH, fcm_error(401, "UNAUTHENTICATED", "expired"))
    async with fcm_pushkin(tmp_path, google, clock) as (pushkin, _):
        assert await pushkin.dispatch(CONTENT, DEVICE) is Outcome.SENT
    assert [r.headers["authorization"] for r in google.sends()] == [
        "Bearer token-1",
        "Bearer token-2",
    ]


async def test_refused_fresh_access_token_is_a_credentials_error(
    tmp_path: Path, google: Google, clock: ManualClock
) -> None:
    refused = fcm_error(403, "PERMISSION_DENIED", "no permission")
    google.fcm.script(SEND_PATH, refused, refused)
    async with fcm_pushkin(tmp_path, google, clock) as (pushkin, _):
        with pytest.raises(CredentialsError, match="project_id"):
            await pushkin.dispatch(CONTENT, DEVICE)
    assert len(google.sends()) == 2
    assert len(google.token_requests()) == 2


async def test_token_endpoint_refusing_the_key_is_a_credentials_error(
    tmp_path: Path, google: Google, clock: ManualClock
) -> None:
    google.oauth.script(TOKEN_PATH, Reply(status=400, body={"error": "invalid_grant"}))
    async with fcm_pushkin(tmp_path, google, clock) as (pushkin, _):
        with pytest.raises(CredentialsError, match="invalid_grant"):
            await pushkin.dispatch(CONTENT, DEVICE)
    assert google.sends() == []


async def test_unreachable_fcm_is_temporary(
    tmp_path: Path, google: Google, clock: ManualClock
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    async with fcm_pushkin(tmp_path, google, clock, base_url=nowhere) as (pushkin, _):
        with pytest.raises(TemporaryDeliveryError, match="unreachable"):
            await pushkin.dispatch(CONTENT, DEVICE)


async def test_world_readable_service_account_is_refused(tmp_path: Path) -> None:
    path, _ = write_service_account(tmp_path, token_uri="https://oauth2.example/token")
    path.chmod(0o644)
    async with httpx.AsyncClient() as client:
        with pytest.raises(ConfigError, match=f"chmod 600 {path}"):
            FcmPushkin(FcmConfig(service_account_file=str(path)), client=client)


async def test_missing_service_account_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    async with httpx.AsyncClient() as client:
        with pytest.raises(ConfigError, match=f"{path} does not exist"):
            FcmPushkin(FcmConfig(service_account_file=str(path)), client=client)
