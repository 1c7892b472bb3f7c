"""Durable resume: restarts lose and repeat nothing, lost history and lost servers are survived."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import anyio
import pytest
from bson import Timestamp
from prometheus_client import REGISTRY
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    AutoReconnect,
    ConnectionFailure,
    NotPrimaryError,
    PyMongoError,
)
from structlog.testing import capture_logs

from streamer import devmongo
from streamer.config import AppConfig, Config
from streamer.model import MESSAGES, SETTINGS, SUBSCRIPTIONS
from streamer.sources.events import MessageInserted
from streamer.sources.resume import Position, ResumeTokens
from tests import factories as f
from tests.failpoints import fail_commands
from tests.test_sources import (
    ALICE,
    CONFIG,
    FAST,
    GENERAL,
    STATE,
    Recorder,
    directory_for,
    running,
    settle,
    wait_until,
)

pytestmark = pytest.mark.anyio
Doc = dict[str, Any]
MESSAGES_TOKEN = "resume:default:messages"
CHANGE_STREAM_FATAL = 280


async def saved_token(db: AsyncDatabase[Doc], key: str = MESSAGES_TOKEN) -> Doc | None:
    doc = await db[STATE].find_one({"_id": key})
    return None if doc is None else doc["token"]


def sample(name: str, stream: str) -> float:
    return REGISTRY.get_sample_value(name, {"stream": stream}) or 0.0


async def test_a_restart_loses_nothing_and_repeats_nothing(db: AsyncDatabase[Doc]) -> None:
    before, during, after = (f.message(GENERAL, ALICE, text) for text in ("a", "b", "c"))
    first, second = Recorder(), Recorder()
    async with running(db, first):
        await db[MESSAGES].insert_one(before)
        await wait_until(lambda: first.messages == [before["_id"]])
    await db[MESSAGES].insert_one(during)
    async with running(db, second):
        await db[MESSAGES].insert_one(after)
        await wait_until(lambda: after["_id"] in second.messages)
    assert second.messages == [during["_id"], after["_id"]]


async def test_a_batch_whose_handler_was_cancelled_is_read_again(db: AsyncDatabase[Doc]) -> None:
    message = f.message(GENERAL, ALICE)
    stuck, second = Recorder(), Recorder()
    stuck.hold = anyio.Event()  # never set: shutdown catches the handler mid-batch
    async with running(db, stuck):
        await db[MESSAGES].insert_one(message)
        await wait_until(lambda: stuck.messages == [message["_id"]])
    async with running(db, second):
        await wait_until(lambda: second.messages == [message["_id"]])


async def test_a_quiet_streams_token_still_advances(db: AsyncDatabase[Doc]) -> None:
    """Writes elsewhere move the postBatchResumeToken of a collection nobody writes to."""
    async with running(db, Recorder()):
        await settle(lambda: saved_token(db), lambda token: token is not None)
        first = await saved_token(db)
        assert first is not None
        await db["elsewhere"].insert_one({"_id": "x"})
        await settle(lambda: saved_token(db), lambda token: token["_data"] > first["_data"])
    assert await db[MESSAGES].count_documents({}) == 0


async def token_after(db: AsyncDatabase[Doc], collection: str, doc: Doc) -> Doc:
    """The resume token of inserting `doc`, as that collection's own stream saw it."""
    async with await db[collection].watch() as stream:
        await db[collection].insert_one(doc)
        change = await stream.next()
    token: Doc = change["_id"]
    return token


async def test_the_tokens_of_one_stream_per_collection_are_carried_over(
    db: AsyncDatabase[Doc],
) -> None:
    """An upgrade from a version with a stream per collection: the database-wide stream
    resumes after the oldest of the tokens it replaces (the others' changes since are
    handled again: idempotent), then drops them."""
    subscription = f.subscription(ALICE, GENERAL, unread=3)
    oldest = await token_after(db, SUBSCRIPTIONS, subscription)
    read = {"$set": {"ls": dt.datetime.now(dt.UTC), "unread": 0}}
    await db[SUBSCRIPTIONS].update_one({"_id": subscription["_id"]}, read)
    newer = await token_after(db, SETTINGS, {"_id": "Push_enable", "value": True})
    legacy = {"resume:default:subscriptions": oldest, "resume:default:settings": newer}
    await db[STATE].insert_many([{"_id": key, "token": token} for key, token in legacy.items()])
    recorder = Recorder()
    async with running(db, recorder):
        await wait_until(lambda: [r.uid for r in recorder.reads] == [ALICE["_id"]])
        await settle(
            lambda: db[STATE].count_documents({"_id": {"$in": list(legacy)}}),
            lambda count: count == 0,
        )
    assert await saved_token(db, "resume:default:changes") is not None


async def test_a_renamed_instance_picks_up_where_the_old_name_left_off(
    db: AsyncDatabase[Doc],
) -> None:
    """Setting `instance_id` for the first time finds no token of its own: it resumes
    at another instance's newest, not at "now", so what came in between is not lost."""
    before, during, after = (f.message(GENERAL, ALICE, text) for text in ("a", "b", "c"))
    first, renamed = Recorder(), Recorder()
    async with running(db, first):
        await db[MESSAGES].insert_one(before)
        await wait_until(lambda: first.messages == [before["_id"]])
    await db[MESSAGES].insert_one(during)
    config = dataclasses.replace(CONFIG, app=AppConfig(instance_id="host1"))
    with capture_logs() as logs:
        async with running(db, renamed, config=config):
            await db[MESSAGES].insert_one(after)
            await wait_until(lambda: after["_id"] in renamed.messages)
    assert renamed.messages == [during["_id"], after["_id"]]
    picked_up = {
        line["stream"]: line["saved_by"]
        for line in logs
        if line["event"] == "resume_from_other_instance"
    }
    assert picked_up == {"messages": MESSAGES_TOKEN, "changes": "resume:default:changes"}
    assert await saved_token(db, "resume:host1:messages") is not None


ONE = dataclasses.replace(CONFIG, app=AppConfig(instance_id="one"))
TWO = dataclasses.replace(CONFIG, app=AppConfig(instance_id="two"))


async def run_until_handled(db: AsyncDatabase[Doc], config: Config, message: Doc) -> Recorder:
    """An instance started, `message` inserted, handled, and the instance stopped."""
    recorder = Recorder()
    async with running(db, recorder, config=config):
        await db[MESSAGES].insert_one(message)
        await wait_until(lambda: message["_id"] in recorder.messages)
    return recorder


async def test_a_restarted_instance_resumes_messages_where_another_got_further(
    db: AsyncDatabase[Doc],
) -> None:
    """What another instance read while this one was down it queued durably (delivered
    since, perhaps): read again, emails, which no ledger guards, would go out twice."""
    early, missed, later = (f.message(GENERAL, ALICE, text) for text in ("a", "b", "c"))
    await run_until_handled(db, ONE, early)
    await run_until_handled(db, TWO, missed)
    restarted = await run_until_handled(db, ONE, later)
    assert restarted.messages == [later["_id"]]


async def test_a_shared_position_only_moves_forward(db: AsyncDatabase[Doc]) -> None:
    """Instances without an instance_id share the `default` position. One behind (a slow
    batch) saving after one further on must not move it back: a restart would read
    again messages whose entries were delivered since, and mail them twice. Its own
    reconnects still resume where it got to: the changes in between, the other
    instance's caches are not this one's."""
    behind, ahead = ResumeTokens(db[STATE], "default"), ResumeTokens(db[STATE], "default")
    early, late = (f.message(GENERAL, ALICE, text) for text in ("early", "late"))
    async with await db[MESSAGES].watch() as stream:
        await db[MESSAGES].insert_many([early, late])
        early_token, late_token = (await stream.next())["_id"], (await stream.next())["_id"]
    await ahead.save("messages", late_token)
    await behind.save("messages", early_token)
    assert await saved_token(db) == late_token
    assert await behind.load("messages") == Position(early_token)  # its reconnect
    later = {"_data": late_token["_data"] + "FF"}  # the next event's token
    await behind.save("messages", later)
    assert await saved_token(db) == later


async def unresumable_token(db: AsyncDatabase[Doc]) -> Doc:
    """A well-formed token for an event the server cannot find at its cluster time."""
    async with await db["forgery"].watch() as stream:
        await db["forgery"].insert_one({"_id": "ab"})
        change = await stream.next()
    data: str = change["_id"]["_data"]
    return {"_data": data.replace(b"ab".hex().upper(), b"zz".hex().upper())}


async def test_a_restarted_instance_does_not_follow_another_across_its_lost_history(
    db: AsyncDatabase[Doc],
) -> None:
    """Instance two lost its history (its stream stalled off the oplog) and went on from
    "now": messages before that were read by nobody. Instance one, back with its own
    position still in the oplog, must read them itself rather than jump to two's."""
    early, gap, later = (f.message(GENERAL, ALICE, text) for text in ("a", "gap", "c"))
    await run_until_handled(db, ONE, early)
    await db[MESSAGES].insert_one(gap)  # one is down; two's stream is lost
    now = (await db.command("ping"))["operationTime"]
    await ResumeTokens(db[STATE], "two").save_start("messages", Timestamp(now.time, now.inc + 1))
    await run_until_handled(db, TWO, later)  # two goes on from where it reopened
    restarted = Recorder()
    async with running(db, restarted, config=ONE):
        await wait_until(lambda: gap["_id"] in restarted.messages)


@pytest.mark.parametrize("kind", ["garbage", "unresumable"])
async def test_a_lost_token_is_reported_and_the_stream_restarts_from_now(
    db: AsyncDatabase[Doc], kind: str
) -> None:
    token = {"_data": "zz"} if kind == "garbage" else await unresumable_token(db)
    await db[STATE].insert_one({"_id": MESSAGES_TOKEN, "token": token})
    skipped, kept = f.message(GENERAL, ALICE, "skipped"), f.message(GENERAL, ALICE, "kept")
    await db[MESSAGES].insert_one(skipped)
    lost_before = sample("streamer_change_stream_history_lost_total", "messages")
    recorder = Recorder()
    with capture_logs() as logs:
        async with running(db, recorder):
            await db[MESSAGES].insert_one(kept)
            await wait_until(lambda: kept["_id"] in recorder.messages)
    assert recorder.messages == [kept["_id"]]
    (report,) = [line for line in logs if line["event"] == "change_stream_history_lost"]
    assert report["stream"] == "messages"
    assert report["log_level"] == "error"
    assert sample("streamer_change_stream_history_lost_total", "messages") == lost_before + 1
    assert await saved_token(db) != token


class FailingOnce(Recorder):
    """The next stage meets a MongoDB error the first time it is handed messages."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    async def on_messages(self, events: Sequence[MessageInserted]) -> None:
        if not self.failed:
            self.failed = True
            raise AutoReconnect("the next stage lost MongoDB")
        await super().on_messages(events)


async def test_after_lost_history_the_first_batch_is_read_again_if_not_handled(
    db: AsyncDatabase[Doc],
) -> None:
    """Until a batch is handled the stream's saved place is where it reopened, not
    after what it read: a handler failing on it makes it read that batch again."""
    await db[STATE].insert_one({"_id": MESSAGES_TOKEN, "token": {"_data": "zz"}})
    recorder = FailingOnce()
    quiet = dataclasses.replace(FAST, idle_save_interval=3600.0)
    async with running(db, recorder, tuning=quiet):
        saved = await db[STATE].find_one({"_id": MESSAGES_TOKEN})
        assert saved is not None and "token" not in saved and "start_at" in saved
        kept = f.message(GENERAL, ALICE, "kept")
        await db[MESSAGES].insert_one(kept)
        await wait_until(lambda: kept["_id"] in recorder.messages)
    assert recorder.failed and recorder.messages == [kept["_id"]]
    assert await saved_token(db) is not None


async def test_lost_history_of_the_changes_stream_empties_the_caches_it_keeps(
    db: AsyncDatabase[Doc],
) -> None:
    """Changes in the gap are unknown: a cached subscription may be stale."""
    subscription = f.subscription(ALICE, GENERAL)
    await db[SUBSCRIPTIONS].insert_one(subscription)
    await db[STATE].insert_one({"_id": "resume:default:changes", "token": {"_data": "zz"}})
    directory = directory_for(db)
    await directory.load()
    await directory.subscriptions("GENERAL")  # cached
    await db[SUBSCRIPTIONS].update_one(
        {"_id": subscription["_id"]}, {"$set": {"disableNotifications": True}}
    )  # in the gap: no stream sees it
    async with running(db, Recorder(), directory=directory):
        (member,) = await directory.subscriptions("GENERAL")
    assert member.disable_notifications


async def test_a_stream_failing_for_good_mid_way_is_reopened_not_fatal(
    db: AsyncDatabase[Doc], mongo: AsyncMongoClient[Doc]
) -> None:
    """Say a getMore finds the stream's place gone from the oplog (280, not resumable):
    the stream reopens from its saved token instead of taking the daemon down."""
    recorder = Recorder()
    with capture_logs() as logs:
        async with running(db, recorder):
            await fail_commands(
                mongo, mode={"times": 1}, failCommands=["getMore"], errorCode=CHANGE_STREAM_FATAL
            )
            await wait_until(lambda: any(line["event"] == "change_stream_failed" for line in logs))
            message = f.message(GENERAL, ALICE)
            await db[MESSAGES].insert_one(message)
            await wait_until(lambda: recorder.messages == [message["_id"]])


@pytest.fixture(scope="module")
def own_mongod() -> Iterator[devmongo.DevMongo]:
    """A server of this module's own, stopped and restarted by the test."""
    with devmongo.running() as server:
        yield server


@pytest.fixture
async def fragile_db(own_mongod: devmongo.DevMongo) -> AsyncIterator[AsyncDatabase[Doc]]:
    client: AsyncMongoClient[Doc] = AsyncMongoClient(
        own_mongod.uri, serverSelectionTimeoutMS=300, connectTimeoutMS=300
    )
    try:
        yield client[f"fragile_{uuid.uuid4().hex[:8]}"]
    finally:
        await client.close()


async def test_the_streams_reconnect_after_mongod_dies(
    own_mongod: devmongo.DevMongo, fragile_db: AsyncDatabase[Doc]
) -> None:
    before, after = f.message(GENERAL, ALICE, "before"), f.message(GENERAL, ALICE, "after")
    recorder = Recorder()
    with capture_logs() as logs:
        async with running(fragile_db, recorder) as sources:
            await fragile_db[MESSAGES].insert_one(before)
            await wait_until(lambda: recorder.messages == [before["_id"]])
            own_mongod.kill()
            await wait_until(lambda: not sources.ready)
            await wait_until(
                lambda: any(line["event"] == "change_stream_reconnecting" for line in logs)
            )
            await anyio.to_thread.run_sync(own_mongod.restart)
            await wait_until(lambda: sources.ready, within=60)
            await fragile_db[MESSAGES].insert_one(after)
            await wait_until(lambda: after["_id"] in recorder.messages, within=30)
    # Killed while saving the token, the first batch is handled again: downstream
    # is idempotent by message id. Nothing is lost.
    assert set(recorder.messages) == {before["_id"], after["_id"]}
    assert recorder.messages[-1] == after["_id"]
    assert sample("streamer_mongo_reconnects_total", "messages") >= 1


async def test_the_streams_follow_a_step_down(
    own_mongod: devmongo.DevMongo, fragile_db: AsyncDatabase[Doc]
) -> None:
    """The primary steps down (as in an election); the streams resume on the new primary."""
    before, after = f.message(GENERAL, ALICE, "before"), f.message(GENERAL, ALICE, "after")
    recorder = Recorder()
    async with running(fragile_db, recorder):
        await fragile_db[MESSAGES].insert_one(before)
        await wait_until(lambda: recorder.messages == [before["_id"]])
        step_down = {"replSetStepDown": 1, "force": True, "secondaryCatchUpPeriodSecs": 0}
        with contextlib.suppress(PyMongoError):  # the server may drop this very connection
            await fragile_db.client.admin.command(step_down)
        await insert_when_writable(fragile_db, after)
        await wait_until(lambda: after["_id"] in recorder.messages, within=30)
    assert set(recorder.messages) == {before["_id"], after["_id"]}  # a replay is allowed
    assert recorder.messages[-1] == after["_id"]


async def insert_when_writable(db: AsyncDatabase[Doc], doc: Doc) -> None:
    """Insert once a primary is back (an election takes a moment)."""
    deadline = anyio.current_time() + 30
    while True:
        try:
            await db[MESSAGES].insert_one(doc)
            return
        except (ConnectionFailure, NotPrimaryError):
            if anyio.current_time() > deadline:
                raise
        await anyio.sleep(0.1)
