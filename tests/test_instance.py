"""One live process per instance_id: a second one waits, a stale one is taken over."""

from __future__ import annotations

import datetime as dt

import anyio
import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from structlog.testing import capture_logs

from streamer.instance import InstanceClaim, InstanceTakenOver
from tests.failpoints import failing_commands

pytestmark = pytest.mark.anyio
STATE = "streamer_state"
#: Short beats so the tests are quick; "stale" is a few missed beats.
FAST = {"interval": 0.05, "stale_after": 1.0}
#: An election in progress: a transient error pymongo does not retry by itself here.
NOT_PRIMARY = 10107


def claim(db: AsyncDatabase[dict[str, object]], instance_id: str = "streamer-1") -> InstanceClaim:
    return InstanceClaim(db[STATE], instance_id, **FAST)


async def test_a_second_process_with_the_same_id_waits_until_the_first_stops(
    db: AsyncDatabase[dict[str, object]],
) -> None:
    first, second = claim(db), claim(db)
    await first.acquire()
    acquired = anyio.Event()

    async def start_second() -> None:
        await second.acquire()
        acquired.set()

    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(first.keep)
            tg.start_soon(start_second)
            with anyio.fail_after(10):
                while not any(line["event"] == "instance_id_in_use" for line in logs):  # noqa: ASYNC110
                    await anyio.sleep(0.01)  # a log line, not an event to wait on
            # A negative, so a bounded wait: twice "stale", which the first's heartbeat
            # must have kept it from becoming.
            await anyio.sleep(2.0)
            assert not acquired.is_set()
            tg.cancel_scope.cancel()
    await first.release()  # a clean stop
    with anyio.fail_after(10):
        await second.acquire()
    (line,) = [line for line in logs if line["event"] == "instance_id_in_use"]
    assert line["holder_pid"] is not None and "instance_id" in line["fix"]


async def test_distinct_ids_do_not_wait_for_each_other(
    db: AsyncDatabase[dict[str, object]],
) -> None:
    with anyio.fail_after(10):
        await claim(db, "a").acquire()
        await claim(db, "b").acquire()


async def test_a_crashed_holder_is_taken_over_once_its_heartbeat_is_stale(
    db: AsyncDatabase[dict[str, object]],
) -> None:
    crashed, restarted = claim(db), claim(db)
    await crashed.acquire()  # and never beats again
    with anyio.fail_after(10):
        await restarted.acquire()
    with anyio.fail_after(10), pytest.raises(InstanceTakenOver):
        await crashed.keep()  # frozen, not dead: it must stop when it wakes


async def test_a_claim_cleared_away_is_taken_again_not_taken_for_a_takeover(
    db: AsyncDatabase[dict[str, object]],
) -> None:
    """An operator emptying the state collection must not stop a lone instance."""
    holder = claim(db)
    await holder.acquire()
    await db[STATE].delete_many({})
    with anyio.move_on_after(0.5):  # a negative: some beats, none of which may raise
        await holder.keep()
    assert await db[STATE].count_documents({"_id": "instance:streamer-1"}) == 1


async def test_waiting_for_the_id_outlasts_a_mongodb_error(
    db: AsyncDatabase[dict[str, object]], mongo: AsyncMongoClient[dict[str, object]]
) -> None:
    """An election while a second process waits is no reason for it to exit."""
    async with failing_commands(mongo, failCommands=["update"], errorCode=NOT_PRIMARY):
        waiting = anyio.Event()

        async def acquire() -> None:
            await claim(db).acquire()
            waiting.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(acquire)
            await anyio.sleep(0.3)  # a negative: it must neither have claimed nor failed
            assert not waiting.is_set()
            tg.cancel_scope.cancel()
    with anyio.fail_after(10):
        await claim(db).acquire()


async def test_claims_of_processes_long_gone_are_cleared_at_a_start(
    db: AsyncDatabase[dict[str, object]],
) -> None:
    """A crash under the default id (hostname and pid) leaves a claim no one frees."""
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    recently = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    await db[STATE].insert_many(
        [
            {"_id": "instance:host-101", "nonce": "x", "seen_at": long_ago},
            {"_id": "instance:host-102", "nonce": "y", "seen_at": recently},
        ]
    )
    await claim(db, "host-103").acquire()
    left = sorted([str(doc["_id"]) async for doc in db[STATE].find()])
    assert left == ["instance:host-102", "instance:host-103"]
