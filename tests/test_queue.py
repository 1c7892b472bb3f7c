"""The queue against the real mongod: SPEC §5's rules, durability and leases.

The clock is injected: tests move it forward instead of waiting for delays.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from prometheus_client import REGISTRY
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from streamer.config import QueueConfig
from streamer.queue import EXPIRED, Entry, Queue, entry_id
from tests.failpoints import failing_commands
from tests.test_cache import counted

pytestmark = pytest.mark.anyio

Doc = dict[str, Any]
T0 = 1_700_000_000.0
_mids = itertools.count(1)


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def collection(db: AsyncDatabase[Doc]) -> AsyncCollection[Doc]:
    return db["streamer_queue"]


QueueFactory = Callable[..., Awaitable[Queue]]


@pytest.fixture
def make_queue(collection: AsyncCollection[Doc], clock: Clock) -> QueueFactory:
    async def make(instance_id: str = "a", **settings: Any) -> Queue:
        config = dataclasses.replace(QueueConfig(), **settings)
        queue = Queue(collection, config, instance_id=instance_id, clock=clock)
        await queue.load()
        return queue

    return make


async def queue_a(db: AsyncDatabase[Doc], collection: AsyncCollection[Doc], clock: Clock) -> Queue:
    """Instance "a" on `collection`, reached through `db` (another client's)."""
    queue = Queue(db[collection.name], QueueConfig(), instance_id="a", clock=clock)
    await queue.load()
    return queue


def entry(
    clock: Clock, uid: str = "u1", rid: str = "r1", due_in: float = 0.0, age: float = 0.0
) -> Entry:
    """An entry created `age` seconds ago, due `due_in` seconds from now."""
    mid = f"m{next(_mids):05d}"
    created = clock.now - age
    return Entry(uid, rid, mid, "push", clock.now + due_in, created)


async def take(queue: Queue) -> Entry:
    with anyio.fail_after(30):
        (taken,) = await queue.next_due()
    return taken


async def deliver_all(queue: Queue, count: int) -> list[str]:
    """Take and settle `count` entries; their message ids in the order they came out."""
    mids = []
    for _ in range(count):
        taken = await take(queue)
        mids.append(taken.mid)
        await queue.done(taken)
    return mids


async def wait_until(condition: Callable[[], bool]) -> None:
    """Wait for another task's effect that the queue has no hook for."""
    with anyio.fail_after(30):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_entries_come_out_by_due_time_then_creation(
    make_queue: QueueFactory, clock: Clock
) -> None:
    queue = await make_queue()
    late = entry(clock, uid="u1", due_in=10, age=30)
    newer = entry(clock, uid="u2", age=5)
    older = entry(clock, uid="u3", age=10)
    await queue.add([late, newer, older])
    clock.now += 10
    assert await deliver_all(queue, 3) == [older.mid, newer.mid, late.mid]


async def test_an_entry_is_not_handed_out_before_it_is_due(
    make_queue: QueueFactory, clock: Clock
) -> None:
    queue = await make_queue()
    await queue.add([entry(clock, due_in=120)])
    assert queue.next_due_at() == clock.now + 120
    with anyio.move_on_after(0.1) as scope:
        await queue.next_due()
    assert scope.cancelled_caught


async def test_next_due_wakes_when_an_entry_is_added(
    make_queue: QueueFactory, clock: Clock
) -> None:
    queue = await make_queue()
    taken: list[Entry] = []

    async def consume() -> None:
        taken.extend(await queue.next_due())

    added = entry(clock)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await anyio.lowlevel.checkpoint()
            await queue.add([added])
    assert taken == [added]


async def test_adding_an_entry_twice_queues_it_once(
    make_queue: QueueFactory, clock: Clock, collection: AsyncCollection[Doc]
) -> None:
    queue = await make_queue()
    once = entry(clock)
    await queue.add([once, once])
    await queue.add([once])
    assert await collection.count_documents({}) == 1
    assert len(queue) == 1
    assert (await collection.find_one({}) or {})["_id"] == entry_id("u1", once.mid, "push")


async def test_adding_again_does_not_reset_an_entry_being_retried(
    make_queue: QueueFactory, clock: Clock, collection: AsyncCollection[Doc]
) -> None:
    queue = await make_queue()
    original = entry(clock)
    await queue.add([original])
    await queue.retry(await take(queue), clock.now + 30, "gateway 503")
    await queue.add([original])
    doc = await collection.find_one({"_id": original.id}) or {}
    assert (doc["attempts"], doc["due_at"]) == (1, clock.now + 30)
    assert queue.next_due_at() == clock.now + 30


async def test_a_restarted_queue_hands_out_entries_in_the_same_order(
    make_queue: QueueFactory, clock: Clock
) -> None:
    first = await make_queue()
    entries = [entry(clock, uid=f"u{i}", due_in=(i * 7) % 11, age=(i * 5) % 13) for i in range(40)]
    await first.add(entries)
    await first.release_owned()  # a clean stop
    expected = [e.mid for e in sorted(entries, key=lambda e: (e.due_at, e.created_at, e.id))]
    restarted = await make_queue(instance_id="b")
    assert len(restarted) == 40
    clock.now += 11
    assert await deliver_all(restarted, 40) == expected


async def test_entries_due_now_are_queued_leased_to_their_instance(
    make_queue: QueueFactory, clock: Clock, collection: AsyncCollection[Doc]
) -> None:
    """It takes them at once without a lease write; should it die first, another instance
    takes them over when that lease expires, and a clean stop frees them at once."""
    lease = QueueConfig().lease_seconds
    ours = await make_queue(instance_id="a")
    now, later = entry(clock), entry(clock, uid="u2", due_in=30)
    await ours.add([now, later])
    owners = {d["mid"]: (d["owner"], d["lease_until"]) async for d in collection.find()}
    assert owners == {now.mid: ("a", clock.now + lease), later.mid: (None, 0.0)}
    survivor = await make_queue(instance_id="b")
    clock.now += 30
    assert await take(survivor) == later
    assert survivor.next_due_at() == now.due_at + lease  # when "a" would count as dead
    await ours.release_owned()
    assert await take(await make_queue(instance_id="c")) == now


async def test_an_entry_queued_leased_is_taken_once_half_its_lease_is_gone(
    make_queue: QueueFactory, clock: Clock
) -> None:
    queue = await make_queue()
    queued = entry(clock)
    await queue.add([queued])
    clock.now += QueueConfig().lease_seconds * 0.75
    assert await take(queue) == queued  # through a fresh lease: too little time was left


async def test_the_oldest_due_age_grows_while_nothing_takes_the_entry(
    make_queue: QueueFactory, clock: Clock
) -> None:
    """The gauge the README suggests alerting on must rise when delivery stalls, that is
    when nothing happens in the queue at all: it is read at scrape time."""
    queue = await make_queue()
    await queue.add([entry(clock, due_in=2)])
    assert sample("streamer_queue_oldest_due_age_seconds") == 0.0
    assert sample("streamer_queue_depth") == 1.0
    clock.now += 10
    assert sample("streamer_queue_oldest_due_age_seconds") == 8.0


async def test_a_lease_renewed_while_delivering_keeps_other_instances_off(
    make_queue: QueueFactory, clock: Clock
) -> None:
    """A slow delivery (an SMTP conversation can outlast a lease) must not be taken over
    and done a second time by another instance while it is still under way."""
    lease = QueueConfig().lease_seconds
    ours = await make_queue(instance_id="a")
    await ours.add([entry(clock, due_in=1)])
    clock.now += 1
    taken = await take(ours)  # and delivering, slowly
    clock.now += lease * 0.75
    await ours.renew_held()
    clock.now += lease * 0.5  # past the first lease, within the renewed one
    theirs = await make_queue(instance_id="b")
    assert theirs.next_due_at() == clock.now - lease * 0.5 + lease
    await ours.done(taken)


async def test_entries_queued_leased_keep_no_copy_once_past_half_their_lease(
    make_queue: QueueFactory, clock: Clock
) -> None:
    """A courier far behind leaves many such entries untaken; past half their lease
    they are taken through a lease write anyway, and their copies are dropped."""
    queue = await make_queue()
    early = [entry(clock, uid=f"u{i}") for i in range(3)]
    await queue.add(early)
    clock.now += QueueConfig().lease_seconds * 0.75
    late = entry(clock, uid="late")
    await queue.add([late])
    assert list(queue._owned) == [late.id]  # the memory held: one copy, not four
    taken = await queue.next_due(limit=10)
    assert sorted(e.mid for e in taken) == sorted(e.mid for e in [*early, late])


async def test_read_clears_all_rooms_of_the_user(
    make_queue: QueueFactory, clock: Clock, collection: AsyncCollection[Doc]
) -> None:
    queue = await make_queue(clear_on_read="user")
    other_user = entry(clock, uid="u2", due_in=60)
    await queue.add([entry(clock, rid="r1", due_in=60), entry(clock, rid="r2", due_in=60)])
    await queue.add([other_user])
    before = sample("streamer_queue_cleared_total")
    assert await queue.clear_reads([("u1", "r1", clock.now)]) == 2
    assert sample("streamer_queue_cleared_total") == before + 2
    assert [d["uid"] async for d in collection.find()] == ["u2"]
    clock.now += 60
    assert await deliver_all(queue, 1) == [other_user.mid]
    assert len(queue) == 0


async def test_read_clears_only_that_room_when_configured(
    make_queue: QueueFactory, clock: Clock
) -> None:
    queue = await make_queue(clear_on_read="room")
    other_room = entry(clock, rid="r2", due_in=60)
    await queue.add([entry(clock, rid="r1", due_in=60), other_room])
    assert await queue.clear_reads([("u1", "r1", clock.now)]) == 1
    clock.now += 60
    assert await deliver_all(queue, 1) == [other_room.mid]


@pytest.mark.parametrize("clear_on_read", ["user", "room"])
async def test_a_read_leaves_what_was_sent_after_it(
    make_queue: QueueFactory, clock: Clock, collection: AsyncCollection[Doc], clear_on_read: str
) -> None:
    """Messages and reads come by different streams, in either order: a message sent
    just after the read may be queued before the read is handled. It is still unread."""
    queue = await make_queue(clear_on_read=clear_on_read)
    read_at = clock.now
    before = entry(clock, rid="r1", due_in=60, age=1)
    at_the_read = entry(clock, rid="r1", due_in=60)
    clock.now += 0.005  # the next message, 5 ms after the read
    later = entry(clock, rid="r1", due_in=60)
    await queue.add([before, at_the_read, later])
    assert await queue.clear_reads([("u1", "r1", read_at)]) == 2  # up to the read's instant
    assert [d["mid"] async for d in collection.find()] == [later.mid]
    clock.now += 60
    assert await deliver_all(queue, 1) == [later.mid]


async def test_a_message_handled_after_a_later_read_is_not_queued(
    make_queue: QueueFactory, clock: Clock, collection: AsyncCollection[Doc]
) -> None:
    """The other way round: the user read every room at `read_at`; a message of another
    room inserted just before it comes late (its stream behind). Rocket.Chat, clearing
    the user's queue at the read, never sends it; the fire-time re-check, looking at
    that room alone, would."""
    queue = await make_queue(clear_on_read="user")
    read_at = clock.now
    assert await queue.clear_reads([("u1", "r1", read_at)]) == 0
    before_the_read = entry(clock, rid="r2", due_in=60, age=0.005)
    after_the_read = dataclasses.replace(entry(clock, rid="r2", due_in=60), created_at=read_at + 1)
    other_user = entry(clock, uid="u2", rid="r2", due_in=60, age=0.005)
    await queue.add([before_the_read, after_the_read, other_user])
    assert {d["mid"] async for d in collection.find()} == {after_the_read.mid, other_user.mid}
    assert len(queue) == 2


async def test_going_offline_brings_delayed_entries_forward(
    make_queue: QueueFactory, clock: Clock
) -> None:
    queue = await make_queue()
    first, second = entry(clock, due_in=120, age=2), entry(clock, due_in=100, age=1)
    stranger = entry(clock, uid="u2", due_in=120)
    await queue.add([first, second, stranger])
    assert await queue.users_offline(["u1"]) == 2
    assert queue.next_due_at() == clock.now
    assert await deliver_all(queue, 2) == [first.mid, second.mid]
    assert queue.next_due_at() == stranger.due_at


async def test_going_offline_keeps_the_back_off_of_a_retry(
    make_queue: QueueFactory, clock: Clock
) -> None:
    queue = await make_queue()
    await queue.add([entry(clock)])
    await queue.retry(await take(queue), clock.now + 300, "gateway 503")
    assert await queue.users_offline(["u1"]) == 0
    assert queue.next_due_at() == clock.now + 300


async def test_going_offline_changes_nothing_when_presence_rescheduling_is_off(
    make_queue: QueueFactory, clock: Clock
) -> None:
    queue = await make_queue(reschedule_on_presence=False)
    await queue.add([entry(clock, due_in=120)])
    assert await queue.users_offline(["u1"]) == 0
    assert queue.next_due_at() == clock.now + 120


async def test_a_batch_of_reads_or_of_users_going_offline_is_one_write(
    mongo_uri: str, collection: AsyncCollection[Doc], clock: Clock
) -> None:
    """A Rocket.Chat restart sets every user offline at once: thousands of presence
    changes in a batch, one round trip each would hold up the stream for seconds."""
    async with counted(mongo_uri, collection.database) as (commands, db):
        queue = await queue_a(db, collection, clock)
        users = [f"u{n}" for n in range(20)]
        await queue.add([entry(clock, uid=uid, rid=f"r-{uid}", due_in=120) for uid in users])
        commands.commands.clear()
        assert await queue.users_offline(users[:10]) == 10
        assert await queue.clear_reads([(uid, f"r-{uid}", clock.now) for uid in users[10:]]) == 10
        assert commands.commands == ["update", "delete"]
        assert queue.next_due_at() == clock.now and len(queue) == 10


async def test_processing_an_entry_sends_the_users_others_first_in_creation_order(
    make_queue: QueueFactory, clock: Clock, collection: AsyncCollection[Doc]
) -> None:
    """SPEC §5: user online at t0 (delayed 120 s), then offline for later messages.

    The later messages are due first; when one is processed, the user's other
    entries are rescheduled and it goes back, so they all go out oldest first.
    """
    queue = await make_queue()
    while_online = entry(clock, due_in=120, age=30)
    after_offline = entry(clock, age=10)
    latest = entry(clock, due_in=5, age=5)
    someone_else = entry(clock, uid="u2", due_in=200)
    await queue.add([after_offline, latest, while_online, someone_else])
    assert await deliver_all(queue, 3) == [while_online.mid, after_offline.mid, latest.mid]
    assert [d["uid"] async for d in collection.find()] == ["u2"]
    assert queue.next_due_at() == someone_else.due_at


async def test_a_burst_to_an_offline_user_goes_out_in_order_without_moving_entries(
    make_queue: QueueFactory, clock: Clock, collection: AsyncCollection[Doc]
) -> None:
    """Entries already due and created after the one processed follow it anyway:
    they are neither moved nor is the first one put back (two writes and a lease)."""
    queue = await make_queue()
    burst = [entry(clock, age=n, due_in=-n) for n in (3, 2, 1)]  # each due when created
    await queue.add(burst)
    due_before = {d["_id"]: d["due_at"] async for d in collection.find()}
    first = await take(queue)
    assert first.mid == burst[0].mid
    assert {d["_id"]: d["due_at"] async for d in collection.find()} == due_before
    await queue.done(first)
    assert await deliver_all(queue, 2) == [burst[1].mid, burst[2].mid]


async def test_a_retry_in_back_off_does_not_hold_back_the_users_new_entry(
    make_queue: QueueFactory, clock: Clock
) -> None:
    queue = await make_queue()
    await queue.add([entry(clock, age=10)])
    await queue.retry(await take(queue), clock.now + 300, "gateway 503")
    fresh = entry(clock)
    await queue.add([fresh])
    assert (await take(queue)).mid == fresh.mid
    assert queue.next_due_at() == clock.now + 300


async def test_entries_older_than_max_age_are_dropped(
    make_queue: QueueFactory, clock: Clock, collection: AsyncCollection[Doc]
) -> None:
    queue = await make_queue(max_age=7200)
    stale = entry(clock, uid="u1", age=7201)
    fresh = entry(clock, uid="u2", age=1)
    await queue.add([stale, fresh])
    before = sample("streamer_queue_dropped_total", reason=EXPIRED)
    assert await deliver_all(queue, 1) == [fresh.mid]
    assert sample("streamer_queue_dropped_total", reason=EXPIRED) == before + 1
    assert await collection.count_documents({}) == 0


async def test_a_retry_survives_a_restart(make_queue: QueueFactory, clock: Clock) -> None:
    queue = await make_queue()
    await queue.add([entry(clock)])
    failed_at = clock.now
    await queue.retry(await take(queue), clock.now + 30, "gateway 503")
    restarted = await make_queue(instance_id="b")
    assert restarted.next_due_at() == failed_at + 30
    clock.now += 30
    retried = await take(restarted)
    assert (retried.attempts, retried.first_failure_at, retried.last_error) == (
        1,
        failed_at,
        "gateway 503",
    )
    await restarted.retry(retried, clock.now + 60, "gateway 502")
    clock.now += 60
    again = await take(restarted)
    assert (again.attempts, again.first_failure_at, again.last_error) == (
        2,
        failed_at,
        "gateway 502",
    )


async def test_an_expired_lease_is_taken_over(make_queue: QueueFactory, clock: Clock) -> None:
    crashed = await make_queue(instance_id="crashed", lease_seconds=60)
    await crashed.add([entry(clock)])
    leased = await take(crashed)
    survivor = await make_queue(instance_id="survivor", lease_seconds=60)
    assert survivor.next_due_at() == clock.now + 60
    clock.now += 60
    assert (await take(survivor)).mid == leased.mid


async def test_a_live_lease_is_respected(make_queue: QueueFactory, clock: Clock) -> None:
    first = await make_queue(instance_id="first", lease_seconds=60)
    second = await make_queue(instance_id="second", lease_seconds=60)
    await first.add([entry(clock)])
    await second.load()
    leased = await take(first)
    async with anyio.create_task_group() as tg:
        tg.start_soon(second.next_due)
        await wait_until(lambda: second.next_due_at() == clock.now + 60)
        tg.cancel_scope.cancel()
    await first.done(leased)
    await second.load()
    assert len(second) == 0


async def test_a_released_entry_can_be_taken_at_once_by_any_instance(
    make_queue: QueueFactory, clock: Clock
) -> None:
    stopping = await make_queue(instance_id="stopping")
    await stopping.add([entry(clock)])
    interrupted = await take(stopping)
    await stopping.release(interrupted)
    other = await make_queue(instance_id="other")
    assert other.next_due_at() == stopping.next_due_at() == interrupted.due_at
    assert await take(other) == interrupted


async def test_two_instances_never_deliver_an_entry_twice(
    make_queue: QueueFactory, clock: Clock
) -> None:
    queues = [await make_queue(instance_id="a"), await make_queue(instance_id="b")]
    delivered: list[tuple[str, str]] = []
    entries = [entry(clock, uid=f"u{i % 50}", age=i) for i in range(300)]

    async def consume(queue: Queue, name: str) -> None:
        while True:
            for taken in await queue.next_due(limit=7):
                delivered.append((name, taken.mid))
                await queue.done(taken)

    async with anyio.create_task_group() as tg:
        for queue, name in zip(queues, "ab", strict=True):
            await tg.start(queue.follow)
            tg.start_soon(consume, queue, name)
        await queues[0].add(entries[:150])
        await queues[1].add(entries[150:])
        await wait_until(lambda: len(delivered) >= len(entries))
        tg.cancel_scope.cancel()
    mids = [mid for _, mid in delivered]
    assert sorted(mids) == sorted(e.mid for e in entries)
    assert {name for name, _ in delivered} == {"a", "b"}


async def test_follow_sees_what_another_instance_adds(
    make_queue: QueueFactory, clock: Clock
) -> None:
    writer = await make_queue(instance_id="writer")
    follower = await make_queue(instance_id="follower")
    async with anyio.create_task_group() as tg:
        await tg.start(follower.follow)
        await writer.add([entry(clock, due_in=30), entry(clock, uid="u2", due_in=40)])
        await wait_until(lambda: len(follower) == 2)
        assert follower.next_due_at() == clock.now + 30
        tg.cancel_scope.cancel()


async def test_an_entry_another_instance_delivered_leaves_the_schedule_at_its_lease_end(
    make_queue: QueueFactory, clock: Clock
) -> None:
    """Deletes are not followed (one per push): the refused lease removes the entry."""
    writer = await make_queue(instance_id="writer")
    follower = await make_queue(instance_id="follower")
    lease = QueueConfig().lease_seconds
    async with anyio.create_task_group() as tg:
        await tg.start(follower.follow)
        await writer.add([entry(clock)])  # due now: inserted leased to the writer
        await wait_until(lambda: len(follower) == 1)
        assert follower.next_due_at() == clock.now + lease
        await writer.done(await take(writer))
        clock.now += lease
        with anyio.move_on_after(2):
            await follower.next_due()
        assert len(follower) == 0
        tg.cancel_scope.cancel()


@pytest.fixture
async def stalled_queue(
    mongo_uri: str, collection: AsyncCollection[Doc], clock: Clock
) -> AsyncIterator[Queue]:
    """Instance "a" over a client of its own, for `failing_commands(appName="stalled")`."""
    client: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_uri, appName="stalled")
    yield await queue_a(client[collection.database.name], collection, clock)
    await client.close()


async def wait_leased(collection: AsyncCollection[Doc], owner: str, count: int) -> None:
    """Until `count` entries are leased to `owner`, seen from outside the queue."""
    with anyio.fail_after(30):
        while await collection.count_documents({"owner": owner}) < count:  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def assert_free_to_take(queue: Queue, entries: list[Entry], now: float) -> None:
    assert queue.next_due_at() == now  # not after a lease left behind
    with anyio.fail_after(30):
        taken = await queue.next_due(limit=10)
    assert sorted(e.mid for e in taken) == sorted(e.mid for e in entries)


async def test_an_interrupted_lease_leaves_the_entries_free_to_take(
    stalled_queue: Queue,
    make_queue: QueueFactory,
    clock: Clock,
    mongo: AsyncMongoClient[Doc],
    collection: AsyncCollection[Doc],
) -> None:
    """Cancelled between the lease write and its read-back (shutdown at the worst
    moment): the leases are given back, so another instance need not wait them out."""
    queued = [entry(clock, due_in=1), entry(clock, uid="u2", due_in=1)]
    await stalled_queue.add(queued)  # due later: not queued leased, so taking needs a lease
    clock.now += 1
    # Long enough to see the lease written; turning the fail point off waits it out.
    stall = {"failCommands": ["find"], "blockConnection": True, "blockTimeMS": 3_000}
    async with (
        failing_commands(mongo, appName="stalled", **stall),
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(functools.partial(stalled_queue.next_due, limit=10))
        await wait_leased(collection, "a", 2)  # the lease write
        tg.cancel_scope.cancel()
    await assert_free_to_take(await make_queue(instance_id="other"), queued, clock.now)


async def test_an_insert_landing_after_its_add_was_cancelled_is_freed_at_a_clean_stop(
    stalled_queue: Queue,
    make_queue: QueueFactory,
    clock: Clock,
    mongo: AsyncMongoClient[Doc],
    collection: AsyncCollection[Doc],
) -> None:
    """Shutdown cancels the add while its insert is on the wire: the entries land
    leased to this instance all the same, and the clean stop must free them."""
    queued = [entry(clock), entry(clock, uid="u2")]
    stall = {"failCommands": ["insert"], "blockConnection": True, "blockTimeMS": 500}
    async with failing_commands(mongo, appName="stalled", **stall):
        with anyio.move_on_after(0.2):
            await stalled_queue.add(queued)
        await wait_leased(collection, "a", 2)  # the insert landing
    await stalled_queue.release_owned()
    await assert_free_to_take(await make_queue(instance_id="other"), queued, clock.now)


async def test_a_batch_lease_takes_what_is_free_and_places_the_rest_at_lease_expiry(
    make_queue: QueueFactory, clock: Clock
) -> None:
    ours = await make_queue(instance_id="a")
    entries = [entry(clock, uid=f"u{i}", due_in=1, age=10 - i) for i in range(5)]
    await ours.add(entries)  # due later: not queued leased, free for either instance
    clock.now += 1
    theirs = await make_queue(instance_id="b")
    assert await take(theirs) == entries[0]
    taken = await ours.next_due(limit=10)
    assert taken == entries[1:]
    assert ours.next_due_at() == clock.now + QueueConfig().lease_seconds


async def test_a_malformed_queue_document_is_skipped(
    make_queue: QueueFactory, clock: Clock, collection: AsyncCollection[Doc]
) -> None:
    await collection.insert_one({"_id": "broken", "uid": 5, "due_at": "soon"})
    queue = await make_queue()
    good = entry(clock)
    await queue.add([good])
    assert len(queue) == 1
    assert await deliver_all(queue, 1) == [good.mid]


async def test_a_burst_of_10000_entries_is_durable_and_ordered(
    make_queue: QueueFactory, clock: Clock, collection: AsyncCollection[Doc]
) -> None:
    """Durable after each add; a restart sees all; the head comes out in order; many
    concurrent consumers of one instance take each entry once (a sample: each
    delivery costs two journaled writes, about a millisecond each)."""
    queue = await make_queue()
    entries = [
        entry(clock, uid=f"u{i}", rid=f"r{i % 7}", due_in=(i * 37) % 101, age=(i * 13) % 17)
        for i in range(10_000)
    ]
    for start in range(0, len(entries), 1000):
        await queue.add(entries[start : start + 1000])
    assert await collection.count_documents({}) == 10_000
    await queue.release_owned()  # a clean stop
    restarted = await make_queue(instance_id="b")
    assert len(restarted) == 10_000
    clock.now += 101
    expected = [e.mid for e in sorted(entries, key=lambda e: (e.due_at, e.created_at, e.id))]
    assert await deliver_all(restarted, 100) == expected[:100]
    delivered: list[str] = []
    enough = anyio.Event()

    async def consume() -> None:
        while True:
            for taken in await restarted.next_due(limit=5):
                delivered.append(taken.mid)
                await restarted.done(taken)
            if len(delivered) >= 1_900:
                enough.set()

    async with anyio.create_task_group() as tg:
        for _ in range(32):
            tg.start_soon(consume)
        with anyio.fail_after(30):
            await enough.wait()
        tg.cancel_scope.cancel()
    assert len(set(delivered)) == len(delivered)
    assert set(delivered) <= set(expected[100:])


@asynccontextmanager
async def rebuilding(queue: Queue, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[anyio.Event]:
    """The schedule's rebuild from the collection (as after the follower lost its
    stream), its scan read at once but handed over only once the yielded event is
    set: the window a scan of many batches leaves open to the takers."""
    store = queue._store  # the one seam that can hold a real scan's answer back
    scan = store.scan
    read, finish = anyio.Event(), anyio.Event()

    async def held_back_scan() -> AsyncIterator[Doc]:
        docs = [doc async for doc in scan()]
        read.set()
        await finish.wait()
        for doc in docs:
            yield doc

    monkeypatch.setattr(store, "scan", held_back_scan)
    async with anyio.create_task_group() as tg:
        tg.start_soon(queue._reload)
        await read.wait()
        yield finish
        finish.set()
    monkeypatch.setattr(store, "scan", scan)


async def test_a_rebuild_does_not_schedule_again_an_entry_taken_meanwhile(
    make_queue: QueueFactory, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await make_queue()
    await queue.add([entry(clock)])
    async with rebuilding(queue, monkeypatch):  # the scan saw the entry free
        taken = await take(queue)
    assert queue.next_due_at() is None  # not handed out a second time
    await queue.done(taken)
    assert len(queue) == 0


async def test_a_rebuild_keeps_entries_given_back_or_added_meanwhile(
    make_queue: QueueFactory, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await make_queue()
    await queue.add([entry(clock)])
    taken = await take(queue)
    added = entry(clock, uid="u2")
    async with rebuilding(queue, monkeypatch):  # the scan saw the first entry held
        await queue.release(taken)
        await queue.add([added])
    assert sorted(e.mid for e in await queue.next_due(limit=5)) == sorted([taken.mid, added.mid])


async def test_entries_already_in_the_collection_but_not_scheduled_are_scheduled_by_add(
    make_queue: QueueFactory, clock: Clock
) -> None:
    """An insert applied though it reported an error: the batch is handled again, its
    entries are duplicates, and still they must come out."""
    queue, applied_before = await make_queue(), await make_queue()
    entries = [entry(clock), entry(clock, uid="u2", due_in=5)]
    await applied_before.add(entries)  # the same instance id: its own, leased to it
    await queue.add(entries)
    clock.now += 5
    with anyio.fail_after(30):
        taken = await queue.next_due(limit=5)
    assert sorted(e.mid for e in taken) == sorted(e.mid for e in entries)
