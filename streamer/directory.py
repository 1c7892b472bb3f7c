"""Where the stages look up Rocket.Chat's documents: one interface, two implementations.

`DatabaseDirectory` asks MongoDB every time (used by `streamer explain`,
`streamer doctor`, and as the fallback behind the caches); the sources provide a
cache-backed directory kept fresh by change streams for the hot path. Malformed
documents are logged with their `_id` and left out, never raised.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any, Protocol, TypeVar

import structlog
from pymongo.asynchronous.database import AsyncDatabase

from streamer import metrics
from streamer.model import (
    MESSAGES,
    PERMISSIONS,
    PUSH_TOKENS,
    ROOMS,
    SETTING_IDS,
    SETTINGS,
    SUBSCRIPTIONS,
    TEAM_MEMBERS,
    USER_FIELDS,
    USERS,
    MalformedDocument,
    Message,
    PushToken,
    Room,
    Settings,
    Subscription,
    User,
    finite_number,
)

log = structlog.get_logger("streamer.directory")
Doc = dict[str, Any]
T = TypeVar("T")

#: Rocket.Chat's permission for reading direct messages (SPEC §4).
VIEW_DIRECT_MESSAGES = "view-d-room"


class Directory(Protocol):
    async def settings(self) -> Settings: ...
    async def room(self, rid: str) -> Room | None: ...
    async def subscriptions(self, rid: str) -> list[Subscription]: ...
    async def subscription(self, uid: str, rid: str) -> Subscription | None: ...
    async def users(self, uids: Collection[str]) -> dict[str, User]: ...
    async def devices(self, uids: Collection[str]) -> dict[str, list[PushToken]]: ...
    async def messages(self, mids: Collection[str]) -> dict[str, Message]: ...
    async def team_members(self, team_id: str) -> frozenset[str]: ...
    async def roles_with_permission(self, permission: str) -> frozenset[str] | None: ...
    async def badges(self, uids: Collection[str]) -> dict[str, int]: ...


async def one_message(directory: Directory, mid: str) -> Message | None:
    """One message by id, through the batch lookup; None if missing or malformed."""
    return (await directory.messages([mid])).get(mid)


#: How many bad documents are remembered as already reported (see `parse_or_log`).
REPORTED_LIMIT = 10_000
_reported: OrderedDict[tuple[str, str, str], None] = OrderedDict()


def parse_or_log(parse: Callable[[object], T], doc: object) -> T | None:
    """Parse one document; a malformed one is counted, skipped, and logged once.

    Once: a bad document read again and again (a user's devices are re-read
    after every change of their tokens, a message at every fire time) would
    otherwise repeat its line on every read. A new problem with it is logged again.
    """
    try:
        return parse(doc)
    except MalformedDocument as exc:
        metrics.MALFORMED_DOCUMENTS.labels(exc.collection).inc()
        if _first_report(exc):
            mid = {"mid": exc.doc_id} if exc.collection == MESSAGES else {}  # found by mid
            log.warning(
                "malformed_document",
                collection=exc.collection,
                doc_id=exc.doc_id,
                why=exc.why,
                **mid,
            )
        return None


def _first_report(exc: MalformedDocument) -> bool:
    key = (exc.collection, repr(exc.doc_id), exc.why)
    if key in _reported:
        _reported.move_to_end(key)
        return False
    _reported[key] = None
    if len(_reported) > REPORTED_LIMIT:
        _reported.popitem(last=False)
    return True


async def _parsed(parse: Callable[[object], T], cursor: AsyncIterator[Doc]) -> list[T]:
    found = []
    async for doc in cursor:
        item = parse_or_log(parse, doc)
        if item is not None:
            found.append(item)
    return found


class DatabaseDirectory:
    """Every lookup is a query: always current, never cached."""

    def __init__(self, db: AsyncDatabase[Doc]) -> None:
        self._db = db

    async def settings(self) -> Settings:
        cursor = self._db[SETTINGS].find({"_id": {"$in": sorted(SETTING_IDS)}}, {"value": 1})
        values = {doc["_id"]: doc.get("value") async for doc in cursor}
        settings = Settings.from_values(values)
        for problem in settings.problems:
            log.warning("bad_setting", problem=problem)
        return settings

    async def room(self, rid: str) -> Room | None:
        return (await self.rooms([rid])).get(rid)

    async def rooms(self, rids: Collection[str]) -> dict[str, Room]:
        cursor = self._db[ROOMS].find({"_id": {"$in": list(rids)}})
        return {room.id: room for room in await _parsed(Room.from_doc, cursor)}

    async def subscriptions(self, rid: str) -> list[Subscription]:
        return (await self.members([rid])).get(rid, [])

    async def members(self, rids: Collection[str]) -> dict[str, list[Subscription]]:
        """The subscriptions of each of the rooms, by room (rooms without any are absent)."""
        cursor = self._db[SUBSCRIPTIONS].find({"rid": {"$in": list(rids)}})
        found: dict[str, list[Subscription]] = {}
        for subscription in await _parsed(Subscription.from_doc, cursor):
            found.setdefault(subscription.rid, []).append(subscription)
        return found

    async def subscription(self, uid: str, rid: str) -> Subscription | None:
        doc = await self._db[SUBSCRIPTIONS].find_one({"rid": rid, "u._id": uid})
        return None if doc is None else parse_or_log(Subscription.from_doc, doc)

    async def users(self, uids: Collection[str]) -> dict[str, User]:
        cursor = self._db[USERS].find({"_id": {"$in": list(uids)}}, dict.fromkeys(USER_FIELDS, 1))
        return {user.id: user for user in await _parsed(User.from_doc, cursor)}

    async def devices(self, uids: Collection[str]) -> dict[str, list[PushToken]]:
        cursor = self._db[PUSH_TOKENS].find(
            {"userId": {"$in": list(uids)}, "enabled": {"$ne": False}}
        )
        found: dict[str, list[PushToken]] = {}
        for token in await _parsed(PushToken.from_doc, cursor):
            found.setdefault(token.uid, []).append(token)
        return found

    async def messages(self, mids: Collection[str]) -> dict[str, Message]:
        """The messages that exist and parse, by id; one query for a whole batch of entries."""
        cursor = self._db[MESSAGES].find({"_id": {"$in": list(mids)}})
        return {message.id: message for message in await _parsed(Message.from_doc, cursor)}

    async def team_members(self, team_id: str) -> frozenset[str]:
        cursor = self._db[TEAM_MEMBERS].find({"teamId": team_id}, {"userId": 1})
        return frozenset([d["userId"] async for d in cursor if isinstance(d.get("userId"), str)])

    async def roles_with_permission(self, permission: str) -> frozenset[str] | None:
        """The roles granted it; None when the database has no such permission at all
        (one Rocket.Chat never seeded): unrestricted, rather than denied to everyone."""
        doc = await self._db[PERMISSIONS].find_one({"_id": permission})
        if doc is None:
            return None
        roles = doc.get("roles")
        if not isinstance(roles, list):
            return frozenset()
        return frozenset(r for r in roles if isinstance(r, str))

    async def badges(self, uids: Collection[str]) -> dict[str, int]:
        """Each user's unread count over their rooms (the app's badge); 0 when none.

        One aggregation for a batch of recipients, not one per push, and none for a
        batch of emails only.
        """
        if not uids:
            return {}
        pipeline: list[Doc] = [
            {"$match": {"u._id": {"$in": list(uids)}, "archived": {"$ne": True}}},
            {"$group": {"_id": "$u._id", "unread": {"$sum": "$unread"}}},
        ]
        counts = dict.fromkeys(uids, 0)
        async for row in await self._db[SUBSCRIPTIONS].aggregate(pipeline):
            unread = finite_number(row.get("unread"))
            if row.get("_id") in counts and unread is not None:
                counts[row["_id"]] = int(unread)
        return counts
