"""Gateway faults: the daemon against a push gateway that misbehaves in every way it can.

A seeded random mix of answers — 500s, 429s with a Retry-After (readable,
unreadable or absurdly long), hangs past `[delivery] timeout`, connections
dropped mid-answer, HTML and broken JSON bodies, and 200s — for a burst of
pushes. Every push must end delivered or given up with a `push_given_up` line,
none may be delivered twice, and the daemon must neither crash nor leave
anything in its queue.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from pymongo.database import Database

from tests import factories as f
from tests.daemon import Daemon, wait_until
from tests.servers import lifespan, read_body, serve_http
from tests.world import World, write_config

Doc = dict[str, Any]
Scope = dict[str, Any]
SEED = 20261123
TIMEOUT = 0.5
GIVE_UP_AFTER = 4.0
#: Whose every push is refused with a 503: must be given up, not retried for ever.
DOOMED = "gcm-device-doomed"


@dataclass
class Fault:
    status: int = 200
    body: bytes = b"{}"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    hang: bool = False
    drop: bool = False


FAULTS: list[tuple[float, Fault]] = [
    (0.40, Fault()),
    (0.08, Fault(200, b'{"ok": tru')),  # malformed JSON: the status is what counts
    (0.10, Fault(500, b"<html><body>Internal Server Error</body></html>")),
    (0.08, Fault(502, b"\xff\xfe not even utf-8")),
    (0.08, Fault(429, b"{}", [(b"retry-after", b"1")])),
    (0.04, Fault(429, b"{}", [(b"retry-after", b"soon")])),
    (0.04, Fault(503, b"{}", [(b"retry-after", b"86400")])),  # must not outlive give-up
    (0.09, Fault(hang=True)),
    (0.09, Fault(drop=True)),
]


class ChaosGateway:
    """An ASGI push gateway answering from a seeded random mix of faults.

    Only a plain 200 (possibly with a broken body) counts as delivered: a hung
    request is answered 500 after the client gave up, so it never counts.
    """

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.delivered: Counter[tuple[str, str]] = Counter()
        self.faults: Counter[str] = Counter()

    def _pick(self, token: str) -> Fault:
        with self._lock:
            if token == DOOMED:
                return Fault(503, b"{}")
            weights = [weight for weight, _ in FAULTS]
            return self._random.choices([fault for _, fault in FAULTS], weights)[0]

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await lifespan(receive, send)
            return
        push = orjson.loads(await read_body(receive))
        fault = self._pick(push["token"])
        await self._answer(fault, push, send)

    async def _answer(self, fault: Fault, push: Doc, send: Any) -> None:
        kind = "hang" if fault.hang else "drop" if fault.drop else str(fault.status)
        with self._lock:
            self.faults[kind] += 1
        headers = [(b"content-type", b"application/json"), *fault.headers]
        if fault.hang:
            await asyncio.sleep(TIMEOUT * 3)
            await send({"type": "http.response.start", "status": 500, "headers": headers})
            await send({"type": "http.response.body", "body": b"too late"})
            return
        await send({"type": "http.response.start", "status": fault.status, "headers": headers})
        if fault.drop:
            raise ConnectionAbortedError("chaos: connection dropped mid-answer")
        if fault.status == 200:
            with self._lock:
                self.delivered[(push["token"], push["options"]["payload"]["messageId"])] += 1
        await send({"type": "http.response.body", "body": fault.body})


@pytest.fixture
def world(sync_db: Database[Doc]) -> World:
    return World(sync_db)


@pytest.fixture
def chaos() -> Iterator[tuple[ChaosGateway, str]]:
    gateway = ChaosGateway(SEED)
    with serve_http(gateway) as url:
        # uvicorn configures its loggers as it starts: silence the traceback it logs
        # for every connection dropped on purpose only after that.
        uvicorn_errors = logging.getLogger("uvicorn.error")
        uvicorn_errors.disabled = True
        try:
            yield gateway, url
        finally:
            uvicorn_errors.disabled = False


def chaos_env() -> dict[str, str]:
    return {
        "STREAMER_DELIVERY__TIMEOUT": str(TIMEOUT),
        "STREAMER_DELIVERY__GIVE_UP_AFTER": str(GIVE_UP_AFTER),
        "STREAMER_LOG__LEVEL": '"info"',
    }


def seed_members(db: Database[Doc], world: World, count: int) -> list[Doc]:
    members = [f.user(f"member{n}") for n in range(count)] + [f.user("doomed")]
    db.users.insert_many(members)
    db.rocketchat_subscription.insert_many([f.subscription(u, world.channel) for u in members])
    db.get_collection("_raix_push_app_tokens").insert_many([f.push_token(u) for u in members])
    return members


def test_every_push_through_a_faulty_gateway_is_delivered_once_or_given_up(
    world: World, sync_db: Database[Doc], tmp_path: Path, mongo_uri: str, db_name: str,
    chaos: tuple[ChaosGateway, str],
) -> None:  # fmt: skip
    gateway, url = chaos
    members = seed_members(sync_db, world, 24)
    config = write_config(tmp_path / "config.toml", mongo_uri, db_name, url)
    with Daemon(config, env=chaos_env()) as daemon:
        daemon.wait_for_log("started", timeout=60)
        mids = [world.say(world.channel, f"chaos {n}")["_id"] for n in range(10)]
        expected = {
            (f"gcm-device-{u['username']}", mid) for u in [*members, world.bob] for mid in mids
        }

        def settled() -> set[tuple[str, str]]:
            given_up = {
                (f"gcm-device-{line['uid'][2:]}", line["mid"])
                for line in daemon.logs("push_given_up")
            }
            return set(gateway.delivered) | given_up

        wait_until(
            lambda: expected <= settled(), 60, lambda: _missing(settled(), expected, gateway)
        )
        wait_until(lambda: sync_db.streamer_queue.count_documents({}) == 0, 30)

        assert daemon.process is not None and daemon.process.poll() is None, "daemon died"
        given_up = {(line["uid"], line["mid"]) for line in daemon.logs("push_given_up")}
        assert {("u-doomed", mid) for mid in mids} <= given_up
        assert settled() == expected
        assert [key for key, n in gateway.delivered.items() if n > 1] == [], "delivered twice"
        assert not set(gateway.delivered) & {
            (f"gcm-device-{uid[2:]}", mid) for uid, mid in given_up
        }
        for event in ("delivery_crashed", "push_failed_unexpectedly", "push_outcome_unknown"):
            assert daemon.logs(event) == [], event
        assert {"500", "502", "429", "503", "hang", "drop"} <= set(gateway.faults)
        print(f"faults answered: {dict(gateway.faults)}; given up: {len(given_up)}")
        assert daemon.terminate() == 0


def _missing(
    settled: set[tuple[str, str]], expected: set[tuple[str, str]], gateway: ChaosGateway
) -> str:
    missing = sorted(expected - settled)
    return f"{len(missing)} neither delivered nor given up, e.g. {missing[:3]}; {gateway.faults}"
