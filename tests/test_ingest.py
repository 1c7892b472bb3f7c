"""Message batches become queue entries in writes of bounded size."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.database import Database

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


class RecordingQueue(Queue):
    """The real queue, noting the size of each write it is asked for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writes: list[int] = []

    async def add(self, entries: Sequence[Entry]) -> None:
        self.writes.append(len(entries))
        await super().add(entries)


async def test_a_batch_fanning_out_widely_is_queued_in_bounded_writes(
    db: AsyncDatabase[Doc], sync_db: Database[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of busy rooms' messages fans out to hundreds of thousands of entries in
    production: they must not all be held in memory for one write."""
    monkeypatch.setattr(ingest, "ADD_CHUNK", 25)
    world = World(sync_db)
    world.add_offline_members(9)  # with bob, ten recipients per channel message
    config = Config()
    directory = CachedDirectory(db, db["streamer_state"], fallback=DatabaseDirectory(db))
    await directory.load()
    queue = RecordingQueue(db["streamer_queue"], config.queue, instance_id="a")
    await queue.load()
    now = time.time()
    batch = [
        MessageInserted(Message.from_doc(f.message(world.channel, world.alice, f"hi {n}")), now)
        for n in range(6)
    ]
    await Ingest(directory, queue, config).on_messages(batch)
    assert sum(queue.writes) == 60 == await db["streamer_queue"].count_documents({})
    assert len(queue.writes) > 1 and max(queue.writes) < 25 + 10  # a chunk and one message
