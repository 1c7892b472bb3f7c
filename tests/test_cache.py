"""CachedDirectory answers exactly what DatabaseDirectory answers, within its memory bounds."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from pymongo import AsyncMongoClient, monitoring
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from streamer.directory import DatabaseDirectory
from streamer.model import (
    MESSAGES,
    PERMISSIONS,
    PUSH_TOKENS,
    ROOMS,
    SETTINGS,
    SUBSCRIPTIONS,
    TEAM_MEMBERS,
    USERS,
    PushToken,
)
from streamer.sources.cache import SMALL_ROOM, CachedDirectory, CacheLimits
from streamer.sources.events import PresenceChanged
from streamer.sources.lru import Freshness, Lru
from tests import factories as f
from tests.failpoints import BAD_VALUE, failing_commands

pytestmark = pytest.mark.anyio
Doc = dict[str, Any]
STATE = "streamer_state"

PRESENCE = {"alice": "online", "bob": "away", "carol": "offline", "dave": "busy"}
USERS_DOCS = [f.user(name, status=status) for name, status in PRESENCE.items()]
ALICE, BOB, CAROL, DAVE = USERS_DOCS
ROOMS_DOCS = [f.room("GENERAL"), f.room("random", "p"), f.room("DM", "d", usersCount=2)]
GENERAL, RANDOM, DM = ROOMS_DOCS


async def seed(db: AsyncDatabase[Doc]) -> None:
    await db[USERS].insert_many([*USERS_DOCS, {"_id": "broken", "status": "dnd"}])
    await db[ROOMS].insert_many(ROOMS_DOCS)
    await db[SUBSCRIPTIONS].insert_many(
        [
            f.subscription(ALICE, GENERAL, unread=2, tunread=["t1"]),
            f.subscription(BOB, GENERAL, mobilePushNotifications="mentions"),
            f.subscription(CAROL, GENERAL, archived=True, unread=5),
            f.subscription(ALICE, RANDOM, unread=1),
            f.subscription(DAVE, RANDOM),
            f.subscription(ALICE, DM),
            f.subscription(BOB, DM, unread=4),
        ]
    )
    await db[PUSH_TOKENS].insert_many(
        [
            f.push_token(ALICE, "apn"),
            f.push_token(ALICE, "gcm"),
            f.push_token(BOB, "gcm", enabled=False),
            f.push_token(DAVE, "gcm"),
        ]
    )
    await db[SETTINGS].insert_many(f.default_settings(Push_show_message=False))
    await db[MESSAGES].insert_one(f.message(GENERAL, ALICE, "hello", _id="m1"))
    await db[TEAM_MEMBERS].insert_many(
        [{"teamId": "team1", "userId": ALICE["_id"]}, {"teamId": "team1", "userId": BOB["_id"]}]
    )
    await db[PERMISSIONS].insert_one({"_id": "view-d-room", "roles": ["user", "admin"]})


async def loaded(db: AsyncDatabase[Doc], limits: CacheLimits | None = None) -> CachedDirectory:
    directory = CachedDirectory(db, db[STATE], DatabaseDirectory(db), limits or CacheLimits())
    await directory.load()
    return directory


def by_id(items: list[Any]) -> list[Any]:
    return sorted(items, key=lambda item: item.id)


async def assert_same_answers(cached: CachedDirectory, database: DatabaseDirectory) -> None:
    uids = [u["_id"] for u in USERS_DOCS] + ["nobody"]
    assert await cached.settings() == await database.settings()
    for rid in ("GENERAL", "random", "DM", "missing"):
        assert await cached.room(rid) == await database.room(rid)
        assert by_id(await cached.subscriptions(rid)) == by_id(await database.subscriptions(rid))
        for uid in uids:
            assert await cached.subscription(uid, rid) == await database.subscription(uid, rid)
    assert await cached.users(uids) == await database.users(uids)
    cached_devices, db_devices = await cached.devices(uids), await database.devices(uids)
    assert {k: by_id(v) for k, v in cached_devices.items()} == {
        k: by_id(v) for k, v in db_devices.items()
    }
    mids = ["m1", "missing"]
    assert await cached.messages(mids) == await database.messages(mids)
    assert list(await cached.messages(mids)) == ["m1"]
    assert await cached.team_members("team1") == await database.team_members("team1")
    assert await cached.roles_with_permission("view-d-room") == (
        await database.roles_with_permission("view-d-room")
    )
    assert await cached.badges(uids) == await database.badges(uids)
    # Unread summed over each user's rooms; archived rooms and strangers count 0.
    assert await database.badges(uids) == {
        ALICE["_id"]: 3,
        BOB["_id"]: 4,
        CAROL["_id"]: 0,
        DAVE["_id"]: 0,
        "nobody": 0,
    }


async def test_cached_answers_match_the_database(db: AsyncDatabase[Doc]) -> None:
    await seed(db)
    cached, database = await loaded(db), DatabaseDirectory(db)
    await assert_same_answers(cached, database)  # misses: answered by queries, then stored
    await assert_same_answers(cached, database)  # hits: answered from memory


class CommandCounter(monitoring.CommandListener):
    """pymongo's own command monitoring: which commands reached the server."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.user_projections: list[object] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.commands.append(event.command_name)
        if event.command_name == "find" and event.command["find"] == USERS:
            self.user_projections.append(event.command.get("projection"))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@asynccontextmanager
async def counted(
    mongo_uri: str, db: AsyncDatabase[Doc]
) -> AsyncIterator[tuple[CommandCounter, AsyncDatabase[Doc]]]:
    """`db` through a client of its own whose commands are counted."""
    counter = CommandCounter()
    client: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_uri, event_listeners=[counter])
    try:
        yield counter, client[db.name]
    finally:
        await client.close()


async def test_login_tokens_and_room_lists_never_leave_mongodb(
    mongo_uri: str, db: AsyncDatabase[Doc]
) -> None:
    """Every users query names its fields, cached or not: `services` holds login
    tokens and password hashes, `__rooms` thousands of ids."""
    await seed(db)
    async with counted(mongo_uri, db) as (counter, watched):
        cached = await loaded(watched)
        await cached.users([CAROL["_id"]])  # offline: not loaded at start
        await DatabaseDirectory(watched).users([ALICE["_id"], BOB["_id"]])
    assert len(counter.user_projections) >= 3
    for projection in counter.user_projections:
        assert isinstance(projection, dict) and "username" in projection
        assert not {"services", "__rooms"} & set(projection)


async def test_prefetch_loads_a_batch_of_rooms_in_one_query_per_kind(
    mongo_uri: str, db: AsyncDatabase[Doc]
) -> None:
    await seed(db)
    async with counted(mongo_uri, db) as (counter, watched):
        cached = await loaded(watched)
        counter.commands.clear()
        await cached.prefetch({"GENERAL", "random", "DM", "missing"})
        # rooms, members, the users not loaded at start (the offline ones), devices
        assert counter.commands == ["find"] * 4
        counter.commands.clear()
        database = DatabaseDirectory(db)
        for rid in ("GENERAL", "random", "DM", "missing"):
            assert await cached.room(rid) == await database.room(rid)
            members = await cached.subscriptions(rid)
            assert by_id(members) == by_id(await database.subscriptions(rid))
            uids = [m.uid for m in members]
            assert await cached.users(uids) == await database.users(uids)
            devices, expected = await cached.devices(uids), await database.devices(uids)
            assert {k: by_id(v) for k, v in devices.items()} == {
                k: by_id(v) for k, v in expected.items()
            }
        assert counter.commands == []


async def test_prefetch_leaves_devices_of_a_large_room_to_the_decision(
    mongo_uri: str, db: AsyncDatabase[Doc]
) -> None:
    """Most members of a large room get no push: their devices are not loaded."""
    big = f.room("BIG", usersCount=SMALL_ROOM + 1)
    members = [f.user(f"member{n}") for n in range(SMALL_ROOM + 1)]
    await db[ROOMS].insert_one(big)
    await db[USERS].insert_many(members)
    await db[SUBSCRIPTIONS].insert_many([f.subscription(u, big) for u in members])
    counter = CommandCounter()
    client: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_uri, event_listeners=[counter])
    try:
        cached = await loaded(client[db.name])
        counter.commands.clear()
        await cached.prefetch({"BIG"})
        assert counter.commands == ["find"] * 3  # rooms, members, users
    finally:
        await client.close()


async def test_a_token_without_enabled_counts_as_enabled(db: AsyncDatabase[Doc]) -> None:
    """As the parser reads it: only `enabled: false` switches a device off."""
    unmarked = f.push_token(ALICE)
    del unmarked["enabled"]
    await db[PUSH_TOKENS].insert_many([unmarked, f.push_token(ALICE, "apn", enabled=False)])
    devices = await DatabaseDirectory(db).devices([ALICE["_id"]])
    assert [token.id for token in devices[ALICE["_id"]]] == [unmarked["_id"]]


class HeldDevices(DatabaseDirectory):
    """Devices read from MongoDB, the answer held back until `release` is set."""

    def __init__(self, db: AsyncDatabase[Doc]) -> None:
        super().__init__(db)
        self.read, self.release = anyio.Event(), anyio.Event()

    async def devices(self, uids: Collection[str]) -> dict[str, list[PushToken]]:
        found = await super().devices(uids)
        self.read.set()
        await self.release.wait()
        return found


async def test_a_token_deleted_while_its_owners_devices_are_read_is_not_cached(
    db: AsyncDatabase[Doc],
) -> None:
    """The delete event names no owner, and the token is not cached under anyone yet."""
    token = f.push_token(ALICE)
    await db[PUSH_TOKENS].insert_one(token)
    fallback = HeldDevices(db)
    cached = CachedDirectory(db, db[STATE], fallback)
    async with anyio.create_task_group() as tg:
        tg.start_soon(cached.devices, [ALICE["_id"]])
        await fallback.read.wait()
        await db[PUSH_TOKENS].delete_one({"_id": token["_id"]})
        cached.token_changed(token["_id"], None)
        fallback.release.set()
    assert await cached.devices([ALICE["_id"]]) == {}


async def test_badges_of_nobody_query_nothing(mongo_uri: str, db: AsyncDatabase[Doc]) -> None:
    """A due batch of emails only has no push to badge: no aggregation runs."""
    counter = CommandCounter()
    client: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_uri, event_listeners=[counter])
    try:
        assert await DatabaseDirectory(client[db.name]).badges(set()) == {}
        assert counter.commands == []
    finally:
        await client.close()


async def test_tiny_bounds_still_give_the_same_answers(db: AsyncDatabase[Doc]) -> None:
    await seed(db)
    limits = CacheLimits(users=2, device_owners=1, subscriptions=2, tunreads=1, rooms=1)
    cached = await loaded(db, limits)
    for _ in range(2):
        await assert_same_answers(cached, DatabaseDirectory(db))


async def test_load_warms_present_users_and_unread_threads(db: AsyncDatabase[Doc]) -> None:
    await seed(db)
    cached = await loaded(db)
    assert cached.presence(ALICE["_id"]) == "online"
    assert cached.presence(CAROL["_id"]) is None  # offline users are loaded on demand
    (alice_general,) = [s for s in await cached.subscriptions("GENERAL") if s.uid == ALICE["_id"]]
    assert cached.previous_tunread(alice_general.id) == ("t1",)


async def test_away_since_is_persisted_and_forgotten_on_return(db: AsyncDatabase[Doc]) -> None:
    await seed(db)
    first = await loaded(db)
    await first.record_presence([PresenceChanged(ALICE["_id"], "away", "online", at=1000.0)])
    await first.record_presence([PresenceChanged(ALICE["_id"], "away", "away", at=2000.0)])
    second = await loaded(db)
    assert second.away_since(ALICE["_id"]) == 1000.0
    await second.record_presence([PresenceChanged(ALICE["_id"], "online", "away", at=3000.0)])
    third = await loaded(db)
    alice = (await third.users([ALICE["_id"]]))[ALICE["_id"]]
    assert third.away_since(ALICE["_id"]) == alice.updated_at


async def test_presence_a_failed_write_left_out_is_written_on_replay(
    db: AsyncDatabase[Doc], mongo: AsyncMongoClient[Doc]
) -> None:
    """The stream replays a batch whose handler failed: the replay must write what the
    failed attempt did not, not find the change already known in memory."""
    await seed(db)
    cached = await loaded(db)
    away = [PresenceChanged(ALICE["_id"], "away", "online", at=1000.0)]
    back = [PresenceChanged(ALICE["_id"], "online", "away", at=2000.0)]
    for batch, command in ((away, "update"), (back, "delete")):
        async with failing_commands(mongo, failCommands=[command], errorCode=BAD_VALUE):
            with pytest.raises(PyMongoError):
                await cached.record_presence(batch)
        await cached.record_presence(batch)
        assert (await loaded(db)).away_since(ALICE["_id"]) == cached.away_since(ALICE["_id"])
    assert cached.away_since(ALICE["_id"]) != 1000.0


async def test_the_away_record_of_a_deleted_user_is_dropped_at_the_next_start(
    db: AsyncDatabase[Doc],
) -> None:
    await seed(db)
    first = await loaded(db)
    for user in (ALICE, DAVE):
        await first.record_presence([PresenceChanged(user["_id"], "away", "online", at=1000.0)])
    await db[USERS].delete_one({"_id": DAVE["_id"]})
    restarted = await loaded(db)
    assert restarted.away_since(DAVE["_id"]) is None
    left = [doc["_id"] async for doc in db[STATE].find({"_id": {"$regex": "^away:"}})]
    assert left == [f"away:{ALICE['_id']}"]


async def test_away_since_falls_back_to_updated_at(db: AsyncDatabase[Doc]) -> None:
    await seed(db)
    cached = await loaded(db)
    bob = (await cached.users([BOB["_id"]]))[BOB["_id"]]
    assert bob.updated_at is not None
    assert cached.away_since(BOB["_id"]) == bob.updated_at
    assert cached.away_since("nobody") is None


def test_lru_bounds_total_weight_and_reports_evictions() -> None:
    evicted: list[str] = []
    lru: Lru[str, list[int]] = Lru(5, weight=len, on_evict=lambda key, _: evicted.append(key))
    assert lru.put("a", [1, 2])
    assert lru.put("b", [1, 2])
    assert lru.get("a") == [1, 2]  # "a" is now the most recently used
    assert lru.put("c", [1, 2])
    assert (evicted, lru.keys(), lru.total) == (["b"], ["a", "c"], 4)
    assert not lru.put("huge", [0] * 6)
    assert "huge" not in lru
    assert not lru.put("a", [0] * 6)  # grown past the bound: dropped, and reported
    assert (evicted, lru.keys(), lru.total) == (["b", "a"], ["c"], 2)


def test_a_change_during_a_query_makes_its_answer_stale() -> None:
    freshness = Freshness()
    ticket = freshness.begin(["a", "b"])
    freshness.changed("a")
    freshness.changed("unrelated")
    assert freshness.end(["a", "b"], ticket) == {"b"}
    ticket = freshness.begin(["a"])
    assert freshness.end(["a"], ticket) == {"a"}  # earlier changes do not count
    ticket = freshness.begin(["a"])
    freshness.all_changed()
    assert freshness.end(["a"], ticket) == set()
