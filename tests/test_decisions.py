"""`decide_message` and `recheck` against the real mongod, with Rocket.Chat-shaped documents."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

import anyio
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.database import Database

from streamer.config import Config
from streamer.decisions import MessageDecisions, decide_message, recheck
from streamer.directory import DatabaseDirectory, parse_or_log
from streamer.model import (
    MESSAGES,
    PERMISSIONS,
    PUSH_TOKENS,
    ROOMS,
    SUBSCRIPTIONS,
    TEAM_MEMBERS,
    USERS,
    Message,
    Settings,
)
from streamer.rules import Reason
from tests import factories as f
from tests import test_rules_properties as props

pytestmark = pytest.mark.anyio
Doc = dict[str, Any]
Kind = Literal["push", "email"]
CONFIG = Config()
ALICE, BOB, CAROL = f.user("alice"), f.user("bob"), f.user("carol")


async def seed(db: AsyncDatabase[Doc], room: Doc, *members: Doc, devices: bool = True) -> None:
    """The room, its members' users and subscriptions, and a push token each."""
    await db[ROOMS].insert_one(room)
    await db[USERS].insert_many([dict(m) for m in members])
    await db[SUBSCRIPTIONS].insert_many([f.subscription(m, room) for m in members])
    if devices:
        await db[PUSH_TOKENS].insert_many([f.push_token(m) for m in members])


async def post(db: AsyncDatabase[Doc], doc: Doc) -> Message:
    await db[MESSAGES].insert_one(doc)
    return Message.from_doc(doc)


async def decide(db: AsyncDatabase[Doc], message: Message, **settings: Any) -> MessageDecisions:
    return await decide_message(
        DatabaseDirectory(db), message, Settings(**settings), CONFIG, now=message.ts
    )


def by_user(result: MessageDecisions) -> dict[str, tuple[Reason, Reason]]:
    return {d.uid: (d.push_reason, d.email_reason) for d in result.decisions}


async def test_direct_message_notifies_the_other_member(db: AsyncDatabase[Doc]) -> None:
    room = f.room("DM1", t="d")
    await seed(db, room, ALICE, BOB)
    message = await post(db, f.message(room, ALICE, "ping"))
    result = await decide(db, message)
    assert result.skipped is None
    assert by_user(result) == {
        "u-alice": (Reason.SENDER_IS_RECIPIENT, Reason.SENDER_IS_RECIPIENT),
        "u-bob": (Reason.DIRECT_MESSAGE, Reason.DIRECT_MESSAGE),
    }
    bob = next(d for d in result.decisions if d.uid == "u-bob")
    assert (bob.push, bob.email, bob.status, bob.rid, bob.mid) == (
        True, True, "offline", "DM1", message.id
    )  # fmt: skip


async def test_every_member_gets_a_decision_even_when_it_is_no(db: AsyncDatabase[Doc]) -> None:
    room = f.room("GENERAL")
    await seed(db, room, ALICE, BOB)
    await db[USERS].insert_one(CAROL)
    await db[SUBSCRIPTIONS].insert_one(
        f.subscription(CAROL, room, mobilePushNotifications="nothing")
    )
    result = await decide(db, await post(db, f.message(room, ALICE)))
    assert by_user(result) == {
        "u-alice": (Reason.SENDER_IS_RECIPIENT, Reason.SENDER_IS_RECIPIENT),
        "u-bob": (Reason.PREFERENCE_ALL, Reason.NOT_MENTIONED),
        "u-carol": (Reason.PREFERENCE_NOTHING, Reason.NOT_MENTIONED),
    }


async def test_member_without_an_enabled_token_gets_no_push(db: AsyncDatabase[Doc]) -> None:
    room = f.room("DM2", t="d")
    await seed(db, room, ALICE, BOB, devices=False)
    await db[PUSH_TOKENS].insert_one(f.push_token(BOB, enabled=False))
    result = await decide(db, await post(db, f.message(room, ALICE)))
    assert by_user(result)["u-bob"] == (Reason.NO_DEVICE, Reason.DIRECT_MESSAGE)


async def test_large_room_counts_active_members(db: AsyncDatabase[Doc]) -> None:
    room = f.room("BIG", usersCount=500)
    dave = f.user("dave", active=False)
    await seed(db, room, ALICE, BOB, CAROL, dave)
    message = await post(db, f.message(room, ALICE, "hi @carol", mentions=[f.mention(CAROL)]))
    small = by_user(await decide(db, message, max_room_members=3))
    assert small["u-bob"] == (Reason.PREFERENCE_ALL, Reason.NOT_MENTIONED)
    large = by_user(await decide(db, message, max_room_members=2))
    assert large["u-bob"] == (Reason.LARGE_ROOM, Reason.LARGE_ROOM)
    assert large["u-carol"] == (Reason.MENTIONED, Reason.MENTIONED)
    assert large["u-dave"] == (Reason.USER_INACTIVE, Reason.USER_INACTIVE)


async def test_thread_reply_notifies_participants_of_the_parent(db: AsyncDatabase[Doc]) -> None:
    room = f.room("GENERAL")
    await seed(db, room, ALICE, BOB, CAROL)
    parent = await post(db, f.message(room, BOB, "question?", replies=["u-alice"], tcount=1))
    reply = await post(db, f.message(room, ALICE, "answer", tmid=parent.id))
    assert by_user(await decide(db, reply)) == {
        "u-alice": (Reason.SENDER_IS_RECIPIENT, Reason.SENDER_IS_RECIPIENT),
        "u-bob": (Reason.THREAD_PARTICIPANT, Reason.THREAD_PARTICIPANT),
        "u-carol": (Reason.THREAD_NOT_PARTICIPANT, Reason.THREAD_NOT_PARTICIPANT),
    }


async def test_team_mention_expands_through_team_members(db: AsyncDatabase[Doc]) -> None:
    room = f.room("GENERAL")
    await seed(db, room, ALICE, BOB, CAROL)
    await db[TEAM_MEMBERS].insert_many(
        [{"_id": "tm1", "teamId": "T1", "userId": "u-carol"}, {"_id": "tm2", "teamId": "T2"}]
    )
    team = {"_id": "T1", "username": "devs", "type": "team"}
    message = await post(db, f.message(room, ALICE, "@devs look", mentions=[team]))
    decisions = by_user(await decide(db, message, default_push_preference="mentions"))
    assert decisions["u-carol"] == (Reason.MENTIONED, Reason.MENTIONED)
    assert decisions["u-bob"] == (Reason.NOT_MENTIONED, Reason.NOT_MENTIONED)


@pytest.mark.parametrize(
    ("roles", "guest_reason"),
    [
        (["admin", "user"], Reason.DM_PERMISSION_MISSING),
        ([], Reason.DM_PERMISSION_MISSING),  # taken from every role: nobody is notified
        (None, Reason.DIRECT_MESSAGE),  # no permission document: unrestricted
    ],
)
async def test_direct_message_needs_view_d_room(
    db: AsyncDatabase[Doc], roles: list[str] | None, guest_reason: Reason
) -> None:
    room = f.room("DM3", t="d")
    await seed(db, room, ALICE, f.user("guest", roles=["guest"]))
    if roles is not None:
        await db[PERMISSIONS].insert_one({"_id": "view-d-room", "roles": roles})
    decisions = by_user(await decide(db, await post(db, f.message(room, ALICE))))
    assert decisions["u-guest"] == (guest_reason, guest_reason)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"t": "uj"}, Reason.SYSTEM_MESSAGE),
        ({"_hidden": True}, Reason.MESSAGE_HIDDEN),
        ({"editedAt": f.utcnow()}, Reason.MESSAGE_EDITED),
        ({"rid": "NOWHERE"}, Reason.ROOM_NOT_FOUND),
    ],
)
async def test_skipped_messages_decide_nobody(
    db: AsyncDatabase[Doc], fields: Doc, reason: Reason
) -> None:
    room = f.room("GENERAL")
    await seed(db, room, ALICE, BOB)
    result = await decide(db, await post(db, f.message(room, ALICE, **fields)))
    assert (result.skipped, result.decisions) == (reason, [])


async def test_replayed_old_message_is_skipped(db: AsyncDatabase[Doc]) -> None:
    room = f.room("GENERAL")
    await seed(db, room, ALICE, BOB)
    message = await post(db, f.message(room, ALICE))
    result = await decide_message(
        DatabaseDirectory(db), message, Settings(), CONFIG, now=message.ts + 3600
    )
    assert result.skipped is Reason.MESSAGE_TOO_OLD


async def test_omnichannel_agent_message_is_skipped_visitor_message_is_not(
    db: AsyncDatabase[Doc],
) -> None:
    room = f.room("LIVE1", t="l")
    await seed(db, room, BOB)
    visitor = {"_id": "visitor-1", "username": "guest-1"}
    from_agent = await decide(db, await post(db, f.message(room, BOB, "how can I help?")))
    assert from_agent.skipped is Reason.OMNICHANNEL_AGENT_SENDER
    from_visitor = await decide(db, await post(db, f.message(room, visitor, "hello?")))
    assert by_user(from_visitor) == {"u-bob": (Reason.PREFERENCE_ALL, Reason.NOT_MENTIONED)}


async def test_malformed_member_documents_do_not_stop_the_others(db: AsyncDatabase[Doc]) -> None:
    room = f.room("GENERAL")
    await seed(db, room, ALICE, BOB)
    broken_user = f.user("carol", status=42)
    await db[USERS].insert_one(broken_user)
    await db[SUBSCRIPTIONS].insert_many(
        [
            f.subscription(broken_user, room),
            f.subscription(f.user("dave"), room, mobilePushNotifications="loud"),
        ]
    )
    result = await decide(db, await post(db, f.message(room, ALICE)))
    assert by_user(result) == {
        "u-alice": (Reason.SENDER_IS_RECIPIENT, Reason.SENDER_IS_RECIPIENT),
        "u-bob": (Reason.PREFERENCE_ALL, Reason.NOT_MENTIONED),
        "u-carol": (Reason.USER_NOT_FOUND, Reason.USER_NOT_FOUND),
    }


# -- recheck at fire time ------------------------------------------------------------------


async def queued_dm(db: AsyncDatabase[Doc]) -> tuple[Doc, Message]:
    room = f.room("DM9", t="d")
    await seed(db, room, ALICE, BOB)
    return room, await post(db, f.message(room, ALICE, "are you there?"))


async def check_again(
    db: AsyncDatabase[Doc], message: Message, kind: Kind = "push", uid: str = "u-bob"
) -> Reason | None:
    """Recheck as the courier does: with the message as it reads now."""
    directory = DatabaseDirectory(db)
    now_reads = (await directory.messages([message.id]))[message.id]
    return await recheck(directory, uid, now_reads, kind, Settings(), CONFIG, now=message.ts + 3600)


async def test_recheck_still_sends_an_old_unread_message(db: AsyncDatabase[Doc]) -> None:
    _, message = await queued_dm(db)
    assert await check_again(db, message) is None
    assert await check_again(db, message, "email") is None


async def test_recheck_drops_what_the_user_already_read(db: AsyncDatabase[Doc]) -> None:
    room, message = await queued_dm(db)
    read_at = dt.datetime.fromtimestamp(message.ts + 1, dt.UTC)
    await db[SUBSCRIPTIONS].update_one(
        {"rid": room["_id"], "u._id": "u-bob"}, {"$set": {"ls": read_at}}
    )
    assert await check_again(db, message) is Reason.ALREADY_READ


@pytest.mark.parametrize(
    ("collection", "change", "kind", "reason"),
    [
        (SUBSCRIPTIONS, {"$set": {"disableNotifications": True}}, "push",
         Reason.ROOM_NOTIFICATIONS_DISABLED),
        (SUBSCRIPTIONS, {"$set": {"ignored": ["u-alice"]}}, "push", Reason.SENDER_IGNORED),
        (USERS, {"$set": {"status": "busy"}}, "push", Reason.USER_BUSY),
        (USERS, {"$set": {"active": False}}, "email", Reason.USER_INACTIVE),
        (USERS, {"$set": {"statusConnection": "online"}}, "email", Reason.USER_ONLINE_ON_DESKTOP),
        (PUSH_TOKENS, {"$set": {"enabled": False}}, "push", Reason.NO_DEVICE),
    ],
)  # fmt: skip
async def test_recheck_applies_what_changed_meanwhile(
    db: AsyncDatabase[Doc], collection: str, change: Doc, kind: Kind, reason: Reason
) -> None:
    _, message = await queued_dm(db)
    owner = {SUBSCRIPTIONS: "u._id", USERS: "_id", PUSH_TOKENS: "userId"}[collection]
    await db[collection].update_many({owner: "u-bob"}, change)
    assert await check_again(db, message, kind) is reason


async def test_recheck_drops_when_the_user_left_the_room(db: AsyncDatabase[Doc]) -> None:
    room, message = await queued_dm(db)
    await db[SUBSCRIPTIONS].delete_one({"rid": room["_id"], "u._id": "u-bob"})
    assert await check_again(db, message) is Reason.NOT_A_MEMBER


# -- arbitrary documents in the real collections -------------------------------------------


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    message_doc=props.message_docs,
    parent_doc=props.message_docs,
    room_doc=props.room_docs,
    sub_docs=st.lists(props.subscription_docs, max_size=4),
    user_docs=st.lists(props.user_docs, max_size=4, unique_by=lambda d: repr(d.get("_id"))),
    token_docs=st.lists(props.token_docs, max_size=3),
)
def test_decide_message_never_raises_on_documents_in_the_database(
    mongo_uri: str,
    sync_db: Database[Doc],
    message_doc: Doc,
    parent_doc: Doc,
    room_doc: Doc,
    sub_docs: list[Doc],
    user_docs: list[Doc],
    token_docs: list[Doc],
) -> None:
    """Whatever is stored, every member gets a decision or the message a skip reason."""
    message = parse_or_log(Message.from_doc, message_doc)
    assume(message is not None)
    assert message is not None
    # _id is set here: MongoDB itself refuses arrays and duplicates as _id.
    stored = {
        MESSAGES: [{**parent_doc, "_id": "p1"}],
        ROOMS: [{**room_doc, "_id": message.rid}],
        SUBSCRIPTIONS: [{**d, "_id": f"s{i}"} for i, d in enumerate(sub_docs)],
        USERS: [{**d, "_id": d["_id"] if d.get("_id") in props.UIDS else f"bad-u{i}"}
                for i, d in enumerate(user_docs)],
        PUSH_TOKENS: [{**d, "_id": f"t{i}"} for i, d in enumerate(token_docs)],
    }  # fmt: skip
    for collection, docs in stored.items():
        sync_db[collection].delete_many({})
        if docs:
            sync_db[collection].insert_many(docs)

    async def decide_it() -> MessageDecisions:
        client: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_uri)
        try:
            directory = DatabaseDirectory(client[sync_db.name])
            return await decide_message(directory, message, Settings(), CONFIG, message.ts)
        finally:
            await client.close()

    result = anyio.run(decide_it)
    assert (result.skipped is None) or not result.decisions
