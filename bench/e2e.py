"""The daemon end to end: `streamer run` as a subprocess, inserts in, pushes at a stub gateway.

Run by hand, not in CI:  PYTHONPATH=$PWD python -m bench.e2e [--profile FILE]

Starts its own mongod, seeds a Rocket.Chat world (offline recipients with a
device each, the sender online), and prints three figures from one run:

(a) throughput: N direct messages to offline users, inserted one at a time by
    a few concurrent writers (as Rocket.Chat does), timed from the first insert
    to the last push at the gateway; divided by the rate at which a bare
    pymongo change stream reads the same kind of inserts (measured first, with
    the daemon not yet started). Target ≥ 0.8.
(b) latency: direct messages at a steady 200/s, each insert timestamped, each
    push's arrival recorded by messageId at the stub: p50/p99. Target p99 ≤ 150 ms
    (Rocket.Chat's own worker polls every 2 s).
(c) one @all message in a 10,000-member room (Notifications_Max_Room_Members = 0):
    seconds until all 10,000 entries are in the queue collection (a change stream
    on it counts the inserts), and until all 10,000 pushes reached the gateway.

To compare two checkouts, run the bench from each one's directory: the daemon
starts as `python -m streamer` in the current directory, which Python puts
ahead of PYTHONPATH on `sys.path`, so PYTHONPATH alone does not select the
daemon's code.

The stub gateway (bench.delivery) is a bare aiohttp server in its own process.
The daemon logs at warning level, so logging is not what is measured. With
`--profile FILE` the daemon runs under cProfile (slower; figures are then only
indicative) and the stats are written to FILE when it stops.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
from pymongo import AsyncMongoClient, MongoClient

from bench.delivery import stub_gateway
from streamer import devmongo
from streamer.model import MESSAGES
from tests import factories as f
from tests.daemon import Daemon, wait_until

Doc = dict[str, Any]
DB = "rocketchat"
#: Concurrent writers inserting one message each at a time.
WRITERS = 8
LATENCY_RATE = 200.0
RATIO_TARGET = 0.8
P99_TARGET = 0.150
ROOM_MEMBERS = 10_000
#: Seconds between polls of the stub's arrivals (the arrival times are the stub's own).
POLL_INTERVAL = 0.1


class World:
    """Alice (online) writes; `recipients` offline users, each with a phone and a DM with her."""

    def __init__(self, db: Any, recipients: int) -> None:
        _rocketchat_indexes(db)
        self.alice = f.user("alice", status="online", statusConnection="online")
        users = [f.user(f"dm{n}") for n in range(recipients)]
        db.users.insert_many([self.alice, *users])
        db.rocketchat_settings.insert_many(f.default_settings(Notifications_Max_Room_Members=0))
        db.rocketchat_permissions.insert_one({"_id": "view-d-room", "roles": ["user", "admin"]})
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
        db.rocketchat_workspace_credentials.insert_one(
            {"_id": "wc", "scope": "", "accessToken": "ws-token", "expirationDate": expires}
        )
        db.get_collection("_raix_push_app_tokens").insert_many([f.push_token(u) for u in users])
        self.dms = [f.room(f"dm-{u['_id']}", t="d", usersCount=2) for u in users]
        db.rocketchat_room.insert_many(self.dms)
        subscriptions = [f.subscription(self.alice, room) for room in self.dms]
        subscriptions += [f.subscription(u, room) for u, room in zip(users, self.dms, strict=True)]
        db.rocketchat_subscription.insert_many(subscriptions)
        self.big_room = self._big_room(db)

    def _big_room(self, db: Any) -> Doc:
        room = f.room("BIG", t="c", usersCount=ROOM_MEMBERS + 1)
        members = [f.user(f"member{n}") for n in range(ROOM_MEMBERS)]
        db.rocketchat_room.insert_one(room)
        db.users.insert_many(members)
        db.get_collection("_raix_push_app_tokens").insert_many([f.push_token(u) for u in members])
        db.rocketchat_subscription.insert_many(
            [f.subscription(u, room) for u in [self.alice, *members]]
        )
        return room

    def dm_messages(self, count: int, label: str) -> list[Doc]:
        return [
            f.message(self.dms[n % len(self.dms)], self.alice, f"{label} {n}: are you there?")
            for n in range(count)
        ]


def _rocketchat_indexes(db: Any) -> None:
    """The indexes Rocket.Chat creates on the collections the daemon queries: without
    them every badge or device lookup scans a whole collection, which no server does."""
    db.rocketchat_subscription.create_index([("rid", 1), ("u._id", 1)], unique=True)
    db.rocketchat_subscription.create_index([("u._id", 1), ("name", 1), ("t", 1)])
    db.get_collection("_raix_push_app_tokens").create_index("userId")
    db.rocketchat_message.create_index([("rid", 1), ("ts", 1)])
    db.rocketchat_team_member.create_index([("teamId", 1), ("userId", 1)], unique=True)


# --- timing the inserts -----------------------------------------------------------


async def insert_all(
    client: AsyncMongoClient[Doc], messages: Sequence[Doc], inserted: dict[str, float]
) -> dict[str, float]:
    """Insert one at a time from WRITERS tasks, as fast as they go; insert time per mid.

    Each message's `ts` is set just before its insert, so it is never "old"."""
    pending = iter(messages)
    collection = client[DB][MESSAGES]

    async def writer() -> None:
        for doc in pending:
            inserted[doc["_id"]] = time.time()
            doc["ts"] = dt.datetime.now(dt.UTC)
            await collection.insert_one(doc)

    async with anyio.create_task_group() as tg:
        for _ in range(WRITERS):
            tg.start_soon(writer)
    return inserted


async def insert_paced(
    client: AsyncMongoClient[Doc], messages: Sequence[Doc], rate: float
) -> dict[str, float]:
    """Insert at a steady `rate` per second (on schedule, not after the previous insert)."""
    inserted: dict[str, float] = {}
    collection = client[DB][MESSAGES]
    start = time.monotonic()
    for n, doc in enumerate(messages):
        await anyio.sleep(max(0.0, start + n / rate - time.monotonic()))
        inserted[doc["_id"]] = time.time()
        doc["ts"] = dt.datetime.now(dt.UTC)
        await collection.insert_one(doc)
    return inserted


async def raw_stream_rate(uri: str, messages: Sequence[Doc]) -> float:
    """Messages/s a bare pymongo change stream reads while the writers insert them."""
    client: AsyncMongoClient[Doc] = AsyncMongoClient(uri)
    stream = await client[DB][MESSAGES].watch([{"$match": {"operationType": "insert"}}])
    read_at = 0.0
    inserted: dict[str, float] = {}
    async with anyio.create_task_group() as tg:
        tg.start_soon(insert_all, client, messages, inserted)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == len(messages):
                read_at = time.time()
                break
    await stream.close()
    await client.close()
    return len(messages) / (read_at - min(inserted.values()))


# --- what reached the gateway -----------------------------------------------------


class Arrivals:
    """The stub's record of pushes, fetched incrementally: first arrival and count per mid."""

    def __init__(self, gateway: str) -> None:
        self._url = f"{gateway}/arrivals"
        #: One client for every poll: `httpx.get` builds a client, and its TLS context,
        #: each time — ~15 ms of CPU taken from the daemon ten times a second.
        self._client = httpx.Client(timeout=30)
        self._fetched = 0
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.counts: Counter[str] = Counter()

    def refresh(self) -> None:
        more = self._client.get(self._url, params={"since": self._fetched}).json()
        self._fetched += len(more)
        for mid, at in more:
            self.first.setdefault(mid, at)
            self.last[mid] = at
            self.counts[mid] += 1

    def wait_for(self, mids: set[str], pushes_each: int, timeout: float) -> None:
        """Until every one of `mids` reached the gateway `pushes_each` times.

        Only the still-missing ones are looked at on each poll: the bench shares the
        CPU with the daemon, and scanning all 10,000 ids ten times a second would
        slow what it measures.
        """
        missing = set(mids)

        def probe() -> bool:
            self.refresh()
            missing.difference_update([mid for mid in missing if self.counts[mid] >= pushes_each])
            return not missing

        deadline = time.monotonic() + timeout
        while not probe():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(missing)} of {len(mids)} messages still missing pushes")
            time.sleep(POLL_INTERVAL)


# --- the three figures ------------------------------------------------------------


def throughput(uri: str, arrivals: Arrivals, messages: list[Doc]) -> float:
    inserted = anyio.run(_connected, uri, lambda c: insert_all(c, messages, {}))
    arrivals.wait_for(set(inserted), 1, timeout=600)
    last = max(arrivals.first[mid] for mid in inserted)
    return len(messages) / (last - min(inserted.values()))


def latencies(uri: str, arrivals: Arrivals, messages: list[Doc]) -> list[float]:
    inserted = anyio.run(_connected, uri, lambda c: insert_paced(c, messages, LATENCY_RATE))
    arrivals.wait_for(set(inserted), 1, timeout=120)
    return sorted(arrivals.first[mid] - at for mid, at in inserted.items())


def big_room_message(uri: str, arrivals: Arrivals, world: World) -> tuple[float, float]:
    """Seconds from the insert until all entries are queued, and until all pushes arrived."""
    message = f.message(
        world.big_room, world.alice, "@all the release is out", mentions=[{"_id": "all",
        "username": "all"}],
    )  # fmt: skip
    inserted, queued = anyio.run(_queued_after_insert, uri, message)
    arrivals.wait_for({message["_id"]}, ROOM_MEMBERS, timeout=600)
    return queued - inserted, arrivals.last[message["_id"]] - inserted


async def _queued_after_insert(uri: str, message: Doc) -> tuple[float, float]:
    client: AsyncMongoClient[Doc] = AsyncMongoClient(uri)
    queue = await client[DB]["streamer_queue"].watch(
        [{"$match": {"operationType": "insert", "fullDocument.mid": message["_id"]}}]
    )
    inserted = time.time()
    message["ts"] = dt.datetime.now(dt.UTC)
    await client[DB][MESSAGES].insert_one(message)
    seen = 0
    async for _ in queue:
        seen += 1
        if seen == ROOM_MEMBERS:
            break
    queued = time.time()
    await queue.close()
    await client.close()
    return inserted, queued


async def _connected(uri: str, work: Callable[[AsyncMongoClient[Doc]], Any]) -> Any:
    client: AsyncMongoClient[Doc] = AsyncMongoClient(uri)
    try:
        return await work(client)
    finally:
        await client.close()


# --- the daemon -------------------------------------------------------------------


def write_config(path: Path, mongo_uri: str, gateway: str, http_port: int) -> Path:
    path.write_text(
        f"""
[mongo]
uri = "{mongo_uri}"
database = "{DB}"
[delivery]
gateway_urls = ["{gateway}"]
[email]
enabled = false
[http]
listen = "127.0.0.1:{http_port}"
[log]
level = "warning"
"""
    )
    return path


def start_daemon(config: Path, http_port: int, profile: str | None) -> Daemon:
    python_args = ("-m", "cProfile", "-o", profile) if profile else ()
    daemon = Daemon(config, python_args=python_args).start()

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{http_port}/readyz").status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, 60, lambda: f"daemon ready; its log: {daemon.raw[-10:]}")
    return daemon


class CpuMeter:
    """CPU seconds (user + system) each process spent during a phase, from /proc."""

    def __init__(self, processes: dict[str, int]) -> None:
        self._pids = processes
        self._start = self._now()

    def _now(self) -> dict[str, float]:
        return {name: _cpu_seconds(pid) for name, pid in self._pids.items()}

    def spent(self) -> dict[str, float]:
        now = self._now()
        return {name: now[name] - self._start[name] for name in self._pids}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], fraction: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(fraction * 1000) - 1]


@dataclass
class Figures:
    raw: float = 0.0
    raw_cpu: dict[str, float] = field(default_factory=dict)
    e2e: float = 0.0
    e2e_cpu: dict[str, float] = field(default_factory=dict)
    delays: list[float] = field(default_factory=list)
    queued: float = 0.0
    delivered: float = 0.0
    room_cpu: dict[str, float] = field(default_factory=dict)


def measure(args: argparse.Namespace) -> Figures:
    figures = Figures()
    with devmongo.running() as mongo, stub_gateway(record=True) as gateway:
        sync: MongoClient[Doc] = MongoClient(mongo.uri)
        world = World(sync[DB], args.recipients)
        raw_messages = world.dm_messages(args.messages, "raw")
        cpu = CpuMeter({"mongod": mongo.process.pid, "bench": os.getpid()})
        figures.raw = anyio.run(raw_stream_rate, mongo.uri, raw_messages)
        figures.raw_cpu = cpu.spent()
        http_port = devmongo.free_port()
        with tempfile.TemporaryDirectory() as tmp:
            config = write_config(Path(tmp) / "config.toml", mongo.uri, gateway, http_port)
            daemon = start_daemon(config, http_port, args.profile)
            assert daemon.process is not None
            (stub,) = multiprocessing.active_children()
            pids = {"daemon": daemon.process.pid, "mongod": mongo.process.pid}
            pids |= {"stub": stub.pid or 0, "bench": os.getpid()}
            try:
                arrivals = Arrivals(gateway)
                cpu = CpuMeter(pids)
                messages = world.dm_messages(args.messages, "e2e")
                figures.e2e = throughput(mongo.uri, arrivals, messages)
                figures.e2e_cpu = cpu.spent()
                paced = world.dm_messages(int(args.seconds * LATENCY_RATE), "paced")
                figures.delays = latencies(mongo.uri, arrivals, paced)
                cpu = CpuMeter(pids)
                figures.queued, figures.delivered = big_room_message(mongo.uri, arrivals, world)
                figures.room_cpu = cpu.spent()
                assert daemon.terminate(timeout=60) == 0, daemon.raw[-20:]
            finally:
                if daemon.process.poll() is None:
                    daemon.kill()
        sync.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=10_000, help="messages for (a)")
    parser.add_argument("--recipients", type=int, default=2_000, help="offline DM partners")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of (b)")
    parser.add_argument("--profile", help="run the daemon under cProfile, stats to this file")
    args = parser.parse_args()
    report(args, measure(args))


def report(args: argparse.Namespace, figures: Figures) -> None:
    ratio = figures.e2e / figures.raw
    delays = figures.delays
    p50, p99 = percentile(delays, 0.50), percentile(delays, 0.99)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"(a) {args.messages} DMs to {args.recipients} offline users, {WRITERS} writers")
    print(f"    bare change stream: {figures.raw:8.0f} messages/s")
    print(f"      CPU ms per message: {_per(figures.raw_cpu, args.messages)}")
    print(f"    insert → gateway:   {figures.e2e:8.0f} messages/s")
    print(f"    ratio:              {ratio:8.2f}  (target ≥ {RATIO_TARGET}: {_met(ratio >= 0.8)})")
    print(f"    CPU ms per message: {_per(figures.e2e_cpu, args.messages)}")
    print(f"(b) {len(delays)} DMs at {LATENCY_RATE:.0f}/s, insert → gateway latency")
    print(f"    p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {delays[-1] * 1000:.1f} ms")
    print(f"    (target p99 ≤ {P99_TARGET * 1000:.0f} ms: {_met(p99 <= P99_TARGET)})")
    print(f"(c) @all in a {ROOM_MEMBERS:,}-member room")
    print(f"    all entries queued after {figures.queued:.2f} s")
    print(f"    all pushes delivered after {figures.delivered:.2f} s")
    print(f"    CPU ms per push: {_per(figures.room_cpu, ROOM_MEMBERS)}")
    print(f"load average {load} on {os.cpu_count()} CPUs (mongod, stub, daemon and writers share)")
    if args.profile:
        print(f"profiled (figures are slower than unprofiled): stats in {args.profile}")


def _per(cpu: dict[str, float], count: int) -> str:
    return ", ".join(f"{name} {seconds * 1000 / count:.2f}" for name, seconds in cpu.items())


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


if __name__ == "__main__":
    main()
