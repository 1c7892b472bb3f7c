"""The process's one HTTP client for push providers, and the cap on requests in flight.

One client per process so connections are kept alive and reused: a push is a
small request, and a TLS handshake per push would cost more than the push.
The transport is aiohttp's (through httpx-aiohttp) because on this machine
plain httpx manages ~570 requests/s at 64 in flight against ~4,600 with it
(`python -m bench.delivery`). Requests go straight to the transport, without
`httpx.AsyncClient` in between: its layers (default headers and cookies merged
into every request, auth and redirect flows, hooks, per-request logging) took
~40 % of each push's HTTP time here, and a provider request needs none of them.
Callers still build httpx requests and read httpx responses, and tests and
benchmarks inject another transport without patching.
"""

from __future__ import annotations

import urllib.request
import zlib
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Protocol, Self

import aiohttp
import anyio
import httpx
import structlog
from httpx_aiohttp import AiohttpTransport

from streamer import __version__, metrics
from streamer.config import ConfigError, DeliveryConfig

#: `[delivery] concurrency`'s default: requests in flight when nobody says otherwise.
DEFAULT_CONCURRENCY = DeliveryConfig().concurrency
#: Idle keep-alive connections are closed after this many seconds.
KEEPALIVE_EXPIRY = 60.0
USER_AGENT = f"streamer/{__version__}"
#: Answers are a few hundred bytes: compressing them saves nothing, and an answer
#: that cannot be decoded, or decodes to gigabytes, is one more way to fail. Peers
#: that compress anyway are decoded below, within `ANSWER_LIMIT`.
ACCEPT_ENCODING = "identity"
#: Bytes of a provider's answer read (and decoded) at most: theirs are a few hundred;
#: a peer that answers without end must not fill the memory.
ANSWER_LIMIT = 1 << 20
#: zlib's window bits for each encoding decoded: gzip's header, or zlib's (deflate).
_ZLIB_WBITS = {
    "gzip": 16 + zlib.MAX_WBITS,
    "x-gzip": 16 + zlib.MAX_WBITS,
    "deflate": zlib.MAX_WBITS,
}

log = structlog.get_logger(__name__)


def _decoded(raw: bytes, encoding: str) -> bytes | None:
    """The body as sent before `encoding`; None if it cannot be decoded within
    `ANSWER_LIMIT` (a broken or unknown encoding, or a body that inflates beyond it)."""
    if encoding in ("", "identity"):
        return raw
    wbits = _ZLIB_WBITS.get(encoding)
    if wbits is None:
        return None
    try:
        inflater = zlib.decompressobj(wbits)
        body = inflater.decompress(raw, ANSWER_LIMIT + 1)
    except zlib.error:
        return None
    return None if len(body) > ANSWER_LIMIT else body


def pool_limits(config: DeliveryConfig) -> httpx.Limits:
    """A pool as large as the in-flight cap, so no request waits for a connection."""
    return httpx.Limits(
        max_connections=config.concurrency,
        max_keepalive_connections=config.concurrency,
        keepalive_expiry=KEEPALIVE_EXPIRY,
    )


class HttpClient(Protocol):
    """What the pushkins use of an HTTP client: `ProviderClient` in the daemon; an
    `httpx.AsyncClient` (HTTP/2 for APNs, or one a test builds) fits too."""

    def build_request(
        self,
        method: str,
        url: httpx.URL | str,
        *,
        content: bytes | None = None,
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Request: ...

    async def send(self, request: httpx.Request) -> httpx.Response: ...

    async def post(
        self,
        url: httpx.URL | str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response: ...

    async def aclose(self) -> None: ...


class ProviderClient:
    """httpx requests sent straight through one transport; responses read whole.

    Never follows redirects, keeps no cookies: a provider that redirects a push
    is answered as it answered. `timeout` bounds each step (connect, each read)
    and the whole exchange too: a peer that trickles its answer byte by byte
    would otherwise hold a delivery slot for ever.
    """

    def __init__(self, transport: httpx.AsyncBaseTransport, *, timeout: float) -> None:
        self._transport = transport
        self._timeout = timeout
        self._extensions = {"timeout": httpx.Timeout(timeout).as_dict()}

    def build_request(
        self,
        method: str,
        url: httpx.URL | str,
        *,
        content: bytes | None = None,
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Request:
        return httpx.Request(
            method,
            url,
            content=content,
            data=data,
            headers={
                "user-agent": USER_AGENT,
                "accept-encoding": ACCEPT_ENCODING,
                **(headers or {}),
            },
            extensions=self._extensions,
        )

    async def send(self, request: httpx.Request) -> httpx.Response:
        with anyio.move_on_after(self._timeout) as deadline:
            return await self._exchange(request)
        assert deadline.cancelled_caught
        raise httpx.ReadTimeout(f"no whole answer within {self._timeout} s", request=request)

    async def _exchange(self, request: httpx.Request) -> httpx.Response:
        response = await self._transport.handle_async_request(request)
        try:
            raw = bytearray()
            async for chunk in response.aiter_raw():
                raw += chunk
                if len(raw) > ANSWER_LIMIT:
                    raise httpx.ReadError(f"answer over {ANSWER_LIMIT} bytes", request=request)
        finally:
            await response.aclose()
        headers = response.headers.copy()
        encoding = headers.pop("content-encoding", "identity").strip().lower()
        body = _decoded(bytes(raw), encoding)
        if body is None:  # its status still says what became of the push
            log.warning(
                "provider_answer_undecodable",
                host=request.url.host,
                status=response.status_code,
                content_encoding=encoding,
                action="answer read as empty",
            )
        return httpx.Response(
            response.status_code,
            headers=headers,
            content=body or b"",
            request=request,
            extensions=response.extensions,
        )

    async def post(
        self,
        url: httpx.URL | str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        return await self.send(self.build_request("POST", url, content=content, headers=headers))

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


class EnvironmentProxies(httpx.AsyncBaseTransport):
    """Each request direct, or through the proxy HTTPS_PROXY / HTTP_PROXY (else
    ALL_PROXY) names for its scheme, unless NO_PROXY lists its host (or host:port):
    what Rocket.Chat's own requests and APNs' httpx client do. A transport alone
    ignores these variables, so behind an egress proxy no push would leave.

    The variables are read once, at start; the route is decided once per host.
    """

    def __init__(self, make: Callable[[httpx.Proxy | None], httpx.AsyncBaseTransport]) -> None:
        self._make = make
        self._proxies = _environment_proxies()
        #: (scheme, host, port) → the proxy variable it takes, or None: direct.
        self._routes: dict[tuple[str, str, int | None], str | None] = {}
        self._transports: dict[str | None, httpx.AsyncBaseTransport] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._transport_for(request.url).handle_async_request(request)

    async def aclose(self) -> None:
        for transport in self._transports.values():
            await transport.aclose()

    def _transport_for(self, url: httpx.URL) -> httpx.AsyncBaseTransport:
        key = (url.scheme, url.host, url.port)
        if key not in self._routes:
            self._routes[key] = self._route(url)
        route = self._routes[key]
        if route not in self._transports:
            self._transports[route] = self._make(None if route is None else self._proxies[route])
        return self._transports[route]

    def _route(self, url: httpx.URL) -> str | None:
        variable = url.scheme if url.scheme in self._proxies else "all"
        if variable not in self._proxies:
            return None
        address = url.host if url.port is None else f"{url.host}:{url.port}"
        return None if urllib.request.proxy_bypass(address) else variable


def _environment_proxies() -> dict[str, httpx.Proxy]:
    """The proxy variables, by scheme ("all" for ALL_PROXY), checked now rather than at
    the first push. A value without a scheme is http://, as httpx and curl take it."""
    proxies: dict[str, httpx.Proxy] = {}
    for scheme, value in urllib.request.getproxies().items():
        if scheme not in ("http", "https", "all"):
            continue
        url = value if "://" in value else f"http://{value}"
        # The value is never quoted back: it may hold the proxy's password.
        problem = f"{scheme.upper()}_PROXY is not an http:// or https:// proxy URL"
        if not url.lower().startswith(("http://", "https://")):
            raise ConfigError(f"{problem} (streamer speaks to no other kind); unset it or fix it")
        try:
            proxies[scheme] = httpx.Proxy(url)
        except (httpx.InvalidURL, ValueError):
            raise ConfigError(f"{problem}; write it as http://host:port") from None
    return proxies


def make_http_client(
    config: DeliveryConfig, *, transport: httpx.AsyncBaseTransport | None = None
) -> ProviderClient:
    """The one client for the process; close it with `aclose()` at shutdown."""
    if transport is None:
        limits = pool_limits(config)
        transport = EnvironmentProxies(lambda proxy: AiohttpTransport(limits=limits, proxy=proxy))
    return ProviderClient(transport, timeout=config.timeout)


def never_sent(exc: httpx.TransportError) -> bool:
    """Whether the request surely did not reach the server, so another server may
    take it without risking a second push.

    httpx-aiohttp reports every aiohttp connection error as `ConnectTimeout`, a
    server that hung up after reading the request included; only a failure to
    connect (to the server, or through a proxy that refused the tunnel), or a URL
    no request can be made to, proves nothing was sent.
    """
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ClientError):
        return isinstance(
            cause,
            aiohttp.ClientConnectorError
            | aiohttp.ConnectionTimeoutError
            | aiohttp.InvalidURL
            | aiohttp.ClientHttpProxyError,
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
