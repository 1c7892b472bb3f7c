"""Each change stream turns Rocket.Chat's writes into the right typed events, in batches."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from bson import Timestamp
from prometheus_client import REGISTRY
from pymongo.asynchronous.database import AsyncDatabase
from structlog.testing import capture_logs

from streamer.config import Config
from streamer.directory import DatabaseDirectory
from streamer.model import MESSAGES, PUSH_TOKENS, SETTINGS, SUBSCRIPTIONS, USERS
from streamer.sources.cache import CachedDirectory
from streamer.sources.changes import tunread_after
from streamer.sources.events import MessageInserted, PresenceChanged, RoomRead, ThreadRead
from streamer.sources.streams import Lag, Sources, StreamTuning
from tests import factories as f

pytestmark = pytest.mark.anyio
Doc = dict[str, Any]
STATE = "streamer_state"
#: Short waits so tests (and their cancellation) are quick; tokens saved on every batch.
FAST = StreamTuning(
    max_await=0.1, idle_save_interval=0.0, reconnect_initial=0.05, reconnect_max=0.5
)
CONFIG = Config()
ALICE, BOB = f.user("alice", status="online"), f.user("bob", status="online")
GENERAL = f.room("GENERAL")


async def wait_until(condition: Callable[[], bool], within: float = 15.0) -> None:
    """Poll a condition that a change stream (another task) will make true."""
    deadline = anyio.current_time() + within
    while not condition():
        if anyio.current_time() > deadline:
            raise TimeoutError(f"condition not met within {within} s")
        await anyio.sleep(0.02)


class Recorder:
    """Stands in for the next stage: records each handler call (one per batch)."""

    def __init__(self) -> None:
        self.message_calls: list[Sequence[MessageInserted]] = []
        self.reads: list[RoomRead | ThreadRead] = []
        self.presence: list[PresenceChanged] = []
        #: While set, on_messages waits for it: the handler is "busy".
        self.hold: anyio.Event | None = None

    @property
    def messages(self) -> list[str]:
        return [event.message.id for call in self.message_calls for event in call]

    async def on_messages(self, events: Sequence[MessageInserted]) -> None:
        self.message_calls.append(events)
        if self.hold is not None:
            await self.hold.wait()

    async def on_reads(self, events: Sequence[RoomRead | ThreadRead]) -> None:
        self.reads.extend(events)

    async def on_presence(self, events: Sequence[PresenceChanged]) -> None:
        self.presence.extend(events)


def directory_for(db: AsyncDatabase[Doc]) -> CachedDirectory:
    return CachedDirectory(db, db[STATE], fallback=DatabaseDirectory(db))


@asynccontextmanager
async def running(
    db: AsyncDatabase[Doc],
    recorder: Recorder,
    directory: CachedDirectory | None = None,
    config: Config = CONFIG,
    tuning: StreamTuning = FAST,
) -> AsyncIterator[Sources]:
    """Sources over `db` until the block ends; entered once every stream is open."""
    directory = directory or directory_for(db)
    await directory.load()
    sources = Sources(
        db, config, directory, recorder.on_messages, recorder.on_reads, recorder.on_presence, tuning
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(sources.run)
        await wait_until(lambda: sources.ready)
        yield sources
        tg.cancel_scope.cancel()


async def test_an_insert_is_one_typed_message_event(db: AsyncDatabase[Doc]) -> None:
    recorder = Recorder()
    doc = f.message(GENERAL, ALICE, "hi @bob", mentions=[f.mention(BOB)], attachments=[{"x": 1}])
    async with running(db, recorder):
        await db[MESSAGES].insert_one(doc)
        await wait_until(lambda: len(recorder.messages) == 1)
    event = recorder.message_calls[0][0]
    assert event.message.id == doc["_id"]
    assert (event.message.rid, event.message.sender.id, event.message.text) == (
        "GENERAL",
        ALICE["_id"],
        "hi @bob",
    )
    assert event.message.mentions[0].id == BOB["_id"]
    assert event.message.has_attachments
    assert event.cluster_time == pytest.approx(dt.datetime.now(dt.UTC).timestamp(), abs=30)


async def test_message_updates_and_deletes_are_not_events(db: AsyncDatabase[Doc]) -> None:
    recorder = Recorder()
    first, second = f.message(GENERAL, ALICE, "one"), f.message(GENERAL, ALICE, "two")
    async with running(db, recorder):
        await db[MESSAGES].insert_one(first)
        await db[MESSAGES].update_one({"_id": first["_id"]}, {"$set": {"msg": "edited"}})
        await db[MESSAGES].delete_one({"_id": first["_id"]})
        await db[MESSAGES].insert_one(second)
        await wait_until(lambda: second["_id"] in recorder.messages)
    assert recorder.messages == [first["_id"], second["_id"]]


async def test_user_changes_come_trimmed_so_login_tokens_never_reach_the_daemon(
    db: AsyncDatabase[Doc],
) -> None:
    recorder = Recorder()
    sources = Sources(
        db, CONFIG, directory_for(db), recorder.on_messages, recorder.on_reads,
        recorder.on_presence, FAST,
    )  # fmt: skip
    (stream,) = [stream for stream in sources.streams if stream.collection is None]
    secrets = {"resume": {"loginTokens": [{"hashedToken": "secret"}]}}
    eve = f.user("eve", status="online", services=secrets, __rooms=["GENERAL"])
    async with await db.watch(stream.pipeline, full_document="updateLookup") as changes:
        await db[USERS].insert_one(eve)
        await db[USERS].update_one({"_id": eve["_id"]}, {"$set": {"status": "away"}})
        inserted, updated = [await changes.next() for _ in range(2)]
    for change in (inserted, updated):
        assert change["fullDocument"]["username"] == "eve"
        assert "services" not in change["fullDocument"]
        assert "__rooms" not in change["fullDocument"]
    assert updated["fullDocument"]["status"] == "away"


async def test_a_backlog_arrives_in_few_handler_calls(db: AsyncDatabase[Doc]) -> None:
    """While the handler is busy nothing more is read; then the backlog comes as batches."""
    recorder = Recorder()
    recorder.hold = anyio.Event()
    backlog = [f.message(GENERAL, ALICE, f"m{i}") for i in range(300)]
    async with running(db, recorder):
        await db[MESSAGES].insert_one(f.message(GENERAL, ALICE, "first"))
        await wait_until(lambda: len(recorder.message_calls) == 1)
        await db[MESSAGES].insert_many(backlog)
        assert len(recorder.message_calls) == 1
        recorder.hold.set()
        await wait_until(lambda: len(recorder.messages) == 301)
    assert len(recorder.message_calls) <= 4
    assert recorder.messages[1:] == [doc["_id"] for doc in backlog]


async def test_malformed_messages_are_logged_and_skipped(db: AsyncDatabase[Doc]) -> None:
    recorder = Recorder()
    no_room = {**f.message(GENERAL, ALICE), "rid": None}
    bad_time = {**f.message(GENERAL, ALICE), "ts": "yesterday"}
    good = f.message(GENERAL, ALICE, "fine")
    async with running(db, recorder):
        with capture_logs() as logs:
            await db[MESSAGES].insert_many([no_room, bad_time, good])
            await wait_until(lambda: good["_id"] in recorder.messages)
    assert recorder.messages == [good["_id"]]
    skipped = {line["mid"] for line in logs if line["event"] == "malformed_document"}
    assert skipped == {no_room["_id"], bad_time["_id"]}  # found by a search on its mid


async def test_reading_a_room_is_a_room_read(db: AsyncDatabase[Doc]) -> None:
    recorder = Recorder()
    sub = f.subscription(ALICE, GENERAL, unread=3)
    await db[SUBSCRIPTIONS].insert_one(sub)
    seen = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
    async with running(db, recorder):
        await db[SUBSCRIPTIONS].update_one(
            {"_id": sub["_id"]}, {"$set": {"ls": seen, "unread": 0, "alert": False}}
        )
        await wait_until(lambda: len(recorder.reads) == 1)
    [read] = recorder.reads
    assert isinstance(read, RoomRead) and (read.uid, read.rid) == (ALICE["_id"], "GENERAL")
    assert abs(read.at - time.time()) < 60  # the change's time, not the `ls` it set


async def test_zeroing_unread_is_a_room_read_and_new_unread_is_not(
    db: AsyncDatabase[Doc],
) -> None:
    recorder = Recorder()
    sub = f.subscription(ALICE, GENERAL, unread=0)
    await db[SUBSCRIPTIONS].insert_one(sub)
    async with running(db, recorder):
        await db[SUBSCRIPTIONS].update_one({"_id": sub["_id"]}, {"$inc": {"unread": 2}})
        await db[SUBSCRIPTIONS].update_one({"_id": sub["_id"]}, {"$set": {"unread": 0}})
        await wait_until(lambda: len(recorder.reads) == 1)
    assert [(type(r), r.uid, r.rid) for r in recorder.reads] == [
        (RoomRead, ALICE["_id"], "GENERAL")
    ]


async def test_pulling_from_tunread_is_a_thread_read(db: AsyncDatabase[Doc]) -> None:
    recorder = Recorder()
    sub = f.subscription(ALICE, GENERAL, tunread=["t1", "t2"])
    await db[SUBSCRIPTIONS].insert_one(sub)
    async with running(db, recorder):
        await db[SUBSCRIPTIONS].update_one({"_id": sub["_id"]}, {"$pull": {"tunread": "t1"}})
        await wait_until(lambda: len(recorder.reads) == 1)
    [read] = recorder.reads
    assert read == ThreadRead(uid=ALICE["_id"], rid="GENERAL", tmid="t1", at=read.at)


async def test_a_thread_added_while_running_can_be_read(db: AsyncDatabase[Doc]) -> None:
    """`tunread` learned from the stream itself: a `$push` reported per element, then a pull."""
    recorder = Recorder()
    many = [f"thread-{i:03d}-with-a-long-enough-id" for i in range(40)]
    sub = f.subscription(ALICE, GENERAL)
    async with running(db, recorder):
        await db[SUBSCRIPTIONS].insert_one(sub)
        await db[SUBSCRIPTIONS].update_one({"_id": sub["_id"]}, {"$set": {"tunread": many}})
        await db[SUBSCRIPTIONS].update_one({"_id": sub["_id"]}, {"$push": {"tunread": "late"}})
        await db[SUBSCRIPTIONS].update_one({"_id": sub["_id"]}, {"$pull": {"tunread": "late"}})
        await db[SUBSCRIPTIONS].update_one({"_id": sub["_id"]}, {"$unset": {"tunread": 1}})
        await wait_until(lambda: len(recorder.reads) == 41)
    first = recorder.reads[0]
    assert first == ThreadRead(uid=ALICE["_id"], rid="GENERAL", tmid="late", at=first.at)
    assert {read.tmid for read in recorder.reads[1:]} == set(many)  # type: ignore[union-attr]


async def test_status_changes_are_presence_events(db: AsyncDatabase[Doc]) -> None:
    recorder = Recorder()
    await db[USERS].insert_one(ALICE)
    async with running(db, recorder):
        await db[USERS].update_one({"_id": ALICE["_id"]}, {"$set": {"status": "away"}})
        await db[USERS].update_one({"_id": ALICE["_id"]}, {"$set": {"lastLogin": f.utcnow()}})
        await db[USERS].update_one({"_id": ALICE["_id"]}, {"$set": {"status": "offline"}})
        await wait_until(lambda: len(recorder.presence) == 2)
    away, offline = recorder.presence
    assert (away.uid, away.status, away.previous) == (ALICE["_id"], "away", "online")
    assert (offline.status, offline.previous) == ("offline", "away")
    assert away.at <= offline.at


async def test_away_since_survives_a_restart(db: AsyncDatabase[Doc]) -> None:
    recorder = Recorder()
    await db[USERS].insert_one(ALICE)
    async with running(db, recorder):
        await db[USERS].update_one({"_id": ALICE["_id"]}, {"$set": {"status": "away"}})
        await wait_until(lambda: len(recorder.presence) == 1)
    restarted = directory_for(db)
    await restarted.load()
    assert restarted.away_since(ALICE["_id"]) == recorder.presence[0].at


async def test_an_unknown_status_is_logged_and_the_stream_goes_on(db: AsyncDatabase[Doc]) -> None:
    recorder = Recorder()
    await db[USERS].insert_many([ALICE, BOB])
    async with running(db, recorder):
        with capture_logs() as logs:
            await db[USERS].update_one({"_id": ALICE["_id"]}, {"$set": {"status": "dnd"}})
            await db[USERS].update_one({"_id": BOB["_id"]}, {"$set": {"status": "busy"}})
            await wait_until(lambda: len(recorder.presence) == 1)
    assert recorder.presence[0].uid == BOB["_id"]
    assert [line["doc_id"] for line in logs if line["event"] == "malformed_document"] == [
        ALICE["_id"]
    ]


async def test_setting_changes_reach_the_cached_settings(db: AsyncDatabase[Doc]) -> None:
    await db[SETTINGS].insert_many(f.default_settings())
    directory = directory_for(db)
    async with running(db, Recorder(), directory):
        assert (await directory.settings()).push_enable
        await db[SETTINGS].update_one({"_id": "Push_enable"}, {"$set": {"value": False}})
        await db[SETTINGS].delete_one({"_id": "Notifications_Max_Room_Members"})
        await db[SETTINGS].update_one({"_id": "Site_Name"}, {"$set": {"value": "Renamed"}})
        await db[SETTINGS].insert_one(f.setting("UI_Use_Real_Name", True))
        await settle(directory.settings, lambda settings: settings.use_real_name)
    settings = await directory.settings()
    assert (settings.push_enable, settings.site_name) == (False, "Renamed")
    assert settings.max_room_members == 100


async def test_token_changes_reach_the_cached_devices(db: AsyncDatabase[Doc]) -> None:
    directory = directory_for(db)
    token = f.push_token(ALICE, "apn")
    async with running(db, Recorder(), directory):
        assert await directory.devices([ALICE["_id"]]) == {}
        await db[PUSH_TOKENS].insert_one(token)
        await settle(lambda: directory.devices([ALICE["_id"]]), lambda found: bool(found))
        await db[PUSH_TOKENS].delete_one({"_id": token["_id"]})
        await settle(lambda: directory.devices([ALICE["_id"]]), lambda found: not found)


async def test_membership_and_preference_changes_reach_cached_rooms(
    db: AsyncDatabase[Doc],
) -> None:
    directory = directory_for(db)
    alice_sub, bob_sub = f.subscription(ALICE, GENERAL), f.subscription(BOB, GENERAL)
    await db[SUBSCRIPTIONS].insert_one(alice_sub)
    async with running(db, Recorder(), directory):
        assert [s.uid for s in await directory.subscriptions("GENERAL")] == [ALICE["_id"]]
        await db[SUBSCRIPTIONS].insert_one(bob_sub)
        await db[SUBSCRIPTIONS].update_one(
            {"_id": alice_sub["_id"]}, {"$set": {"mobilePushNotifications": "nothing"}}
        )
        await settle(
            lambda: directory.subscription(ALICE["_id"], "GENERAL"),
            lambda sub: sub is not None and sub.mobile_push == "nothing",
        )
        await settle(lambda: directory.subscriptions("GENERAL"), lambda subs: len(subs) == 2)
        await db[SUBSCRIPTIONS].delete_one({"_id": alice_sub["_id"]})
        await settle(
            lambda: directory.subscriptions("GENERAL"),
            lambda subs: [s.uid for s in subs] == [BOB["_id"]],
        )


async def settle(lookup: Callable[[], Any], done: Callable[[Any], bool]) -> None:
    """Wait until an async lookup's answer satisfies `done` (a stream updates it meanwhile)."""
    deadline = anyio.current_time() + 15
    while not done(await lookup()):
        if anyio.current_time() > deadline:
            raise TimeoutError("the cached answer did not change within 15 s")
        await anyio.sleep(0.02)


@pytest.mark.parametrize(
    ("description", "after"),
    [
        ({"updatedFields": {"tunread": ["t1", 7]}}, ("t1",)),
        ({"updatedFields": {}, "removedFields": ["tunread"]}, ()),
        ({"updatedFields": {"tunread.2": "t3"}}, ("t1", "t2", "t3")),
        ({"updatedFields": {"tunread.0": "t9"}}, ("t9", "t2")),
        ({"updatedFields": {}, "truncatedArrays": [{"field": "tunread", "newSize": 1}]}, ("t1",)),
        ({"updatedFields": {"unread": 0}}, None),
    ],
)
def test_tunread_after_each_form_mongodb_reports(
    description: dict[str, Any], after: tuple[str, ...] | None
) -> None:
    assert tunread_after(("t1", "t2"), description) == after


def test_tunread_after_an_element_change_is_unknown_without_the_previous_value() -> None:
    assert tunread_after(None, {"updatedFields": {"tunread.2": "t3"}}) is None


async def test_the_lag_grows_while_a_batch_is_being_handled(db: AsyncDatabase[Doc]) -> None:
    """Read at scrape time: a handler stuck on a batch shows a growing lag, not the
    value it had before it got stuck."""
    recorder = Recorder()
    recorder.hold = anyio.Event()
    async with running(db, recorder):
        await db[MESSAGES].insert_one(f.message(GENERAL, ALICE))
        await wait_until(lambda: len(recorder.messages) == 1)
        await wait_until(lambda: stream_lag("messages") >= 0.5)
        recorder.hold.set()
        await wait_until(lambda: stream_lag("messages") < 0.5)


def stream_lag(stream: str) -> float:
    return (
        REGISTRY.get_sample_value("streamer_change_stream_lag_seconds", {"stream": stream}) or 0.0
    )


def test_the_lag_grows_while_the_stream_is_down_and_is_nothing_when_caught_up() -> None:
    now = [1000.0]
    lag = Lag(clock=lambda: now[0])
    lag.handled([])
    now[0] += 30
    assert lag() == 0.0  # caught up at the last read, nothing since
    lag.handled([])  # an empty read every second or so, the last one now
    lag.interrupted()  # reconnecting
    now[0] += 30
    assert lag() == 30.0
    lag.handling([{"clusterTime": Timestamp(1050, 1)}])
    assert lag() == 10.0
    lag.handled([{"clusterTime": Timestamp(1055, 1)}])
    assert lag() == 5.0
