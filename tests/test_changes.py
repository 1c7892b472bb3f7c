"""What change documents mean, read batch by batch as the streams hand them over.

The change documents are written as MongoDB's change streams deliver them
(`updateLookup`: the document as it is when the event is read, which may be
later than the event). The directory is a real `CachedDirectory`, seeded
without queries.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from streamer.model import SUBSCRIPTIONS, USERS, User
from streamer.sources.cache import CachedDirectory
from streamer.sources.changes import change_time, presence_changes, subscription_reads
from streamer.sources.events import RoomRead, ThreadRead
from tests import factories as f
from tests.test_sources import directory_for

pytestmark = pytest.mark.anyio
Doc = dict[str, Any]
ALICE = f.user("alice", status="online")
GENERAL = f.room("GENERAL")


def update(collection: str, doc: Doc, fields: Doc, looked_up: Doc | None = None) -> Doc:
    """An update event setting `fields`; `looked_up` is the document as read later."""
    return {
        "operationType": "update",
        "ns": {"db": "rocketchat", "coll": collection},
        "documentKey": {"_id": doc["_id"]},
        "updateDescription": {"updatedFields": fields, "removedFields": []},
        "fullDocument": looked_up if looked_up is not None else {**doc, **fields},
        "wallTime": f.utcnow(),
    }


async def seeded(db: AsyncDatabase[Doc]) -> CachedDirectory:
    directory = directory_for(db)
    directory.user_changed(User.from_doc(ALICE))
    return directory


async def test_a_status_already_in_an_earlier_lookup_still_reports_its_change(
    db: AsyncDatabase[Doc],
) -> None:
    """Alice renames herself, then goes away; the rename is read after both, so its
    looked-up document already says away: the cache must not take that status early."""
    later = {**ALICE, "name": "Alice B.", "status": "away"}
    rename = update(USERS, ALICE, {"name": "Alice B."}, looked_up=later)
    away = update(USERS, ALICE, {"status": "away"}, looked_up=later)
    directory = await seeded(db)
    in_one_batch, learned = presence_changes(directory, [rename, away])
    assert [(c.status, c.previous) for c in in_one_batch] == [("away", "online")]
    learned.apply(directory)
    assert directory.presence(ALICE["_id"]) == "away"

    directory = await seeded(db)
    first, learned = presence_changes(directory, [rename])
    learned.apply(directory)
    assert first == []
    assert directory.presence(ALICE["_id"]) == "online"  # the rename says nothing of it
    second, _ = presence_changes(directory, [away])
    assert [(c.status, c.previous) for c in second] == [("away", "online")]


async def test_a_batch_read_again_reports_the_same_presence_changes(
    db: AsyncDatabase[Doc],
) -> None:
    """Its handler failed (MongoDB away), so the stream reads the batch again."""
    directory = await seeded(db)
    away = update(USERS, ALICE, {"status": "away"})
    first, _ = presence_changes(directory, [away])  # never applied: the handler failed
    again, learned = presence_changes(directory, [away])
    assert first == again != []
    learned.apply(directory)
    assert presence_changes(directory, [away])[0] == []


async def test_a_batch_read_again_reports_the_same_thread_reads(db: AsyncDatabase[Doc]) -> None:
    subscription = f.subscription(ALICE, GENERAL, tunread=["t1", "t2"])
    directory = await seeded(db)
    directory.remember_tunread(subscription["_id"], ("t1", "t2"))
    read_t1 = update(SUBSCRIPTIONS, subscription, {"tunread": ["t2"]})
    first, _ = subscription_reads(directory, [read_t1])
    again, learned = subscription_reads(directory, [read_t1])
    assert first == again == [ThreadRead(ALICE["_id"], "GENERAL", "t1", change_time(read_t1))]
    learned.apply(directory)
    assert directory.previous_tunread(subscription["_id"]) == ("t2",)


async def test_mark_as_unread_is_no_read(db: AsyncDatabase[Doc]) -> None:
    """Rocket.Chat's "mark as unread" sets `ls` back to an older message's time, with
    `alert` true; read as a read, it cleared the user's whole queue."""
    subscription = f.subscription(ALICE, GENERAL)
    directory = await seeded(db)
    older = f.utcnow() - dt.timedelta(hours=1)
    unread = update(SUBSCRIPTIONS, subscription, {"open": True, "alert": True, "ls": older})
    read = update(SUBSCRIPTIONS, subscription, {"alert": False, "unread": 0, "ls": f.utcnow()})
    reads, _ = subscription_reads(directory, [unread, read])
    assert reads == [RoomRead(ALICE["_id"], "GENERAL", change_time(read))]


async def test_a_thread_read_after_none_was_unread_is_seen(db: AsyncDatabase[Doc]) -> None:
    """`tunread` emptied, then one thread added (reported as `tunread.0`) and read before
    the stream looked the document up: "none unread" must be remembered to see it."""
    subscription = f.subscription(ALICE, GENERAL, tunread=["t1"])
    directory = await seeded(db)
    directory.remember_tunread(subscription["_id"], ("t1",))
    emptied = update(SUBSCRIPTIONS, subscription, {"tunread": []})
    added = update(
        SUBSCRIPTIONS, subscription, {"tunread.0": "t2"}, looked_up={**subscription, "tunread": []}
    )
    read = update(SUBSCRIPTIONS, subscription, {"tunread": []})
    found = []
    for change in (emptied, added, read):
        reads, learned = subscription_reads(directory, [change])
        learned.apply(directory)
        found += [r.tmid for r in reads if isinstance(r, ThreadRead)]
    assert found == ["t1", "t2"]
