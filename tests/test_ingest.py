"""Message batches become queue entries in writes of bounded size."""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Sequence
from typing import Any, TypeVar

import pytest
from prometheus_client import REGISTRY
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.database import Database
from structlog.testing import capture_logs

from streamer import ingest
from streamer.config import Config
from streamer.directory import DatabaseDirectory
from streamer.ingest import Ingest
from streamer.model import Message
from streamer.queue import Entry, Queue
from streamer.sources.cache import CachedDirectory
from streamer.sources.events import MessageInserted
from tests import factories as f
from tests.world import World

pytestmark = pytest.mark.anyio
Doc = dict[str, Any]
Q = TypeVar("Q", bound=Queue)


class RecordingQueue(Queue):
    """The real queue, noting the size of each write it is asked for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writes: list[int] = []

    async def add(self, entries: Sequence[Entry]) -> None:
        self.writes.append(len(entries))
        await super().add(entries)


async def loaded(db: AsyncDatabase[Doc], queue_type: type[Q]) -> tuple[CachedDirectory, Q]:
    """The caches and the queue of instance "a", loaded as at start-up."""
    directory = CachedDirectory(db, db["streamer_state"], fallback=DatabaseDirectory(db))
    await directory.load()
    queue = queue_type(db["streamer_queue"], Config().queue, instance_id="a")
    await queue.load()
    return directory, queue


async def test_a_batch_fanning_out_widely_is_queued_in_bounded_writes(
    db: AsyncDatabase[Doc], sync_db: Database[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of busy rooms' messages fans out to hundreds of thousands of entries in
    production: they must not all be held in memory for one write."""
    monkeypatch.setattr(ingest, "ADD_CHUNK", 25)
    world = World(sync_db)
    world.add_offline_members(9)  # with bob, ten recipients per channel message
    config = Config()
    directory, queue = await loaded(db, RecordingQueue)
    now = time.time()
    batch = [
        MessageInserted(Message.from_doc(f.message(world.channel, world.alice, f"hi {n}")), now)
        for n in range(6)
    ]
    await Ingest(directory, queue, config).on_messages(batch)
    assert sum(queue.writes) == 60 == await db["streamer_queue"].count_documents({})
    assert len(queue.writes) > 1 and max(queue.writes) < 25 + 10  # a chunk and one message


async def test_a_message_is_judged_old_or_live_as_at_its_insert_not_when_it_is_read(
    db: AsyncDatabase[Doc], sync_db: Database[Doc]
) -> None:
    """After the daemon was down for minutes, the messages inserted meanwhile were live
    when inserted: they notify (late beats never). An import, whose timestamp was
    already old at its insert, still does not (SPEC §3's "old imports / replays")."""
    world = World(sync_db)
    config = Config()
    directory, queue = await loaded(db, Queue)
    now = time.time()
    while_down = f.message(world.dm, world.alice, "sent while the daemon was down")
    imported = f.message(world.dm, world.alice, "imported from elsewhere")
    while_down["ts"] = dt.datetime.fromtimestamp(now - 300, dt.UTC)
    imported["ts"] = dt.datetime.fromtimestamp(now - 600, dt.UTC)
    batch = [
        MessageInserted(Message.from_doc(while_down), cluster_time=now - 300),
        MessageInserted(Message.from_doc(imported), cluster_time=now - 300),
    ]
    await Ingest(directory, queue, config, clock=lambda: now).on_messages(batch)
    queued = {doc["mid"] async for doc in db["streamer_queue"].find()}
    assert queued == {while_down["_id"]}


async def test_an_entry_is_as_old_as_its_message_insert_not_its_reading(
    db: AsyncDatabase[Doc], sync_db: Database[Doc]
) -> None:
    """`[queue] max_age` is Rocket.Chat's queue TTL, counted from the message: after an
    outage, the messages inserted at its start must not get a fresh two hours."""
    world = World(sync_db)
    directory, queue = await loaded(db, Queue)
    now = time.time()
    early = f.message(world.dm, world.alice, "sent as the daemon went down")
    early["ts"] = dt.datetime.fromtimestamp(now - 3600, dt.UTC)
    batch = [MessageInserted(Message.from_doc(early), cluster_time=now - 3600)]
    await Ingest(directory, queue, Config(), clock=lambda: now).on_messages(batch)
    docs = await db["streamer_queue"].find().to_list()
    assert {doc["kind"] for doc in docs} == {"push", "email"}
    assert {doc["created_at"] for doc in docs} == {now - 3600}
    assert {doc["due_at"] for doc in docs} == {now}  # offline: delays run from the reading


async def test_entries_past_max_age_are_counted_not_queued(
    db: AsyncDatabase[Doc], sync_db: Database[Doc]
) -> None:
    """After an outage longer than `max_age`, the backlog would all be dropped when taken:
    an insert, a lease and a delete for each entry, for nothing."""
    world = World(sync_db)
    directory, queue = await loaded(db, Queue)
    now = time.time()
    late, fresh = (f.message(world.dm, world.alice, text) for text in ("late", "fresh"))
    late["ts"] = dt.datetime.fromtimestamp(now - 3 * 3600, dt.UTC)
    batch = [
        MessageInserted(Message.from_doc(late), cluster_time=now - 3 * 3600),
        MessageInserted(Message.from_doc(fresh), cluster_time=now),
    ]
    expired_before = REGISTRY.get_sample_value(
        "streamer_queue_dropped_total", {"reason": "expired"}
    )
    with capture_logs() as logs:
        await Ingest(directory, queue, Config(), clock=lambda: now).on_messages(batch)
    assert {doc["mid"] async for doc in db["streamer_queue"].find()} == {fresh["_id"]}
    expired = REGISTRY.get_sample_value("streamer_queue_dropped_total", {"reason": "expired"})
    assert (expired or 0) - (expired_before or 0) == 2  # the push and the email
    (line,) = [line for line in logs if line["event"] == "entries_expired_before_queued"]
    assert line["entries"] == 2 and line["oldest_message_age"] == 3 * 3600


class BuggyQueue(Queue):
    """The real queue with a bug met by one message's entries (see `_handle`'s replay)."""

    poison = ""

    async def add(self, entries: Sequence[Entry]) -> None:
        if any(entry.mid == self.poison for entry in entries):
            raise RuntimeError("a bug met by one message")
        await super().add(entries)


def decisions_counted() -> float:
    (family,) = [m for m in REGISTRY.collect() if m.name == "streamer_decisions"]
    return sum(sample.value for sample in family.samples)


async def test_a_batch_handed_on_again_change_by_change_counts_each_decision_once(
    db: AsyncDatabase[Doc], sync_db: Database[Doc]
) -> None:
    """A batch whose handler fails is handed on again change by change: the decisions
    made the first time were never queued, and must not be counted twice."""
    world = World(sync_db)
    world.add_offline_members(2)  # with bob and alice, four per channel message
    directory, queue = await loaded(db, BuggyQueue)
    messages = [f.message(world.channel, world.alice, text) for text in ("a", "poison", "b")]
    queue.poison = messages[1]["_id"]
    events = [MessageInserted(Message.from_doc(doc), time.time()) for doc in messages]
    ingest = Ingest(directory, queue, Config())
    before = decisions_counted()
    with pytest.raises(RuntimeError):
        await ingest.on_messages(events)
    for event in events:
        with contextlib.suppress(RuntimeError):
            await ingest.on_messages([event])
    # Two messages queued, two channels (push, email) for each of four members.
    assert decisions_counted() - before == 2 * 2 * 4
