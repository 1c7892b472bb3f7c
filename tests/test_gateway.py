"""The Push Gateway client against a real local HTTP server and the real mongod."""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import socket
import time
from collections.abc import AsyncIterator, Callable

import anyio
import httpx
import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from structlog.testing import capture_logs

from streamer.config import ConfigError, DeliveryConfig
from streamer.delivery.base import Device
from streamer.delivery.errors import CredentialsError, Outcome, TemporaryDeliveryError
from streamer.delivery.gateway import RECHECK, GatewayPushkin, WorkspaceToken
from streamer.delivery.http import (
    ANSWER_LIMIT,
    USER_AGENT,
    ProviderClient,
    make_http_client,
    never_sent,
)
from streamer.delivery.payload import gateway_body
from streamer.devmongo import free_port
from streamer.model import SETTINGS, WORKSPACE_CREDENTIALS
from tests import factories
from tests.failpoints import BAD_VALUE, fail_commands
from tests.servers import Reply, StubApp, serve_connections, serve_forward_proxy, serve_hang_up

Doc = dict[str, object]
NOW = 1_700_000_000.0
IPHONE = Device(token_id="t-ios", kind="apn", token="apn-token-1", app_name="chat.rocket.ios")
ANDROID = Device(
    token_id="t-android", kind="gcm", token="gcm-token-1", app_name="chat.rocket.android"
)
CONTENT = factories.push_content(
    created_at=NOW,
    unique_id="abc123",
    image="https://chat.example.org/assets/favicon_192.png",
)


class Clock:
    """A clock the test moves by hand: no real waiting."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def closed_url() -> str:
    """A local port nobody listens on: connecting is refused at once."""
    return f"http://127.0.0.1:{free_port()}"


async def store_workspace_token(
    db: AsyncDatabase[Doc], token: str, expires_in: float = 3600
) -> None:
    expires = dt.datetime.fromtimestamp(NOW + expires_in, dt.UTC)
    await db[WORKSPACE_CREDENTIALS].replace_one(
        {"_id": "cred"},
        {"_id": "cred", "scope": "", "accessToken": token, "expirationDate": expires},
        upsert=True,
    )


@pytest.fixture
async def client() -> AsyncIterator[ProviderClient]:
    async with make_http_client(DeliveryConfig(concurrency=8, timeout=0.5)) as http:
        yield http


@pytest.fixture
async def pushkin(
    db: AsyncDatabase[Doc], client: ProviderClient, gateway_url: str
) -> GatewayPushkin:
    await store_workspace_token(db, "workspace-token-1")
    clock = Clock()
    return GatewayPushkin(client, lambda: [gateway_url], WorkspaceToken(db, clock), clock=clock)


@pytest.mark.anyio
@pytest.mark.parametrize("device", [IPHONE, ANDROID], ids=["apn", "gcm"])
async def test_push_posts_the_exact_body_with_the_workspace_token(
    pushkin: GatewayPushkin, stub: StubApp, device: Device
) -> None:
    assert await pushkin.dispatch(CONTENT, device) is Outcome.SENT
    [request] = stub.received()
    assert (request.method, request.path) == ("POST", f"/push/{device.kind}/send")
    assert request.headers["authorization"] == "Bearer workspace-token-1"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == USER_AGENT
    assert request.json() == gateway_body(CONTENT, device)


@pytest.mark.anyio
async def test_406_means_the_device_token_is_dead(pushkin: GatewayPushkin, stub: StubApp) -> None:
    stub.script("/push/gcm/send", Reply(406, b"Not Acceptable"))
    assert await pushkin.dispatch(CONTENT, ANDROID) is Outcome.DEAD_TOKEN


@pytest.mark.anyio
async def test_422_drops_the_push(pushkin: GatewayPushkin, stub: StubApp) -> None:
    stub.script("/push/gcm/send", Reply(422, {"error": "bad payload"}))
    assert await pushkin.dispatch(CONTENT, ANDROID) is Outcome.REJECTED


@pytest.mark.anyio
async def test_401_reloads_the_workspace_token_and_retries_once(
    pushkin: GatewayPushkin, stub: StubApp, db: AsyncDatabase[Doc]
) -> None:
    await pushkin.dispatch(CONTENT, ANDROID)  # caches workspace-token-1
    await store_workspace_token(db, "workspace-token-2")
    stub.script("/push/gcm/send", Reply(401))
    assert await pushkin.dispatch(CONTENT, ANDROID) is Outcome.SENT
    tokens = [r.headers["authorization"] for r in stub.received()]
    assert tokens == ["Bearer workspace-token-1"] * 2 + ["Bearer workspace-token-2"]


@pytest.mark.anyio
@pytest.mark.parametrize("status", [401, 403])
async def test_refused_twice_is_a_loud_credentials_error(
    pushkin: GatewayPushkin, stub: StubApp, status: int
) -> None:
    stub.script("/push/apn/send", Reply(status), Reply(status))
    with pytest.raises(CredentialsError, match=r"workspace not registered .* `streamer doctor`"):
        await pushkin.dispatch(CONTENT, IPHONE)
    assert len(stub.received()) == 2


@pytest.mark.anyio
async def test_429_is_temporary_and_carries_retry_after(
    pushkin: GatewayPushkin, stub: StubApp
) -> None:
    stub.script("/push/gcm/send", Reply(429, headers={"retry-after": "120"}))
    with pytest.raises(TemporaryDeliveryError) as caught:
        await pushkin.dispatch(CONTENT, ANDROID)
    assert caught.value.retry_after == 120.0


@pytest.mark.anyio
# 408 (a load balancer timed the request out) and 425 (too early) ask for a retry too.
@pytest.mark.parametrize("status", [500, 502, 503, 408, 425])
async def test_server_errors_are_temporary(
    pushkin: GatewayPushkin, stub: StubApp, status: int
) -> None:
    stub.script("/push/gcm/send", Reply(status))
    with pytest.raises(TemporaryDeliveryError) as caught:
        await pushkin.dispatch(CONTENT, ANDROID)
    assert caught.value.retry_after is None


@pytest.mark.anyio
async def test_a_hanging_gateway_times_out_as_temporary(
    pushkin: GatewayPushkin, stub: StubApp
) -> None:
    stub.script("/push/gcm/send", Reply(delay=2.0))
    with pytest.raises(TemporaryDeliveryError, match="timed out"):
        await pushkin.dispatch(CONTENT, ANDROID)


@pytest.mark.anyio
async def test_unreachable_gateway_fails_over_to_the_next_in_order(
    db: AsyncDatabase[Doc], client: ProviderClient, gateway_url: str, stub: StubApp
) -> None:
    await store_workspace_token(db, "workspace-token-1")
    urls = [closed_url(), gateway_url]
    pushkin = GatewayPushkin(client, lambda: urls, WorkspaceToken(db))
    assert await pushkin.dispatch(CONTENT, ANDROID) is Outcome.SENT
    assert len(stub.received("/push/gcm/send")) == 1


@pytest.mark.anyio
async def test_a_gateway_that_hung_up_after_the_request_is_not_failed_over(
    db: AsyncDatabase[Doc], client: ProviderClient, gateway_url: str, stub: StubApp
) -> None:
    """It may have taken the push: the next gateway would send it a second time."""
    await store_workspace_token(db, "workspace-token-1")
    with serve_hang_up() as (dead_url, heads):
        pushkin = GatewayPushkin(client, lambda: [dead_url, gateway_url], WorkspaceToken(db))
        with pytest.raises(TemporaryDeliveryError, match="failed after the request was sent"):
            await pushkin.dispatch(CONTENT, ANDROID)
    assert [head.split(b" ")[:2] for head in heads] == [[b"POST", b"/push/gcm/send"]]
    assert stub.received("/push/gcm/send") == []


@pytest.mark.anyio
async def test_no_reachable_gateway_is_temporary(
    db: AsyncDatabase[Doc], client: ProviderClient
) -> None:
    await store_workspace_token(db, "workspace-token-1")
    urls = [closed_url(), "gateway-without-scheme", closed_url()]
    pushkin = GatewayPushkin(client, lambda: urls, WorkspaceToken(db))
    with pytest.raises(TemporaryDeliveryError, match="no push gateway reachable"):
        await pushkin.dispatch(CONTENT, ANDROID)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        (Reply(200, b"<html><body>OK</body></html>"), Outcome.SENT),
        (Reply(200, b"\xff\xfe not json"), Outcome.SENT),
        (Reply(422, b"{truncated"), Outcome.REJECTED),
        (Reply(400, b"<html>Bad Request</html>"), Outcome.REJECTED),
    ],
)
async def test_garbage_answers_never_crash(
    pushkin: GatewayPushkin, stub: StubApp, reply: Reply, outcome: Outcome
) -> None:
    stub.script("/push/gcm/send", reply)
    assert await pushkin.dispatch(CONTENT, ANDROID) is outcome


@pytest.mark.anyio
@pytest.mark.parametrize(
    "wrong",
    [Reply(404, b"<html>Not Found</html>"), Reply(301, headers={"location": "/"}), Reply(405)],
)
async def test_an_address_where_no_gateway_answers_is_passed_over_not_a_refusal(
    db: AsyncDatabase[Doc], client: ProviderClient, gateway_url: str, stub: StubApp, wrong: Reply
) -> None:
    """A typo in Push_gateway must not drop every push as refused: the next gateway
    takes it, and with none left it is kept for a retry once the setting is fixed."""
    await store_workspace_token(db, "workspace-token-1")
    stub.script("/typo/push/gcm/send", wrong, wrong)
    urls = [f"{gateway_url}/typo", gateway_url]
    pushkin = GatewayPushkin(client, lambda: urls, WorkspaceToken(db))
    assert await pushkin.dispatch(CONTENT, ANDROID) is Outcome.SENT
    assert len(stub.received("/push/gcm/send")) == 1
    alone = GatewayPushkin(client, lambda: urls[:1], WorkspaceToken(db))
    with pytest.raises(TemporaryDeliveryError, match="no push gateway reachable"):
        await alone.dispatch(CONTENT, ANDROID)


@pytest.mark.anyio
async def test_garbage_server_error_is_still_temporary(
    pushkin: GatewayPushkin, stub: StubApp
) -> None:
    stub.script("/push/gcm/send", Reply(500, b"\x00\xff<html>", headers={"retry-after": "soon"}))
    with pytest.raises(TemporaryDeliveryError) as caught:
        await pushkin.dispatch(CONTENT, ANDROID)
    assert caught.value.retry_after is None


@pytest.mark.anyio
async def test_older_servers_keep_the_token_in_settings(db: AsyncDatabase[Doc]) -> None:
    await db[SETTINGS].insert_many(
        [
            factories.setting("Cloud_Workspace_Access_Token", "from-settings"),
            factories.setting(
                "Cloud_Workspace_Access_Token_Expires_At",
                dt.datetime.fromtimestamp(NOW + 600, dt.UTC),
            ),
        ]
    )
    assert await WorkspaceToken(db, Clock()).get() == "from-settings"


@pytest.mark.anyio
async def test_no_token_at_all_is_a_credentials_error(db: AsyncDatabase[Doc]) -> None:
    with pytest.raises(CredentialsError, match="streamer doctor"):
        await WorkspaceToken(db, Clock()).get()


@pytest.mark.anyio
async def test_a_missing_token_is_looked_for_again_after_a_while(db: AsyncDatabase[Doc]) -> None:
    clock = Clock()
    token = WorkspaceToken(db, clock)
    with pytest.raises(CredentialsError):
        await token.get()
    await store_workspace_token(db, "registered-meanwhile")
    with pytest.raises(CredentialsError):
        await token.get()
    clock.now += RECHECK
    assert await token.get() == "registered-meanwhile"


@pytest.mark.anyio
async def test_an_unregistered_workspace_is_a_problem_before_any_push(
    db: AsyncDatabase[Doc],
) -> None:
    """For /readyz: with no token, every push will fail, so delivery is not ready from
    the start; it is again once Rocket.Chat stores one (looked for every RECHECK s)."""
    clock = Clock()
    token = WorkspaceToken(db, clock)
    problem = await token.problem()
    assert problem is not None and problem.startswith("gateway: no workspace access token")
    await store_workspace_token(db, "registered-meanwhile")
    clock.now += RECHECK
    assert await token.problem() is None


@pytest.mark.anyio
async def test_the_token_is_cached_until_it_expires(db: AsyncDatabase[Doc]) -> None:
    clock = Clock()
    token = WorkspaceToken(db, clock)
    await store_workspace_token(db, "first", expires_in=600)
    assert await token.get() == "first"
    await store_workspace_token(db, "renewed", expires_in=1200)
    assert await token.get() == "first"
    clock.now += 601
    assert await token.get() == "renewed"


@pytest.mark.anyio
async def test_mongodb_away_at_a_reload_keeps_the_token_held(
    db: AsyncDatabase[Doc], mongo: AsyncMongoClient[Doc]
) -> None:
    clock = Clock()
    token = WorkspaceToken(db, clock)
    await store_workspace_token(db, "held", expires_in=600)
    assert await token.get() == "held"
    clock.now += 601
    await fail_commands(mongo, mode={"times": 1}, failCommands=["find"], errorCode=BAD_VALUE)
    with capture_logs() as logs:
        assert await token.get() == "held"
        assert await token.get() == "held"  # not asked again at once
    assert [line["event"] for line in logs] == ["workspace_token_reload_failed"]
    clock.now += RECHECK
    await store_workspace_token(db, "renewed", expires_in=1200)
    assert await token.get() == "renewed"


@pytest.mark.anyio
async def test_the_default_scope_token_is_preferred(db: AsyncDatabase[Doc]) -> None:
    far = dt.datetime.fromtimestamp(NOW + 10_000, dt.UTC)
    near = dt.datetime.fromtimestamp(NOW + 600, dt.UTC)
    await db[WORKSPACE_CREDENTIALS].insert_many(
        [
            {
                "_id": "a",
                "scope": "marketplace:read",
                "accessToken": "scoped",
                "expirationDate": far,
            },
            {"_id": "b", "scope": "", "accessToken": "default", "expirationDate": near},
            {"_id": "c", "scope": "", "accessToken": 42, "expirationDate": far},
        ]
    )
    assert await WorkspaceToken(db, Clock()).get() == "default"


@pytest.mark.anyio
@pytest.mark.parametrize("no_proxy", ["", "127.0.0.1"], ids=["proxied", "no_proxy"])
async def test_pushes_take_the_proxy_the_environment_names(
    db: AsyncDatabase[Doc],
    stub: StubApp,
    gateway_url: str,
    monkeypatch: pytest.MonkeyPatch,
    no_proxy: str,
) -> None:
    """As the doctor's requests (and Rocket.Chat's) do: behind an egress proxy, a push that
    ignored HTTP(S)_PROXY would never leave, while the doctor said the gateway answers."""
    await store_workspace_token(db, "workspace-token-1")
    with serve_forward_proxy() as (proxy_url, targets):
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        monkeypatch.setenv("NO_PROXY", no_proxy)
        async with make_http_client(DeliveryConfig(timeout=5.0)) as http:
            clock = Clock()
            pushkin = GatewayPushkin(
                http, lambda: [gateway_url], WorkspaceToken(db, clock), clock=clock
            )
            assert await pushkin.dispatch(CONTENT, ANDROID) is Outcome.SENT
    assert targets == ([] if no_proxy else [f"{gateway_url}/push/gcm/send"])
    assert [r.path for r in stub.received()] == ["/push/gcm/send"]


@pytest.mark.anyio
@pytest.mark.parametrize("variable", ["HTTP_PROXY", "ALL_PROXY"])
@pytest.mark.parametrize("scheme", ["", "HTTP://"], ids=["bare", "upper"])
async def test_a_proxy_is_taken_as_httpx_and_curl_take_it(
    db: AsyncDatabase[Doc],
    stub: StubApp,
    gateway_url: str,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    scheme: str,
) -> None:
    """`proxy:3128` is http://proxy:3128; ALL_PROXY serves every scheme without its own."""
    await store_workspace_token(db, "workspace-token-1")
    with serve_forward_proxy() as (proxy_url, targets):
        monkeypatch.setenv(variable, scheme + proxy_url.removeprefix("http://"))
        async with make_http_client(DeliveryConfig(timeout=5.0)) as http:
            clock = Clock()
            pushkin = GatewayPushkin(
                http, lambda: [gateway_url], WorkspaceToken(db, clock), clock=clock
            )
            assert await pushkin.dispatch(CONTENT, ANDROID) is Outcome.SENT
    assert targets == [f"{gateway_url}/push/gcm/send"]


@pytest.mark.anyio
async def test_no_proxy_may_name_a_port(
    db: AsyncDatabase[Doc], stub: StubApp, gateway_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store_workspace_token(db, "workspace-token-1")
    with serve_forward_proxy() as (proxy_url, targets):
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        monkeypatch.setenv("NO_PROXY", gateway_url.removeprefix("http://"))
        async with make_http_client(DeliveryConfig(timeout=5.0)) as http:
            clock = Clock()
            pushkin = GatewayPushkin(
                http, lambda: [gateway_url], WorkspaceToken(db, clock), clock=clock
            )
            assert await pushkin.dispatch(CONTENT, ANDROID) is Outcome.SENT
    assert targets == []


@pytest.mark.parametrize("value", ["socks5://u:s3cret@proxy:1080", "http://u:s3cret@proxy:port"])
def test_a_proxy_streamer_cannot_use_stops_the_start_without_quoting_it(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", value)
    with pytest.raises(ConfigError, match="HTTPS_PROXY is not an http") as raised:
        make_http_client(DeliveryConfig())
    assert "s3cret" not in str(raised.value)


def test_an_injected_transport_is_used_whatever_the_environment_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "socks5://proxy:1080")
    make_http_client(DeliveryConfig(), transport=httpx.AsyncHTTPTransport())


@pytest.mark.anyio
async def test_a_proxy_refusing_the_tunnel_means_the_push_never_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """So the next gateway may take it: nothing reached the first."""

    def refuse(connection: socket.socket) -> None:
        connection.recv(65536)
        connection.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    with serve_connections(refuse) as proxy_url:
        monkeypatch.setenv("HTTPS_PROXY", proxy_url)
        async with make_http_client(DeliveryConfig(timeout=5.0)) as http:
            with pytest.raises(httpx.TransportError) as raised:
                await http.post("https://gateway.example/push/gcm/send", content=b"{}")
    assert never_sent(raised.value)


def trickle(connection: socket.socket) -> None:
    """An answer that never ends, a byte at a time, each well within the read timeout."""
    connection.recv(65536)
    connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    with contextlib.suppress(OSError):
        for _ in range(600):
            connection.sendall(b"1\r\nx\r\n")
            time.sleep(0.05)


def flood(connection: socket.socket) -> None:
    connection.recv(65536)
    size = 4 * ANSWER_LIMIT
    connection.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
    with contextlib.suppress(OSError):
        connection.sendall(b"x" * size)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("peer", "error"), [(trickle, httpx.ReadTimeout), (flood, httpx.ReadError)]
)
async def test_an_answer_without_end_is_cut_off(
    peer: Callable[[socket.socket], None], error: type[Exception]
) -> None:
    """A peer trickling its answer would hold a delivery slot for ever; one sending
    megabytes would fill the memory. Both are transport failures, retried later."""
    with serve_connections(peer) as url:
        async with make_http_client(DeliveryConfig(timeout=1.0)) as http:
            with anyio.fail_after(20), pytest.raises(error):
                await http.post(f"{url}/push/gcm/send", content=b"{}")


@pytest.mark.anyio
async def test_answers_are_asked_for_uncompressed(pushkin: GatewayPushkin, stub: StubApp) -> None:
    """They are a few hundred bytes: compression saves nothing and adds a way to fail."""
    await pushkin.dispatch(CONTENT, ANDROID)
    [request] = stub.received()
    assert request.headers["accept-encoding"] == "identity"


GZIP = {"content-encoding": "gzip"}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("reply", "outcome", "undecodable"),
    [
        (Reply(406, gzip.compress(b'{"error": "bad token"}'), GZIP), Outcome.DEAD_TOKEN, False),
        # A proxy's mislabelled page: the status alone still says the push went out,
        # where failing to decode it used to retry it (a second push).
        (Reply(200, b"<html>OK</html>", GZIP), Outcome.SENT, True),
        (Reply(406, b"not gzip", GZIP), Outcome.DEAD_TOKEN, True),
        (Reply(200, b"{}", {"content-encoding": "snappy"}), Outcome.SENT, True),
        # 4 KB that inflate to 8 MiB, beyond what is decoded.
        (Reply(200, gzip.compress(bytes(8 * ANSWER_LIMIT)), GZIP), Outcome.SENT, True),
    ],
    ids=["gzip", "mislabelled-2xx", "mislabelled-406", "unknown-encoding", "inflates-too-far"],
)
async def test_a_compressed_answer_is_decoded_within_bounds_or_judged_by_its_status(
    pushkin: GatewayPushkin, stub: StubApp, reply: Reply, outcome: Outcome, undecodable: bool
) -> None:
    stub.script("/push/gcm/send", reply)
    with capture_logs() as logs:
        assert await pushkin.dispatch(CONTENT, ANDROID) is outcome
    said = [line for line in logs if line["event"] == "provider_answer_undecodable"]
    assert bool(said) is undecodable
