"""Pushes per second through PushSender → GatewayPushkin into a local stub gateway.

Run by hand, not in CI:  PYTHONPATH=$PWD python -m bench.delivery [--pushes N]

Measures the whole delivery path the daemon uses (in-flight cap, ledger
claim and mark in a real mongod, JSON body, HTTP keep-alive) at 64 pushes in
flight with three HTTP clients: the daemon's own (`make_http_client`: httpx
requests straight into the aiohttp transport), `httpx.AsyncClient` over the
same transport, and plain `httpx.AsyncClient`; prints each and the ratios.
Then the gateway pushkin alone (no ledger), which is what the ledger's durable
writes cost on top. Target: ≥ 2,000 pushes/s.
The stub is a bare aiohttp.web server in its own process, so it is not what
is measured.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import anyio
import httpx
import orjson
from aiohttp import web
from httpx_aiohttp import AiohttpTransport
from pymongo import AsyncMongoClient

from streamer import devmongo
from streamer.config import DeliveryConfig
from streamer.delivery.base import Device, PushContent
from streamer.delivery.errors import Outcome
from streamer.delivery.gateway import GatewayPushkin, WorkspaceToken
from streamer.delivery.http import HttpClient, InFlightCap, make_http_client, pool_limits
from streamer.delivery.ledger import SentLedger
from streamer.delivery.sender import Attempts, Delivered, PushSender
from streamer.model import WORKSPACE_CREDENTIALS

CONCURRENCY = 64
TARGET = 2_000.0
CONFIG = DeliveryConfig(concurrency=CONCURRENCY, timeout=10.0)


def _serve_gateway(port: int, record: bool) -> None:
    """With `record`, each push's arrival time is kept by its messageId; `GET /arrivals?since=N`
    returns `[[messageId, epoch seconds], ...]` from the N-th on (bench.e2e's latencies)."""
    arrivals: list[tuple[str, float]] = []

    async def accept(request: web.Request) -> web.Response:
        body = await request.read()
        if record:
            arrived = time.time()
            mid = orjson.loads(body).get("options", {}).get("payload", {}).get("messageId")
            arrivals.append((str(mid), arrived))
        return web.json_response({})

    async def report(request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0"))
        return web.Response(body=orjson.dumps(arrivals[since:]), content_type="application/json")

    app = web.Application()
    app.router.add_post("/push/{kind}/send", accept)
    app.router.add_get("/arrivals", report)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


@contextmanager
def stub_gateway(record: bool = False) -> Iterator[str]:
    """A bare aiohttp gateway in its own process that accepts every push."""
    port = devmongo.free_port()
    process = multiprocessing.Process(target=_serve_gateway, args=(port, record), daemon=True)
    process.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            httpx.get(f"{url}/arrivals")
            break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        yield url
    finally:
        process.terminate()
        process.join()


def _content(n: int) -> PushContent:
    return PushContent(
        uid=f"u{n % 1000}",
        rid="GENERAL",
        mid=f"m{n}",
        title="#general",
        text="alice: hello there",
        badge=1,
        not_id=1666299236,
        created_at=time.time(),
        payload={"host": "https://chat.example.org/", "messageId": f"m{n}", "rid": "GENERAL"},
    )


#: The clients compared, by name: each makes a fresh one.
CLIENTS: dict[str, Callable[[], HttpClient]] = {
    "daemon's client (aiohttp transport)": lambda: make_http_client(CONFIG),
    "httpx.AsyncClient, aiohttp transport": lambda: httpx.AsyncClient(
        transport=AiohttpTransport(limits=pool_limits(CONFIG)), timeout=CONFIG.timeout
    ),
    "plain httpx.AsyncClient": lambda: httpx.AsyncClient(
        limits=pool_limits(CONFIG), timeout=CONFIG.timeout
    ),
}
DAEMON, OVER_AIOHTTP, PLAIN = CLIENTS


async def _run(
    mongo_uri: str, gateway: str, label: str, client: HttpClient, pushes: int, ledger_too: bool
) -> float:
    mongo: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongo_uri)
    db = mongo[f"bench_{label}"]
    await db[WORKSPACE_CREDENTIALS].insert_one({"_id": "c", "scope": "", "accessToken": "t"})
    pushkin = GatewayPushkin(client, lambda: [gateway], WorkspaceToken(db))
    ledger = SentLedger(db)
    await ledger.ensure_indexes()
    sender = PushSender(
        {"apn": pushkin, "gcm": pushkin}, db, CONFIG, cap=InFlightCap(CONCURRENCY), ledger=ledger
    )
    device = Device(token_id="d", kind="gcm", token="gcm-device-token")
    numbers = iter(range(pushes))

    async def worker() -> None:
        for n in numbers:
            if ledger_too:
                result = await sender.send(_content(n), [device], Attempts())
                assert isinstance(result, Delivered), result
            else:
                assert await pushkin.dispatch(_content(n), device) is Outcome.SENT

    started = time.perf_counter()
    async with anyio.create_task_group() as tasks:
        for _ in range(CONCURRENCY):
            tasks.start_soon(worker)
    elapsed = time.perf_counter() - started
    await client.aclose()
    await mongo.drop_database(db.name)
    await mongo.close()
    return pushes / elapsed


def _best_of(
    rounds: int, mongo_uri: str, gateway: str, client: str, pushes: int, ledger_too: bool = True
) -> float:
    """The best of a few rounds: other processes on the machine only ever slow a round down."""
    rates = []
    for n in range(rounds):
        label = f"{list(CLIENTS).index(client)}_{ledger_too}_{n}"
        run = (mongo_uri, gateway, label, CLIENTS[client](), pushes, ledger_too)
        rates.append(anyio.run(_run, *run))
    return max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pushes", type=int, default=10_000, help="pushes per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with devmongo.running() as mongo, stub_gateway() as gateway:
        rates = {
            name: _best_of(args.rounds, mongo.uri, gateway, name, args.pushes) for name in CLIENTS
        }
        alone = _best_of(args.rounds, mongo.uri, gateway, DAEMON, args.pushes, ledger_too=False)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{args.pushes} pushes per round, best of {args.rounds}, {CONCURRENCY} in flight,")
    print("through PushSender (ledger in a real mongod) and GatewayPushkin")
    for name, rate in rates.items():
        print(f"{name + ':':40s} {rate:8.0f} pushes/s")
    print(f"daemon's client / plain httpx:           {rates[DAEMON] / rates[PLAIN]:8.1f}x")
    print(f"daemon's client / AsyncClient on aiohttp: {rates[DAEMON] / rates[OVER_AIOHTTP]:7.1f}x")
    print(f"gateway pushkin alone, no ledger, daemon's client: {alone:8.0f} pushes/s")
    for what, rate in (("whole path", rates[DAEMON]), ("pushkin alone", alone)):
        verdict = "met" if rate >= TARGET else "MISSED"
        print(f"target {TARGET:,.0f} pushes/s, {what}: {verdict}")
    print(f"load average {load} on {os.cpu_count()} CPUs (other work lowers the figures)")


if __name__ == "__main__":
    main()
