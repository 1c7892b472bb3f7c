"""Memory under a flapping gateway: the daemon's RSS before and after N pushes.

    PYTHONPATH=$PWD python -m bench.chaos_rss [--members 200] [--messages 100]

Starts a throwaway replica set, seeds a room of `members` (each with a device),
runs `streamer run` as a subprocess against a local gateway that flaps — up
for `period` seconds, then down for as long answering 500s, 429s and dropped
connections — and posts `messages` messages to the room. RSS is read from
/proc after a warm-up (the first 5 % delivered) and once every push has been
delivered; the growth between them is what a leak would show. A measurement,
not a test: run by hand.

Measured here (defaults: 201 devices x 100 messages = 20,100 pushes, 38,469
gateway requests in 267 s, 1 s up / 1 s down): RSS 63 MiB at start, 98 MiB after
warm-up (peak 117 MiB during the first burst), 95 MiB after all 20,100 were
delivered — no growth (-3 MiB) after warm-up.
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from pymongo import MongoClient

from streamer import devmongo
from tests import factories as f
from tests.daemon import Daemon, wait_until
from tests.servers import lifespan, read_body, serve_http
from tests.world import World, write_config

Doc = dict[str, Any]
Scope = dict[str, Any]


class FlappingGateway:
    """Healthy for `period` seconds, then failing for as long, and so on."""

    def __init__(self, period: float, seed: int = 7) -> None:
        self._period = period
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.delivered: set[tuple[str, str]] = set()
        self.requests = 0

    def _up(self) -> bool:
        return int(time.monotonic() / self._period) % 2 == 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body = await read_body(receive)
        with self._lock:
            self.requests += 1
            fault = None if self._up() else self._random.choice(["500", "429", "drop"])
        headers = [(b"content-type", b"application/json")]
        if fault is None:
            push = orjson.loads(body)
            with self._lock:
                self.delivered.add((push["token"], push["options"]["payload"]["messageId"]))
            status = 200
        else:
            status = 429 if fault == "429" else 500
            headers.append((b"retry-after", b"1"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if fault == "drop":
            raise ConnectionAbortedError("flapping: connection dropped")
        await send({"type": "http.response.body", "body": b"{}"})


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of `pid`, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def seed(db: Any, members: int) -> World:
    world = World(db)
    users = [f.user(f"member{n}") for n in range(members)]
    db.users.insert_many(users)
    db.rocketchat_subscription.insert_many([f.subscription(u, world.channel) for u in users])
    db.get_collection("_raix_push_app_tokens").insert_many([f.push_token(u) for u in users])
    # Every member gets a push: no large-room limit.
    db.rocketchat_settings.update_one(
        {"_id": "Notifications_Max_Room_Members"}, {"$set": {"value": 0}}
    )
    return world


def measure(members: int, messages: int, period: float) -> None:
    expected = (members + 1) * messages  # the members and bob
    gateway = FlappingGateway(period)
    with (
        devmongo.running() as server,
        serve_http(gateway) as url,
        tempfile.TemporaryDirectory() as tmp,
    ):
        logging.getLogger("uvicorn.error").disabled = True
        client: MongoClient[Doc] = MongoClient(server.uri)
        world = seed(client["rss"], members)
        config = write_config(Path(tmp) / "config.toml", server.uri, "rss", url)
        env = {
            "STREAMER_LOG__LEVEL": '"info"',
            "STREAMER_DELIVERY__TIMEOUT": "2.0",
            "STREAMER_DELIVERY__GIVE_UP_AFTER": "3600.0",
        }
        with Daemon(config, env=env) as daemon:
            daemon.wait_for_log("started", timeout=60)
            assert daemon.process is not None
            pid = daemon.process.pid
            started = time.monotonic()
            print(f"RSS at start:         {rss_kib(pid)} KiB")
            for n in range(messages):
                world.say(world.channel, f"flap {n}")
            wait_until(lambda: len(gateway.delivered) >= expected // 20, 600)
            before = rss_kib(pid)
            print(f"RSS after warm-up:    {before} KiB ({len(gateway.delivered)} delivered)")
            wait_until(lambda: len(gateway.delivered) >= expected, 1800)
            time.sleep(2)  # let the last settles land
            after = rss_kib(pid)
            elapsed = time.monotonic() - started
            print(f"RSS after all:        {after} KiB ({len(gateway.delivered)} delivered)")
            print(
                f"{expected} pushes, {gateway.requests} requests to the gateway in {elapsed:.0f} s;"
                f" RSS growth after warm-up: {after['VmRSS'] - before['VmRSS']} KiB,"
                f" peak {after['VmHWM']} KiB"
            )
            daemon.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=200)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--period", type=float, default=1.0, help="seconds up, then down")
    args = parser.parse_args()
    measure(args.members, args.messages, args.period)


if __name__ == "__main__":
    main()
