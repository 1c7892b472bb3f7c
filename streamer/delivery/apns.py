"""Direct delivery to iOS through APNs (HTTP/2, token auth), for white-labelled apps.

The provider token is an ES256 JWT signed with the team's .p8 key. Apple
accepts one for an hour and refuses renewals more often than every 20 minutes,
so it is cached and renewed every 50 minutes, or once when Apple calls it
expired or invalid.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import orjson
import structlog
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, EllipticCurvePrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from streamer.config import ApnsConfig, ConfigError
from streamer.delivery.base import Device, PushContent
from streamer.delivery.direct import (
    BearerToken,
    Clock,
    TokenCache,
    load_secret_file,
    send,
    temporary_error,
)
from streamer.delivery.errors import CredentialsError, Outcome, is_temporary
from streamer.delivery.http import ACCEPT_ENCODING, HttpClient

PROVIDER = "apns"
PRODUCTION_URL = "https://api.push.apple.com"
SANDBOX_URL = "https://api.sandbox.push.apple.com"
PROVIDER_TOKEN_LIFETIME = 50 * 60.0
#: Apple refuses provider tokens renewed more often (TooManyProviderTokenUpdates).
PROVIDER_TOKEN_MIN_RENEWAL = 20 * 60.0
TOPIC_DISALLOWED = "TopicDisallowed"
#: How long APNs keeps trying an offline device (Rocket.Chat uses one hour).
EXPIRATION = 3600
DEAD_TOKEN_REASONS = frozenset({"BadDeviceToken", "DeviceTokenNotForTopic", "Unregistered"})
STALE_PROVIDER_TOKEN_REASONS = frozenset({"ExpiredProviderToken", "InvalidProviderToken"})

log = structlog.get_logger(__name__)


def load_signing_key(path: str) -> EllipticCurvePrivateKey:
    """The .p8 key APNs token auth needs: a P-256 EC key in PEM."""
    pem = load_secret_file(path, "APNs key file")
    try:
        key = load_pem_private_key(pem, password=None)
    except ValueError as exc:
        raise ConfigError(f"APNs key file {path} is not a PEM private key: {exc}") from None
    if not isinstance(key, EllipticCurvePrivateKey) or not isinstance(key.curve, SECP256R1):
        raise ConfigError(f"APNs key file {path} is not a P-256 (.p8) key from Apple")
    return key


def apns_payload(content: PushContent) -> dict[str, Any]:
    """The notification as Rocket.Chat's iOS app expects it: payload as `ejson`."""
    aps = {
        "alert": {"title": content.title, "body": content.text},
        "badge": content.badge,
        "sound": "default",
        "category": content.category,
        "mutable-content": 1,
        # Groups a room's pushes on the lock screen, as Rocket.Chat does.
        "thread-id": str(content.not_id),
    }
    return {"aps": aps, "ejson": orjson.dumps(content.payload).decode(), "messageFrom": "push"}


def apns_headers(content: PushContent, topic: str, now: float) -> dict[str, str]:
    return {
        "apns-topic": topic,
        "apns-push-type": "alert",
        "apns-priority": "10",
        "apns-expiration": str(int(now) + EXPIRATION),
        # Per message: a push repeated after a crash replaces the first one on the device.
        "apns-collapse-id": content.mid[:64],
    }


class ApnsPushkin:
    """Sends one push to one iOS device through APNs over HTTP/2."""

    def __init__(
        self,
        config: ApnsConfig,
        *,
        production: bool,
        client: HttpClient | None = None,
        clock: Clock = time.time,
        timeout: float = 10.0,
    ) -> None:
        missing = [k for k in ("key_file", "key_id", "team_id") if not getattr(config, k)]
        if missing:
            raise ConfigError(f"[apns] {', '.join(missing)} not set; direct mode needs them")
        self._key = load_signing_key(str(config.key_file))
        self._key_id = str(config.key_id)
        self._team_id = str(config.team_id)
        self._topic = config.topic
        self.base_url = (config.base_url or (PRODUCTION_URL if production else SANDBOX_URL)).rstrip(
            "/"
        )
        self._owns_client = client is None
        # httpx's own client, not a `ProviderClient`: its own is the transport that speaks
        # HTTP/2, and the client honours HTTPS_PROXY, which an operator may rely on here.
        self._client = client or httpx.AsyncClient(
            http2=True, timeout=timeout, headers={"accept-encoding": ACCEPT_ENCODING}
        )
        self._clock = clock
        self._tokens = TokenCache(self._mint, clock, min_renewal=PROVIDER_TOKEN_MIN_RENEWAL)

    async def prepare(self) -> None:
        await self._tokens.get()

    async def dispatch(self, content: PushContent, device: Device) -> Outcome:
        topic = self._topic or device.app_name
        if not topic:
            log.warning("apns_push_without_topic", fix="set [apns] topic", token_id=device.token_id)
            return Outcome.REJECTED
        body = orjson.dumps(apns_payload(content))
        headers = apns_headers(content, topic, self._clock())
        url = f"{self.base_url}/3/device/{quote(device.token, safe='')}"
        token = await self._tokens.get()
        response = await self._post(url, body, headers, token)
        if _reason(response) in STALE_PROVIDER_TOKEN_REASONS:
            renewed = await self._tokens.renew(token)
            if renewed is not None:
                response = await self._post(url, body, headers, renewed)
        return self._outcome(response, device)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def _post(
        self, url: str, body: bytes, headers: dict[str, str], token: str
    ) -> httpx.Response:
        headers = {**headers, "authorization": f"bearer {token}"}
        request = self._client.build_request("POST", url, content=body, headers=headers)
        return await send(self._client, PROVIDER, request)

    def _outcome(self, response: httpx.Response, device: Device) -> Outcome:
        status, reason = response.status_code, _reason(response)
        if status == 200:
            return Outcome.SENT
        if is_temporary(status):
            raise temporary_error(PROVIDER, response, self._clock())
        if status == 403:
            raise CredentialsError(
                f"{PROVIDER}: {self.base_url} refused the provider token ({reason}); check key_id "
                f"{self._key_id}, team_id {self._team_id} and that the .p8 key is not revoked"
            )
        if reason == TOPIC_DISALLOWED:  # the key may not push to this app: none will go out
            raise CredentialsError(
                f"{PROVIDER}: the key {self._key_id} may not push to topic "
                f"{self._topic or device.app_name!r}; check [apns] topic and the key's team"
            )
        dead = status == 410 or (status == 400 and reason in DEAD_TOKEN_REASONS)
        outcome = Outcome.DEAD_TOKEN if dead else Outcome.REJECTED
        log.warning(
            "apns_push_refused",
            outcome=outcome.value,
            status=status,
            error=reason,
            token_id=device.token_id,
        )
        return outcome

    async def _mint(self) -> BearerToken:
        now = self._clock()
        claims = {"iss": self._team_id, "iat": int(now)}
        value = jwt.encode(claims, self._key, "ES256", headers={"kid": self._key_id})
        return BearerToken(value, now + PROVIDER_TOKEN_LIFETIME)


def _reason(response: httpx.Response) -> str | None:
    """APNs explains a refusal as `{"reason": "..."}` in the body."""
    try:
        reason = response.json().get("reason")
    except (ValueError, AttributeError):
        return None
    return reason if isinstance(reason, str) else None
