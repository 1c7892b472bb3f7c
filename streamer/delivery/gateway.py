"""The Rocket.Chat Push Gateway: the provider the official apps are registered with.

A registered workspace posts each push to `{gateway}/push/{apn|gcm}/send` with
its cloud access token. The gateway answers with a status only; the body is
never trusted (it is logged, shortened, and nothing else).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import orjson
import structlog
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from streamer.delivery.base import Device, PushContent
from streamer.delivery.errors import (
    CredentialsError,
    Outcome,
    TemporaryDeliveryError,
    is_temporary,
    retry_after_seconds,
)
from streamer.delivery.http import HttpClient, never_sent, transport_failure
from streamer.delivery.payload import gateway_body
from streamer.model import SETTINGS, WORKSPACE_CREDENTIALS, Settings, to_epoch

log = structlog.get_logger("streamer.delivery.gateway")
Doc = dict[str, Any]

UNREGISTERED = "workspace not registered or credentials invalid — see `streamer doctor`"
#: The settings older servers keep the workspace token in.
TOKEN_SETTINGS = ("Cloud_Workspace_Access_Token", "Cloud_Workspace_Access_Token_Expires_At")
#: How long a missing or expired token is taken as the answer before the
#: database is asked again: Rocket.Chat renews it, and asking on every push
#: would load the database.
RECHECK = 30.0
BODY_LOG_LIMIT = 200


def no_gateway_answers(status: int) -> bool:
    """A redirect, 404 or 405: the URL is wrong (a web site, a typo), not the push. The
    push is kept for the next gateway, or a retry once the setting is fixed, rather
    than dropped as refused."""
    return 300 <= status < 400 or status in (404, 405)


class WorkspaceToken:
    """The workspace's cloud access token, as Rocket.Chat last stored it.

    Rocket.Chat renews the token itself and writes it to
    `rocketchat_workspace_credentials` (older servers: the
    `Cloud_Workspace_Access_Token` setting); this reads it, caches it until it
    expires, and reads again after the gateway refused it (`invalidate`).
    """

    def __init__(self, db: AsyncDatabase[Doc], clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock
        self._token: str | None = None
        self._valid_until = 0.0
        self._loading = anyio.Lock()

    async def get(self) -> str:
        """The bearer token; raises `CredentialsError` when the workspace has none."""
        async with self._loading:  # a burst of pushes reads the database once
            if self._clock() >= self._valid_until:
                await self._load_or_keep()
        if self._token is None:
            raise CredentialsError(f"no workspace access token stored: {UNREGISTERED}")
        return self._token

    async def problem(self) -> str | None:
        """Why no push could be sent now, for /readyz before any push has failed: none
        stored. None when one is, or when MongoDB cannot say (its own check reports it)."""
        try:
            await self.get()
        except CredentialsError as exc:
            return f"gateway: {exc}"
        except PyMongoError:
            return None
        return None

    def invalidate(self) -> None:
        """The gateway refused the token: read it again before the next push."""
        self._valid_until = 0.0

    async def _load_or_keep(self) -> None:
        """MongoDB away keeps the token held for another RECHECK (Rocket.Chat renews it
        well before it expires); every push waiting on the lock would otherwise ask
        again, each for pymongo's whole server-selection wait. With none held, the
        error is the push's: it was not sent."""
        try:
            await self._load()
        except PyMongoError as exc:
            if self._token is None:
                raise
            log.warning(
                "workspace_token_reload_failed",
                error=type(exc).__name__,
                action=f"the token held is used for {RECHECK:.0f} s more",
            )
            self._valid_until = self._clock() + RECHECK

    async def _load(self) -> None:
        stored = await stored_workspace_token(self._db)
        token = None if stored is None else stored.access_token
        expires_at = None if stored is None else stored.expires_at
        now = self._clock()
        if token is None or (expires_at is not None and expires_at <= now):
            if token is not None:
                log.warning("workspace_token_expired", expired_at=expires_at, hint=UNREGISTERED)
            expires_at = now + RECHECK
        self._token = token
        self._valid_until = float("inf") if expires_at is None else expires_at


@dataclass(frozen=True, slots=True)
class StoredToken:
    """The workspace token as Rocket.Chat stored it, and where (for `streamer doctor`)."""

    access_token: str = field(repr=False)
    expires_at: float | None
    #: Where it was found, for the report (never the token itself).
    source: str


async def stored_workspace_token(db: AsyncDatabase[Doc]) -> StoredToken | None:
    """The token the gateway gets: in `rocketchat_workspace_credentials` the default (empty)
    scope first, as Rocket.Chat's push uses it, then the one expiring last; else the
    settings of older servers. One choice shared by the pushkin and `streamer doctor`."""
    best: tuple[tuple[bool, float], StoredToken] | None = None
    async for doc in db[WORKSPACE_CREDENTIALS].find({"accessToken": {"$type": "string"}}):
        if not doc["accessToken"]:
            continue
        token = StoredToken(
            doc["accessToken"], to_epoch(doc.get("expirationDate")), WORKSPACE_CREDENTIALS
        )
        rank = (doc.get("scope") in ("", None), token.expires_at or 0.0)
        if best is None or rank > best[0]:
            best = (rank, token)
    if best is not None:
        return best[1]
    cursor = db[SETTINGS].find({"_id": {"$in": list(TOKEN_SETTINGS)}})
    settings = Settings.from_values({doc["_id"]: doc.get("value") async for doc in cursor})
    if not settings.workspace_access_token:
        return None
    return StoredToken(
        settings.workspace_access_token,
        settings.workspace_access_token_expires_at,
        f"setting {TOKEN_SETTINGS[0]}",
    )


class GatewayPushkin:
    """Pushes through the gateway, failing over along `gateway_urls()` in order.

    `gateway_urls` is called per push so a change to the `Push_gateway`
    setting applies at once.
    """

    def __init__(
        self,
        client: HttpClient,
        gateway_urls: Callable[[], Sequence[str]],
        token: WorkspaceToken,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._gateway_urls = gateway_urls
        self._token = token
        self._clock = clock

    async def prepare(self) -> None:
        await self._token.get()

    async def dispatch(self, content: PushContent, device: Device) -> Outcome:
        body = orjson.dumps(gateway_body(content, device))
        response = await self._post(device.kind, body)
        if response.status_code in (401, 403):
            log.warning("gateway_refused_token", status=response.status_code, action="reload")
            self._token.invalidate()
            response = await self._post(device.kind, body)
            if response.status_code in (401, 403):
                raise CredentialsError(
                    f"{response.request.url} answered {response.status_code}: {UNREGISTERED}"
                )
        return self._outcome(response)

    async def aclose(self) -> None:
        """The client is the process's, shared with other providers; its owner closes it."""

    async def _post(self, kind: str, body: bytes) -> httpx.Response:
        """POST to the first gateway that can be reached; temporary error if none can."""
        headers = {
            "authorization": f"Bearer {await self._token.get()}",
            "content-type": "application/json",
        }
        unreachable: list[str] = []
        for base in self._gateway_urls():
            url = f"{base.rstrip('/')}/push/{kind}/send"
            try:
                response = await self._client.post(url, content=body, headers=headers)
            except httpx.TransportError as exc:
                if not never_sent(exc):
                    # The gateway may have taken it: the next one would push it twice.
                    raise TemporaryDeliveryError(f"{url} {transport_failure(exc)}") from exc
                log.warning("gateway_unreachable", url=url, error=transport_failure(exc))
                unreachable.append(url)
                continue
            if not no_gateway_answers(response.status_code):
                return response
            log.warning(
                "gateway_wrong_address",
                url=url,
                status=response.status_code,
                fix="check Push_gateway (or [delivery] gateway_urls); run streamer doctor",
            )
            unreachable.append(url)
        raise TemporaryDeliveryError(f"no push gateway reachable (tried {unreachable or 'none'})")

    def _outcome(self, response: httpx.Response) -> Outcome:
        status = response.status_code
        if 200 <= status < 300:
            return Outcome.SENT
        if status == 406:
            return Outcome.DEAD_TOKEN
        if is_temporary(status):
            retry_after = retry_after_seconds(response.headers.get("retry-after"), self._clock())
            raise TemporaryDeliveryError(
                f"{response.request.url} answered {status}: {_excerpt(response)}", retry_after
            )
        log.warning(
            "gateway_rejected_push",
            url=str(response.request.url),
            status=status,
            answer=_excerpt(response),
        )
        return Outcome.REJECTED


def _excerpt(response: httpx.Response) -> str:
    """The start of whatever the gateway answered, safe to log whatever it is."""
    return response.content[:BODY_LOG_LIMIT].decode("utf-8", "replace")
