"""/metrics, /livez and /readyz over real HTTP, against the endpoint the daemon runs."""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client.metrics import MetricWrapperBase

from streamer import metrics
from streamer.config import ConfigError, HttpConfig
from streamer.health import Health, parse_listen, serve_http

pytestmark = pytest.mark.anyio


class Endpoint:
    def __init__(self, address: str, shutdown: anyio.Event, client: httpx.AsyncClient) -> None:
        self.address = address
        self.shutdown = shutdown
        self.client = client


@pytest.fixture
async def health() -> Health:
    return Health()


@pytest.fixture
async def endpoint(health: Health) -> AsyncIterator[Endpoint]:
    shutdown = anyio.Event()
    async with anyio.create_task_group() as tg:
        address = await tg.start(
            functools.partial(serve_http, health, "127.0.0.1:0", shutdown=shutdown)
        )
        async with httpx.AsyncClient(base_url=f"http://{address}") as client:
            yield Endpoint(address, shutdown, client)
        shutdown.set()


def _all_metrics() -> list[str]:
    found = [v for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)]
    return [metric.describe()[0].name for metric in found]


async def test_metrics_exposes_every_streamer_metric(endpoint: Endpoint) -> None:
    metrics.MESSAGES_SEEN.inc()
    response = await endpoint.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    names = _all_metrics()
    assert names and all(name.startswith("streamer_") for name in names)
    for name in names:
        assert f"# HELP {name}" in response.text, name
    assert "streamer_messages_seen_total" in response.text
    assert "_created" not in response.text  # only what the README's table lists


def test_the_readmes_metric_table_lists_exactly_the_metrics_there_are() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    listed = set(re.findall(r"^\| `(streamer_[a-z_]+)` \|", readme, re.MULTILINE))
    families = [
        metric.describe()[0]
        for metric in vars(metrics).values()
        if isinstance(metric, MetricWrapperBase)
    ]
    exposed = {f"{f.name}_total" if f.type == "counter" else f.name for f in families}
    assert listed == exposed


async def test_livez_answers_while_the_process_is_up(endpoint: Endpoint) -> None:
    response = await endpoint.client.get("/livez")
    assert response.status_code == 200


async def test_readyz_is_503_until_every_component_is_ready(
    endpoint: Endpoint, health: Health
) -> None:
    response = await endpoint.client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["components"]["mongo"] == {"ready": False, "reason": "not started yet"}
    for component in ("mongo", "streams"):
        health.set_ready(component)
    assert (await endpoint.client.get("/readyz")).status_code == 503
    health.set_ready("delivery")
    response = await endpoint.client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["ready"] is True


async def test_readyz_turns_503_with_the_reason_when_a_component_fails(
    endpoint: Endpoint, health: Health
) -> None:
    for component in ("mongo", "streams", "delivery"):
        health.set_ready(component)
    health.set_failed("delivery", "gateway rejected the workspace token (401)")
    response = await endpoint.client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {
        "ready": False,
        "components": {
            "delivery": {"ready": False, "reason": "gateway rejected the workspace token (401)"},
            "mongo": {"ready": True, "reason": None},
            "streams": {"ready": True, "reason": None},
        },
    }


async def test_binds_loopback_by_default(health: Health) -> None:
    default_host, _ = parse_listen(HttpConfig().listen)
    assert default_host == "127.0.0.1"
    shutdown = anyio.Event()
    async with anyio.create_task_group() as tg:
        address = await tg.start(
            functools.partial(serve_http, health, f"{default_host}:0", shutdown=shutdown)
        )
        shutdown.set()
    assert address.startswith("127.0.0.1:")


async def test_stops_when_the_shutdown_event_is_set(health: Health) -> None:
    shutdown = anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            address = await tg.start(
                functools.partial(serve_http, health, "127.0.0.1:0", shutdown=shutdown)
            )
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"http://{address}/livez")).status_code == 200
            shutdown.set()
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://{address}/livez")


@pytest.mark.parametrize(
    "listen", ["9464", "localhost", "127.0.0.1:http", "127.0.0.1:70000", ":9464"]
)
async def test_a_bad_listen_value_is_a_clear_error(health: Health, listen: str) -> None:
    with pytest.raises(ConfigError, match=r"\[http\] listen = .*expected host:port"):
        await serve_http(health, listen, shutdown=anyio.Event())


async def test_a_port_in_use_is_a_clear_error(endpoint: Endpoint, health: Health) -> None:
    with pytest.raises(ConfigError, match="cannot listen"):
        await serve_http(health, endpoint.address, shutdown=anyio.Event())


@pytest.mark.parametrize("listen", ["0.0.0.0:9464²", "h:٩٤٦٤", "9464", "[::1]:", "host:65536"])
def test_a_listen_address_that_is_not_host_port_is_a_config_error(listen: str) -> None:
    with pytest.raises(ConfigError, match="expected host:port"):
        parse_listen(listen)
