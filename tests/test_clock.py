"""The queue's clock is MongoDB's, read against the real mongod: host clocks may disagree."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest
from prometheus_client import REGISTRY
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from structlog.testing import capture_logs

from streamer.clock import ServerClock
from streamer.config import QueueConfig
from streamer.queue import Entry, Queue

pytestmark = pytest.mark.anyio

Doc = dict[str, Any]
#: Far beyond a round trip to a local mongod, far below the skews the tests set.
CLOSE = 1.0
HOUR = 3600.0


class Wall:
    """A host wall clock `skew` seconds off the true time, which the test may step."""

    def __init__(self, skew: float) -> None:
        self.skew = skew

    def __call__(self) -> float:
        return time.time() + self.skew


async def test_the_clock_is_mongodbs_however_far_off_the_host_clock_is(
    mongo: AsyncMongoClient[Doc],
) -> None:
    """The local mongod runs on this host's true clock; the 'host' here is an hour ahead."""
    clock = ServerClock(mongo, wall=Wall(HOUR))
    assert abs(clock() - (time.time() + HOUR)) < CLOSE  # the host's, until read
    with capture_logs() as logs:
        await clock.read()
    assert abs(clock() - time.time()) < CLOSE
    (said,) = [line for line in logs if line["event"] == "host_clock_skew"]
    assert abs(said["seconds"] - HOUR) < CLOSE
    assert said["log_level"] == "warning"
    assert abs((REGISTRY.get_sample_value("streamer_host_clock_skew_seconds") or 0) - HOUR) < CLOSE


async def test_a_step_of_the_host_clock_after_reading_moves_nothing(
    mongo: AsyncMongoClient[Doc],
) -> None:
    wall = Wall(0.0)
    clock = ServerClock(mongo, wall=wall)
    await clock.read()
    wall.skew = -HOUR  # NTP steps the host clock back an hour
    assert abs(clock() - time.time()) < CLOSE


async def test_an_in_step_host_clock_is_not_worth_a_line(mongo: AsyncMongoClient[Doc]) -> None:
    clock = ServerClock(mongo)
    with capture_logs() as logs:
        await clock.read()
        await clock.read()
    assert [line for line in logs if "clock" in line["event"]] == []


async def test_a_failed_reading_keeps_the_clock_as_it_was_and_says_so() -> None:
    unreachable: AsyncMongoClient[Doc] = AsyncMongoClient(
        "mongodb://127.0.0.1:9/?directConnection=true", serverSelectionTimeoutMS=50
    )
    clock = ServerClock(unreachable, wall=Wall(HOUR))
    with capture_logs() as logs, anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(clock.keep_reading, 0.05)
            while not any(line["event"] == "server_clock_read_failed" for line in logs):  # noqa: ASYNC110
                await anyio.sleep(0.01)  # a log line, not an event to wait on
            tg.cancel_scope.cancel()
    await unreachable.close()
    assert abs(clock() - (time.time() + HOUR)) < CLOSE


async def test_hosts_whose_clocks_differ_cannot_take_each_others_live_leases(
    db: AsyncDatabase[Doc], mongo: AsyncMongoClient[Doc]
) -> None:
    """Host a runs 40 s behind, host b 40 s ahead: on host clocks, b would see a's fresh
    60 s lease as expired 20 s ago and deliver the entry a is delivering."""
    clocks = {name: ServerClock(mongo, wall=Wall(skew)) for name, skew in (("a", -40), ("b", 40))}
    for clock in clocks.values():
        await clock.read()
    queues = {
        name: Queue(db["streamer_queue"], QueueConfig(), instance_id=name, clock=clock)
        for name, clock in clocks.items()
    }
    a, b = queues["a"], queues["b"]
    await a.load()
    now = clocks["a"]()
    await a.add([Entry("u1", "r1", "m1", "push", now, now)])
    with anyio.fail_after(30):
        (taken,) = await a.next_due()
    await b.load()
    # A negative, so a bounded wait: b must not lease what a holds for the next minute.
    with anyio.move_on_after(1.0):
        await b.next_due()
        pytest.fail("b took an entry a holds a live lease on")
    await a.done(taken)
