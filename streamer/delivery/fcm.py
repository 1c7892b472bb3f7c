"""Direct delivery to Android through FCM HTTP v1, for self-configured (white-labelled) apps.

A service-account key signs a short RS256 assertion that Google's OAuth
endpoint trades for an access token; the token is cached until shortly before
it expires and renewed once if FCM says it is no longer good.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import jwt
import orjson
import structlog
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from streamer.config import ConfigError, FcmConfig
from streamer.delivery.base import Device, PushContent
from streamer.delivery.direct import (
    BearerToken,
    Clock,
    TokenCache,
    load_secret_file,
    send,
    temporary_error,
)
from streamer.delivery.errors import (
    CredentialsError,
    Outcome,
    TemporaryDeliveryError,
    is_temporary,
)
from streamer.delivery.http import HttpClient

PROVIDER = "fcm"
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"
#: Google accepts assertions valid for at most an hour.
ASSERTION_LIFETIME = 3600
#: Renew the access token this long before Google says it expires, so a push
#: in flight never carries a token that expires on the way.
TOKEN_RENEW_MARGIN = 300.0
#: A refused access token is traded for a new one at most this often (seconds).
ACCESS_TOKEN_MIN_RENEWAL = 60.0
NOT_FOUND = 404

log = structlog.get_logger(__name__)


class ServiceAccount:
    """The parts of a Google service-account JSON key that the OAuth flow needs."""

    def __init__(self, path: str, document: Any) -> None:
        if not isinstance(document, dict):
            raise ConfigError(f"FCM service-account file {path} is not a JSON object")
        email, pem = document.get("client_email"), document.get("private_key")
        if not isinstance(email, str) or not isinstance(pem, str):
            raise ConfigError(
                f"FCM service-account file {path} lacks client_email or private_key; "
                "download a new key in the Firebase console (Service accounts)"
            )
        try:
            key = load_pem_private_key(pem.encode(), password=None)
        except ValueError as exc:
            raise ConfigError(f"FCM service-account file {path}: bad private_key: {exc}") from None
        if not isinstance(key, RSAPrivateKey):
            raise ConfigError(f"FCM service-account file {path}: private_key is not an RSA key")
        self.client_email = email
        self.private_key = key
        self.key_id = _optional(document, "private_key_id")
        self.project_id = _optional(document, "project_id")
        self.token_uri = _optional(document, "token_uri") or DEFAULT_TOKEN_URI


def _optional(document: dict[str, Any], key: str) -> str | None:
    value = document.get(key)
    return value if isinstance(value, str) and value else None


def load_service_account(path: str) -> ServiceAccount:
    raw = load_secret_file(path, "FCM service-account file")
    try:
        return ServiceAccount(path, orjson.loads(raw))
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"FCM service-account file {path} is not valid JSON: {exc}") from None


def fcm_message(content: PushContent, device: Device) -> dict[str, Any]:
    """The `messages:send` body: a visible notification plus Rocket.Chat's data fields.

    FCM data values must be strings. The data keys are the ones Rocket.Chat's
    own FCM sender and its mobile app use (`ejson` carries the payload).
    """
    not_id = str(content.not_id)
    data = {
        "ejson": orjson.dumps(content.payload).decode(),
        "title": content.title,
        "message": content.text,
        "notId": not_id,
        "msgcnt": str(content.badge),
        "soundname": "default",
        "style": "inbox",
    }
    if content.image:
        data["image"] = content.image  # the server's icon, as Rocket.Chat sends it
    return {
        "message": {
            "token": device.token,
            "notification": {"title": content.title, "body": content.text},
            "data": data,
            "android": {
                "priority": "high",
                # Per message: a push repeated after a crash replaces the first in the tray;
                # the app groups a room's pushes by `notId`.
                "notification": {"tag": content.mid, "sound": "default"},
            },
        }
    }


class FcmPushkin:
    """Sends one push to one Android device through FCM HTTP v1."""

    def __init__(self, config: FcmConfig, *, client: HttpClient, clock: Clock = time.time) -> None:
        if not config.service_account_file:
            raise ConfigError("[fcm] service_account_file is not set; direct mode needs it")
        self._account = load_service_account(config.service_account_file)
        project_id = config.project_id or self._account.project_id
        if not project_id:
            raise ConfigError(
                "[fcm] project_id is not set and the service-account file names no project_id"
            )
        self._client = client
        self._clock = clock
        self._token_url = config.token_url or self._account.token_uri
        self._send_url = f"{config.base_url.rstrip('/')}/v1/projects/{project_id}/messages:send"
        self._tokens = TokenCache(self._fetch_token, clock, min_renewal=ACCESS_TOKEN_MIN_RENEWAL)

    async def prepare(self) -> None:
        await self._tokens.get()

    async def dispatch(self, content: PushContent, device: Device) -> Outcome:
        body = orjson.dumps(fcm_message(content, device))
        token = await self._tokens.get()
        response = await self._post(body, token)
        if _refused_credentials(response):
            renewed = await self._tokens.renew(token)
            if renewed is not None:
                response = await self._post(body, renewed)
            if _refused_credentials(response):
                why = f"{response.status_code}: {_error(response).get('message', '')}"
                raise CredentialsError(
                    f"{PROVIDER}: {self._send_url} refused a fresh access token ({why}); check "
                    "project_id and that the service account may send with Firebase Cloud Messaging"
                )
        return self._outcome(response, device)

    async def aclose(self) -> None:
        """The client is the caller's (shared across providers); nothing else to release."""

    async def _post(self, body: bytes, token: str) -> httpx.Response:
        headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
        request = self._client.build_request("POST", self._send_url, content=body, headers=headers)
        return await send(self._client, PROVIDER, request)

    def _outcome(self, response: httpx.Response, device: Device) -> Outcome:
        status = response.status_code
        if status == 200:
            return Outcome.SENT
        if is_temporary(status):
            raise temporary_error(PROVIDER, response, self._clock())
        error = _error(response)
        if status == NOT_FOUND and "UNREGISTERED" not in _error_codes(error):
            # Not the device: a wrong project id, or FCM failing (it has answered HTML
            # 404s in incidents). Deleting the token would lose a working phone.
            raise TemporaryDeliveryError(
                f"{PROVIDER}: {self._send_url} answered 404 without UNREGISTERED "
                f"({error.get('message') or response.text[:200]}); check [fcm] project_id"
            )
        outcome = Outcome.DEAD_TOKEN if _token_is_dead(status, error) else Outcome.REJECTED
        log.warning(
            "fcm_push_refused",
            outcome=outcome.value,
            status=status,
            error=error.get("message"),
            token_id=device.token_id,
        )
        return outcome

    async def _fetch_token(self) -> BearerToken:
        """Trade a freshly signed assertion for an OAuth access token."""
        now = self._clock()
        claims = {
            "iss": self._account.client_email,
            "scope": FCM_SCOPE,
            "aud": self._token_url,
            "iat": int(now),
            "exp": int(now) + ASSERTION_LIFETIME,
        }
        headers = {"kid": self._account.key_id} if self._account.key_id else None
        assertion = jwt.encode(claims, self._account.private_key, "RS256", headers=headers)
        form = {"grant_type": JWT_BEARER_GRANT, "assertion": assertion}
        request = self._client.build_request("POST", self._token_url, data=form)
        response = await send(self._client, PROVIDER, request)
        if is_temporary(response.status_code):
            raise temporary_error(PROVIDER, response, now)
        if response.status_code != 200:
            raise CredentialsError(
                f"{PROVIDER}: {self._token_url} refused the service account "
                f"{self._account.client_email} ({response.status_code}: {response.text[:200]}); "
                "the key may be revoked: download a new one"
            )
        return _bearer_token(response, now)


def _bearer_token(response: httpx.Response, now: float) -> BearerToken:
    try:
        answer = response.json()
        value, lifetime = answer["access_token"], float(answer.get("expires_in", 3600))
    except (ValueError, KeyError, TypeError) as exc:
        raise TemporaryDeliveryError(f"fcm: unreadable OAuth token response: {exc!r}") from exc
    return BearerToken(str(value), now + max(lifetime - TOKEN_RENEW_MARGIN, lifetime / 2))


def _error(response: httpx.Response) -> dict[str, Any]:
    """FCM's `{"error": {code, message, status, details}}`, or {} when absent."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return {}
    return error if isinstance(error, dict) else {}


def _error_codes(error: dict[str, Any]) -> set[str]:
    details = error.get("details")
    codes = {str(error.get("status", ""))}
    if isinstance(details, list):
        codes |= {str(d.get("errorCode")) for d in details if isinstance(d, dict)}
    return codes


def _refused_credentials(response: httpx.Response) -> bool:
    """401/403 about our access token; SENDER_ID_MISMATCH is about the device token."""
    if response.status_code not in (401, 403):
        return False
    return "SENDER_ID_MISMATCH" not in _error_codes(_error(response))


def _token_is_dead(status: int, error: dict[str, Any]) -> bool:
    """UNREGISTERED, or INVALID_ARGUMENT that FCM pins on `message.token`."""
    codes = _error_codes(error)
    if "UNREGISTERED" in codes:
        return True
    if "INVALID_ARGUMENT" not in codes:
        return False
    violations = [
        v.get("field")
        for d in error.get("details") or []
        if isinstance(d, dict)
        for v in d.get("fieldViolations") or []
        if isinstance(v, dict)
    ]
    return "message.token" in violations or "registration token" in str(error.get("message"))
