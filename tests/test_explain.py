"""`streamer explain` against the real mongod: the answer to "why didn't I get a notification?"."""

from __future__ import annotations

import datetime as dt
import io
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from pymongo import AsyncMongoClient, MongoClient
from pymongo.asynchronous.database import AsyncDatabase

from streamer.config import Config, QueueConfig
from streamer.directory import DatabaseDirectory
from streamer.explain import ExplainError, explain
from streamer.model import MESSAGES, PUSH_TOKENS, ROOMS, SETTINGS, SUBSCRIPTIONS, USERS
from tests import factories as f

Doc = dict[str, Any]
ALICE = f.user("alice")
BOB = f.user("bob", status="online", statusConnection="online")
CAROL = f.user("carol")
DAVE = f.user("dave", status="away")


async def seed_general(db: AsyncDatabase[Doc]) -> Doc:
    """#general: Alice writes; Bob is online, Carol ignores Alice, Dave is away without a phone."""
    room = f.room("GENERAL")
    await db[SETTINGS].insert_many(f.default_settings())
    await db[ROOMS].insert_one(room)
    await db[USERS].insert_many([ALICE, BOB, CAROL, DAVE])
    await db[SUBSCRIPTIONS].insert_many(
        [
            f.subscription(ALICE, room),
            f.subscription(BOB, room),
            f.subscription(CAROL, room, ignored=["u-alice"]),
            f.subscription(DAVE, room),
        ]
    )
    await db[PUSH_TOKENS].insert_many([f.push_token(u) for u in (ALICE, BOB, CAROL)])
    message = f.message(room, ALICE, "ship it @bob", mentions=[f.mention(BOB)])
    await db[MESSAGES].insert_one(message)
    return message


async def run_explain(
    db: AsyncDatabase[Doc],
    mid: str,
    user: str | None = None,
    config: Config | None = None,
    away: dict[str, float] | None = None,
) -> str:
    """Explain as if 5 s after the message; `away` maps uid to seconds away by then."""
    out = io.StringIO()
    message = await db[MESSAGES].find_one({"_id": mid})
    now = message["ts"].timestamp() + 5 if message else 0.0
    since = {uid: now - seconds for uid, seconds in (away or {}).items()}
    directory = DatabaseDirectory(db)
    await explain(directory, mid, config or Config(), out, user=user, now=now, away=since)
    return out.getvalue()


@pytest.mark.anyio
async def test_explains_every_member_in_plain_words(db: AsyncDatabase[Doc]) -> None:
    message = await seed_general(db)
    text = await run_explain(db, message["_id"])
    assert f"message {message['_id']} in GENERAL (GENERAL, channel) from alice" in text
    assert "alice (u-alice)" in text and "the user wrote the message [sender_is_recipient]" in text
    assert "bob (u-bob), online\n  push:  yes, the user is mentioned by name" in text
    assert "  email: no, the user is connected (statusConnection online), so no email" in text
    assert "  queue: sent after 120 s unless read first (the user is online)" in text
    assert "push:  no, the user ignores the sender [sender_ignored]" in text
    assert "push:  no, the user has no enabled push token" in text  # Dave


@pytest.mark.anyio
async def test_explains_one_user_by_name_or_id(db: AsyncDatabase[Doc]) -> None:
    message = await seed_general(db)
    by_name = await run_explain(db, message["_id"], user="carol")
    assert await run_explain(db, message["_id"], user="u-carol") == by_name
    assert "carol (u-carol)" in by_name and "bob" not in by_name.split("\n", 2)[2]


@pytest.mark.anyio
async def test_queue_timing_follows_presence_and_always_notify(db: AsyncDatabase[Doc]) -> None:
    message = await seed_general(db)
    fast = Config(queue=QueueConfig(delay_online=30.0, always_notify_mobile=False))
    assert "sent after 30 s unless read first (the user is online)" in await run_explain(
        db, message["_id"], user="bob", config=fast
    )
    always = Config(queue=QueueConfig(always_notify_mobile=True))
    assert "sent at once (always notify mobile is on)" in await run_explain(
        db, message["_id"], user="bob", config=always
    )


@pytest.mark.anyio
async def test_away_user_waits_less_the_longer_they_have_been_away(
    db: AsyncDatabase[Doc],
) -> None:
    message = await seed_general(db)
    await db[PUSH_TOKENS].insert_one(f.push_token(DAVE))
    assert "sent after 30 s unless read first (the user is away)" in await run_explain(
        db, message["_id"], user="dave", away={"u-dave": 90.0}
    )
    assert "sent at once (the user is away)" in await run_explain(
        db, message["_id"], user="dave", away={"u-dave": 600.0}
    )


@pytest.mark.anyio
async def test_skipped_message_says_why_nobody_is_notified(db: AsyncDatabase[Doc]) -> None:
    await seed_general(db)
    joined = f.message(f.room("GENERAL"), CAROL, "", t="uj")
    await db[MESSAGES].insert_one(joined)
    text = await run_explain(db, joined["_id"])
    assert "nobody is notified: it is a system message" in text and "[system_message]" in text


@pytest.mark.anyio
async def test_unknown_message_or_member_is_a_clear_error(db: AsyncDatabase[Doc]) -> None:
    message = await seed_general(db)
    with pytest.raises(ExplainError, match="message 'nope' not found"):
        await run_explain(db, "nope")
    with pytest.raises(ExplainError, match="user 'zed' is not a member of room 'GENERAL'"):
        await run_explain(db, message["_id"], user="zed")


def test_explain_command_prints_and_exits(mongo_uri: str, db_name: str) -> None:
    async def seed() -> Doc:
        client: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_uri)
        try:
            return await seed_general(client[db_name])
        finally:
            await client.close()

    message = anyio.run(seed)
    with MongoClient(mongo_uri) as client:  # Dave has a phone and has been away for long
        client[db_name][PUSH_TOKENS].insert_one(f.push_token(DAVE))
        away = {"_id": "away:u-dave", "since": message["ts"].timestamp() - 3600}
        client[db_name][Config().mongo.state_collection].insert_one(away)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMER_")}
    env.update(
        PYTHONPATH=str(Path(__file__).parent.parent),
        STREAMER_MONGO__URI=mongo_uri,
        STREAMER_MONGO__DATABASE=db_name,
    )

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "streamer", "explain", *args]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)

    found = command(message["_id"], "--user", "bob")
    assert found.returncode == 0, found.stderr
    assert "push:  yes, the user is mentioned by name" in found.stdout
    dave = command(message["_id"], "--user", "dave")
    assert "queue: sent at once (the user is away)" in dave.stdout, dave.stderr
    missing = command("no-such-message")
    assert missing.returncode == 1
    assert "streamer explain: message 'no-such-message' not found" in missing.stderr


@pytest.mark.anyio
async def test_an_imported_message_is_explained_as_the_daemon_decided_it(
    db: AsyncDatabase[Doc],
) -> None:
    """Its timestamp is two hours old but it was inserted now: the daemon, seeing it
    now, skipped it as too old, and explain (reading the insert from the oplog) agrees."""
    await seed_general(db)
    imported = f.message(f.room("GENERAL"), ALICE, "from the old system")
    imported["ts"] = imported["ts"] - dt.timedelta(hours=2)
    await db[MESSAGES].insert_one(imported)
    live = (await db[MESSAGES].find_one({"msg": "ship it @bob"}))["_id"]
    oplog = db.client["local"]["oplog.rs"]
    texts = {}
    for mid in (imported["_id"], live):
        out = io.StringIO()
        await explain(DatabaseDirectory(db), mid, Config(), out, now=time.time(), oplog=oplog)
        texts[mid] = out.getvalue()
    assert "inserted: " in texts[imported["_id"]] and "(from the oplog)" in texts[imported["_id"]]
    assert "nobody is notified" in texts[imported["_id"]]
    assert "[message_too_old]" in texts[imported["_id"]]
    assert "nobody is notified" not in texts[live]
