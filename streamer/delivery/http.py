"""The process's one HTTP client for push providers, and the cap on requests in flight.

One client per process so connections are kept alive and reused: a push is a
small request, and a TLS handshake per push would cost more than the push.
The transport is aiohttp's (through httpx-aiohttp) because on this machine
plain httpx manages ~570 requests/s at 64 in flight against ~4,600 with it
(`python -m bench.delivery`); callers still see the httpx API, and tests and
benchmarks inject another transport without patching.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import anyio
import httpx
from httpx_aiohttp import AiohttpTransport

from streamer import __version__, metrics
from streamer.config import DeliveryConfig

#: `[delivery] concurrency`'s default: requests in flight when nobody says otherwise.
DEFAULT_CONCURRENCY = DeliveryConfig().concurrency
#: Idle keep-alive connections are closed after this many seconds.
KEEPALIVE_EXPIRY = 60.0
USER_AGENT = f"streamer/{__version__}"


def pool_limits(config: DeliveryConfig) -> httpx.Limits:
    """A pool as large as the in-flight cap, so no request waits for a connection."""
    return httpx.Limits(
        max_connections=config.concurrency,
        max_keepalive_connections=config.concurrency,
        keepalive_expiry=KEEPALIVE_EXPIRY,
    )


def make_http_client(
    config: DeliveryConfig, *, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The one client for the process; close it with `aclose()` at shutdown."""
    limits = pool_limits(config)
    return httpx.AsyncClient(
        transport=transport or AiohttpTransport(limits=limits),
        limits=limits,
        timeout=config.timeout,
        headers={"user-agent": USER_AGENT},
    )


def never_sent(exc: httpx.TransportError) -> bool:
    """Whether the request surely did not reach the server, so another server may
    take it without risking a second push.

    httpx-aiohttp reports every aiohttp connection error as `ConnectTimeout`, a
    server that hung up after reading the request included; only a failure to
    connect, or a URL no request can be made to, proves nothing was sent.
    """
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ClientError):
        return isinstance(
            cause,
            aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError | aiohttp.InvalidURL,
        )
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.UnsupportedProtocol)


def transport_failure(exc: httpx.TransportError) -> str:
    """What went wrong, in words that hold whichever transport raised it."""
    cause = exc.__cause__ if isinstance(exc.__cause__, aiohttp.ClientError) else exc
    if never_sent(exc):
        what = "unreachable"
    elif isinstance(cause, TimeoutError | httpx.TimeoutException):
        what = "timed out"
    else:
        what = "failed after the request was sent"
    return f"{what}: {cause!r}"


class InFlightCap:
    """Bounds provider requests in flight across all users and providers.

    Without it a burst (a message to a 10,000-member room) would open thousands
    of requests at once, and the provider would answer with 429s. Waiting here
    is cheap; the gauge shows whether the cap is the bottleneck.
    """

    def __init__(self, limit: int = DEFAULT_CONCURRENCY) -> None:
        self._limiter = anyio.CapacityLimiter(limit)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._limiter:
            metrics.PUSHES_IN_FLIGHT.inc()
            try:
                yield
            finally:
                metrics.PUSHES_IN_FLIGHT.dec()
