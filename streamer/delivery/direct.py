"""What direct FCM and APNs delivery share: key files, expiring tokens, the HTTP exchange.

Self-configured (white-labelled) apps hold their own provider credentials, so
the sidecar reads private keys from disk: they must exist and must not be
world-readable, and both providers mint short-lived bearer tokens from them
that are cached and renewed before they expire.
"""

from __future__ import annotations

import copy
import math
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx

from streamer.config import ConfigError
from streamer.delivery.errors import (
    TOO_MANY_REQUESTS,
    DeliveryError,
    TemporaryDeliveryError,
    retry_after_seconds,
)
from streamer.delivery.http import HttpClient, transport_failure

Clock = Callable[[], float]
#: Seconds to wait after a 429 that gives no Retry-After.
QUOTA_BACKOFF = 60.0
#: Seconds a failed token mint stands as the answer before another is tried.
FAILED_MINT_HOLD = 10.0


def load_secret_file(path: str, what: str) -> bytes:
    """The bytes of a private-key file, refusing a missing or world-readable one.

    A key any local user can read is a leaked key; refusing to start makes the
    operator fix it now rather than after an incident.
    """
    file = Path(path)
    try:
        mode = file.stat().st_mode
        content = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist; check the path in config.toml") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror}") from None
    if mode & stat.S_IROTH:
        raise ConfigError(
            f"{what} {path} is readable by every user on this machine; "
            f"restrict it with `chmod 600 {path}` (owned by the user running streamer)"
        )
    return content


@dataclass(frozen=True, slots=True)
class BearerToken:
    value: str
    #: Epoch seconds after which the token must not be used any more.
    renew_at: float


class TokenCache:
    """One bearer token shared by every concurrent request, minted again when due.

    The lock makes a burst of pushes that all find the token stale mint it once,
    not once per push (FCM rate-limits token requests; APNs refuses provider
    tokens renewed more often than every 20 minutes). A refused token is renewed
    at most once per `min_renewal`: credentials that stay wrong then fail as such
    instead of minting a token for every push. A failed mint is the answer for
    `FAILED_MINT_HOLD` s: every push waiting on the lock would otherwise try again
    in turn, each for a whole timeout when the token server hangs.
    """

    def __init__(
        self, mint: Callable[[], Awaitable[BearerToken]], clock: Clock, *, min_renewal: float
    ) -> None:
        self._mint = mint
        self._clock = clock
        self._min_renewal = min_renewal
        self._token: BearerToken | None = None
        self._renewed_at = -math.inf
        self._lock = anyio.Lock()
        self._failed: tuple[float, DeliveryError] | None = None

    async def get(self) -> str:
        async with self._lock:
            if self._token is None or self._clock() >= self._token.renew_at:
                self._token = await self._minted()
            return self._token.value

    async def _minted(self) -> BearerToken:
        now = self._clock()
        if self._failed is not None and now - self._failed[0] < FAILED_MINT_HOLD:
            raise copy.copy(self._failed[1])
        try:
            token = await self._mint()
        except DeliveryError as exc:
            self._failed = (now, exc)
            raise
        self._failed = None
        return token

    async def renew(self, rejected: str) -> str | None:
        """A token to try instead of the `rejected` one; None when one was renewed too
        recently to renew again (the refusal stands)."""
        async with self._lock:
            if self._token is not None and self._token.value != rejected:
                return self._token.value  # another request already replaced it
            now = self._clock()
            if now - self._renewed_at < self._min_renewal:
                return None
            self._renewed_at = now
            self._token = await self._minted()
            return self._token.value


async def send(client: HttpClient, provider: str, request: httpx.Request) -> httpx.Response:
    """Send one provider request; a network failure or timeout is a temporary error.

    Metrics are the sender's (`PushSender` counts outcomes and times each dispatch).
    """
    try:
        return await client.send(request)
    except httpx.TransportError as exc:
        raise TemporaryDeliveryError(
            f"{provider}: {request.url.host} {transport_failure(exc)}"
        ) from exc
    except httpx.DecodingError as exc:  # httpx's own client (APNs) decodes as it reads
        raise TemporaryDeliveryError(
            f"{provider}: {request.url.host} sent an answer that could not be decoded"
        ) from exc


def temporary_error(provider: str, response: httpx.Response, now: float) -> TemporaryDeliveryError:
    """A 429/5xx as a retryable error carrying the provider's Retry-After; a 429 without
    one waits a minute (Firebase asks for at least that; a second would hammer it)."""
    retry_after = retry_after_seconds(response.headers.get("retry-after"), now)
    if retry_after is None and response.status_code == TOO_MANY_REQUESTS:
        retry_after = QUOTA_BACKOFF
    return TemporaryDeliveryError(
        f"{provider} answered {response.status_code}: {response.text[:200]}",
        retry_after,
    )
