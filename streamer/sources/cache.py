"""A `Directory` answered from memory, kept fresh by the change streams.

The hot path (every message, every recipient) must not query MongoDB per
recipient, yet a deployment may have millions of users and subscriptions, so
every cache is bounded (`CacheLimits`) and a miss falls back to the
`DatabaseDirectory`, storing the answer:

- settings: every id in `SETTING_IDS` (a few dozen values), always complete.
- users: an LRU of at most `users` parsed users (services, login tokens and
  `__rooms` are never loaded by the stream). The users stream refreshes cached
  users and adds users whose presence changes.
- devices: an LRU of the enabled push tokens of at most `device_owners` users,
  empty answers included (most lookups are users without a phone). A token
  change drops its owner's entry; the next lookup queries again.
- subscriptions: the complete member list of recently used rooms, LRU by room,
  holding at most `subscriptions` subscriptions in total. A room larger than the
  whole bound is never cached: every lookup for it is a query. `subscription(uid,
  rid)` answers from a cached room, else queries.
- previous `tunread` per subscription (thread-read detection compares against
  it): an LRU of at most `tunreads` subscriptions with unread threads, loaded at
  start and fed by the subscription stream. A thread read on a subscription that
  fell out of it cannot be told apart from a new thread and is not reported.
- rooms and `roles_with_permission`: no change stream follows those
  collections, so answers expire after `ttl` seconds (bounded by `rooms`).
- away since: one entry per user currently away, persisted in the state
  collection (`_id = "away:<uid>"`) so it survives restarts.

Not cached: `messages`, `team_members` and `badges` — one indexed query per batch.
Cached subscriptions carry `unread`/`alert` as of the last change the stream
lets through: the stream filters out Rocket.Chat's per-message `$inc` of every
member's `unread` (millions of events per second at scale). Nothing reads them
from here; `badges` always query.

Concurrency: a slow miss query never overwrites a newer change from a stream
(see `Freshness`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from bson import Timestamp
from pymongo import DeleteOne, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from streamer.directory import DatabaseDirectory, parse_or_log
from streamer.model import (
    SETTING_IDS,
    SETTINGS,
    SUBSCRIPTIONS,
    USER_FIELDS,
    USERS,
    Message,
    Presence,
    PushToken,
    Room,
    Settings,
    Subscription,
    User,
    finite_number,
)
from streamer.sources.events import PresenceChanged
from streamer.sources.lru import Expiring, Freshness, Lru

T = TypeVar("T")

log = structlog.get_logger("streamer.sources.cache")
Doc = dict[str, Any]

AWAY_PREFIX = "away:"
#: Rooms of at most this many members have their members' devices prefetched.
SMALL_ROOM = 50


async def load_away_since(state: AsyncCollection[Doc]) -> dict[str, float]:
    """Every persisted "away since" instant, by user id (also for `streamer explain`)."""
    cursor = state.find({"_id": {"$regex": f"^{AWAY_PREFIX}"}})
    return {
        doc["_id"][len(AWAY_PREFIX) :]: since
        async for doc in cursor
        if (since := finite_number(doc.get("since"))) is not None
    }


@dataclass(frozen=True, slots=True)
class CacheLimits:
    """Upper bounds on what the caches hold; beyond them, lookups query MongoDB."""

    users: int = 100_000
    device_owners: int = 100_000
    subscriptions: int = 500_000
    tunreads: int = 200_000
    rooms: int = 20_000
    #: Seconds a room or a permission answer is trusted (no change stream follows them).
    ttl: float = 60.0


class CachedDirectory:
    """The `Directory` for the hot path; the change streams call the `*_changed` methods."""

    def __init__(
        self,
        db: AsyncDatabase[Doc],
        state: AsyncCollection[Doc],
        fallback: DatabaseDirectory,
        limits: CacheLimits = CacheLimits(),
    ) -> None:
        self._db = db
        self._state = state
        self._fallback = fallback
        self._limits = limits
        #: Cluster time just before `load()` read anything: streams with no saved
        #: token start there, so nothing changed during the load is missed.
        self.loaded_at: Timestamp | None = None
        self._setting_values: dict[str, object] = {}
        self._settings: Settings | None = None
        self._rooms: Expiring[str, Room | None] = Expiring(limits.rooms, limits.ttl)
        self._roles: Expiring[str, frozenset[str] | None] = Expiring(64, limits.ttl)
        self._away: dict[str, float] = {}
        self._fresh = Freshness()
        self._empty_followed_caches()

    def _empty_followed_caches(self) -> None:
        """The caches the change streams keep current, empty."""
        limits = self._limits
        self._users: Lru[str, User] = Lru(limits.users)
        self._devices: Lru[str, tuple[PushToken, ...]] = Lru(
            limits.device_owners, on_evict=self._forget_tokens
        )
        self._token_owner: dict[str, str] = {}
        self._rooms_members: Lru[str, dict[str, Subscription]] = Lru(
            limits.subscriptions, weight=lambda members: max(1, len(members)),
            on_evict=self._forget_members,
        )  # fmt: skip
        self._subscription_owner: dict[str, tuple[str, str]] = {}
        self._tunread: Lru[str, tuple[str, ...]] = Lru(limits.tunreads)

    async def reload(self) -> None:
        """Start again from what MongoDB holds now: the change stream that keeps the
        caches current missed changes (its history was lost), so any answer may be stale."""
        self._fresh.all_changed()
        self._empty_followed_caches()
        await self.load()

    async def load(self) -> None:
        """Fill the caches that must be complete (settings, away since) and warm the rest."""
        reply = await self._db.command("ping")
        operation_time = reply.get("operationTime")
        self.loaded_at = operation_time if isinstance(operation_time, Timestamp) else None
        self._set_settings(
            {
                doc["_id"]: doc.get("value")
                async for doc in self._db[SETTINGS].find({"_id": {"$in": sorted(SETTING_IDS)}})
            }
        )
        self._away = await load_away_since(self._state)
        await self._forget_deleted_users_away()
        await self._load_present_users()
        await self._load_tunreads()
        log.info(
            "caches_loaded",
            settings=len(self._setting_values),
            users=len(self._users),
            away=len(self._away),
            tunreads=len(self._tunread),
        )

    async def _forget_deleted_users_away(self) -> None:
        """A user deleted while away leaves a record behind, reloaded at every start for
        ever; each start drops those of users that are gone."""
        if not self._away:
            return
        found = self._db[USERS].find({"_id": {"$in": list(self._away)}}, {"_id": 1})
        existing = {doc["_id"] async for doc in found}
        gone = [uid for uid in self._away if uid not in existing]
        if gone:
            keys = [f"{AWAY_PREFIX}{uid}" for uid in gone]
            await self._state.delete_many({"_id": {"$in": keys}})
            for uid in gone:
                del self._away[uid]

    async def _load_present_users(self) -> None:
        """Users not offline are the ones whose presence matters first."""
        cursor = self._db[USERS].find(
            {"status": {"$in": ["online", "away", "busy"]}},
            dict.fromkeys(USER_FIELDS, 1),
            limit=self._limits.users,
        )
        async for doc in cursor:
            user = parse_or_log(User.from_doc, doc)
            if user is not None:
                self._users.put(user.id, user)

    async def _load_tunreads(self) -> None:
        cursor = self._db[SUBSCRIPTIONS].find(
            {"tunread.0": {"$exists": True}}, {"tunread": 1}, limit=self._limits.tunreads
        )
        async for doc in cursor:
            tunread = doc.get("tunread")
            if isinstance(doc.get("_id"), str) and isinstance(tunread, list):
                self._tunread.put(doc["_id"], tuple(t for t in tunread if isinstance(t, str)))

    # --- the Directory protocol -------------------------------------------------

    async def settings(self) -> Settings:
        if self._settings is None:
            return await self._fallback.settings()
        return self._settings

    async def room(self, rid: str) -> Room | None:
        cached = self._rooms.get(rid)
        if cached is not None:
            return cached[0]
        return (await self._load_rooms([rid]))[rid]

    async def _load_rooms(self, rids: list[str]) -> dict[str, Room | None]:
        """Query rooms and cache the answers, "no such room" included."""
        found = await self._fallback.rooms(rids)
        loaded = {rid: found.get(rid) for rid in rids}
        for rid, room in loaded.items():
            self._rooms.put(rid, room)
        return loaded

    async def prefetch(self, rids: Collection[str]) -> None:
        """Load what deciding messages in these rooms reads — rooms, members, their
        users and, in small rooms, their devices — with one query per kind for a
        whole change-stream batch.

        On a cold cache (a restart, rooms quiet for a while) each message would
        otherwise cost several round trips, one message after another. In a large
        room most members get no push (online, muted, not mentioned), so there the
        decision looks devices up itself, for just those a push is for.
        """
        rooms = [rid for rid in rids if self._rooms.get(rid) is None]
        if rooms:
            await self._load_rooms(rooms)
        unknown = [rid for rid in rids if self._rooms_members.get(rid) is None]
        if unknown:
            await self._load_members(unknown)
        members = [self._rooms_members.get(rid) or {} for rid in rids]
        await self.users({uid for room in members for uid in room})
        await self.devices({uid for room in members if len(room) <= SMALL_ROOM for uid in room})

    async def subscriptions(self, rid: str) -> list[Subscription]:
        members = self._rooms_members.get(rid)
        if members is not None:
            return list(members.values())
        return (await self._load_members([rid])).get(rid, [])

    async def _load_members(self, rids: list[str]) -> dict[str, list[Subscription]]:
        members, fresh = await self._query_fresh("room", rids, self._fallback.members)
        for rid in fresh:
            self._store_room(rid, members.get(rid, []))
        return members

    async def _query_fresh(
        self, kind: str, ids: list[str], query: Callable[[list[str]], Awaitable[T]]
    ) -> tuple[T, list[str]]:
        """Query MongoDB for `ids`; also say which of them no change stream touched while
        the query ran: only those answers may be cached (an older one would stick)."""
        keys = [(kind, i) for i in ids]
        ticket = self._fresh.begin(keys)
        try:
            found = await query(ids)
        finally:
            fresh = self._fresh.end(keys, ticket)
        return found, [i for i in ids if (kind, i) in fresh]

    async def subscription(self, uid: str, rid: str) -> Subscription | None:
        members = self._rooms_members.get(rid)
        if members is not None:
            return members.get(uid)
        return await self._fallback.subscription(uid, rid)

    async def users(self, uids: Collection[str]) -> dict[str, User]:
        found: dict[str, User] = {}
        missing = []
        for uid in uids:
            user = self._users.get(uid)
            if user is None:
                missing.append(uid)
            else:
                found[uid] = user
        if missing:
            queried, fresh = await self._query_fresh("user", missing, self._fallback.users)
            for uid in fresh:
                if uid in queried:
                    self._users.put(uid, queried[uid])
            found.update(queried)
        return found

    async def devices(self, uids: Collection[str]) -> dict[str, list[PushToken]]:
        found: dict[str, list[PushToken]] = {}
        missing = []
        for uid in uids:
            tokens = self._devices.get(uid)
            if tokens is None:
                missing.append(uid)
            elif tokens:
                found[uid] = list(tokens)
        if missing:
            queried, fresh = await self._query_fresh("devices", missing, self._fallback.devices)
            for uid in fresh:
                self._store_devices(uid, tuple(queried.get(uid, ())))
            found.update(queried)
        return found

    async def messages(self, mids: Collection[str]) -> dict[str, Message]:
        return await self._fallback.messages(mids)

    async def team_members(self, team_id: str) -> frozenset[str]:
        return await self._fallback.team_members(team_id)

    async def roles_with_permission(self, permission: str) -> frozenset[str] | None:
        cached = self._roles.get(permission)
        if cached is not None:
            return cached[0]
        roles = await self._fallback.roles_with_permission(permission)
        self._roles.put(permission, roles)
        return roles

    async def badges(self, uids: Collection[str]) -> dict[str, int]:
        return await self._fallback.badges(uids)

    def away_since(self, uid: str) -> float | None:
        """When the daemon saw `uid` turn away; else the user's `_updatedAt` if cached.

        Callers look the user up through `users()` first, which caches them.
        """
        since = self._away.get(uid)
        if since is not None:
            return since
        user = self._users.peek(uid)
        return None if user is None else user.updated_at

    # --- updates from the change streams ----------------------------------------

    def setting_changed(self, setting_id: str, value: object) -> None:
        """`value` None means removed: Rocket.Chat's default applies again."""
        values = dict(self._setting_values)
        if value is None:
            values.pop(setting_id, None)
        else:
            values[setting_id] = value
        self._set_settings(values)

    def presence(self, uid: str) -> Presence | None:
        user = self._users.peek(uid)
        return None if user is None else user.status

    def user_changed(self, user: User) -> None:
        self._fresh.changed(("user", user.id))
        self._users.put(user.id, user)

    def forget_user(self, uid: str) -> None:
        """Drop the cached user: the next lookup queries."""
        self._fresh.changed(("user", uid))
        self._users.pop(uid)

    def user_removed(self, uid: str) -> None:
        self.forget_user(uid)
        self._away.pop(uid, None)

    async def record_presence(self, changes: Sequence[PresenceChanged]) -> None:
        """Remember (and persist) when users turned away; forget it when they come back.

        A failed write leaves memory as it was: the stream replays the batch, and the
        replay must find the changes new again to write them.
        """
        before = {change.uid: self._away.get(change.uid) for change in changes}
        writes: list[UpdateOne | DeleteOne] = []
        for change in changes:
            key = f"{AWAY_PREFIX}{change.uid}"
            if change.status == "away":
                if change.uid not in self._away:
                    self._away[change.uid] = change.at
                    writes.append(
                        UpdateOne({"_id": key}, {"$set": {"since": change.at}}, upsert=True)
                    )
            elif self._away.pop(change.uid, None) is not None:
                writes.append(DeleteOne({"_id": key}))
        if not writes:
            return
        try:
            await self._state.bulk_write(writes, ordered=True)
        except BaseException:
            for uid, since in before.items():
                if since is None:
                    self._away.pop(uid, None)
                else:
                    self._away[uid] = since
            raise

    def token_changed(self, token_id: str, uid: str | None) -> None:
        """Drop the cached devices of the token's old and new owner; the next lookup queries.

        With neither known (a token deleted while not cached under anyone), a devices
        query in flight may still return it: no answer in flight may be cached.
        """
        previous_owner = self._token_owner.get(token_id)
        if previous_owner is None and uid is None:
            self._fresh.all_changed()
        for owner in {previous_owner, uid}:
            if owner is not None:
                self._fresh.changed(("devices", owner))
                self._devices.pop(owner)

    def subscription_owner(self, subscription_id: str) -> tuple[str, str] | None:
        """(uid, rid) of a subscription in a cached room, for changes without a document."""
        return self._subscription_owner.get(subscription_id)

    def subscription_changed(self, subscription: Subscription) -> None:
        self._fresh.changed(("room", subscription.rid))
        members = self._rooms_members.peek(subscription.rid)
        if members is None:
            return
        members[subscription.uid] = subscription
        self._subscription_owner[subscription.id] = (subscription.uid, subscription.rid)
        self._rooms_members.put(subscription.rid, members)

    def subscription_removed(self, subscription_id: str) -> None:
        self._tunread.pop(subscription_id)
        owner = self._subscription_owner.pop(subscription_id, None)
        if owner is None:
            self._fresh.all_changed()
            return
        uid, rid = owner
        self._fresh.changed(("room", rid))
        members = self._rooms_members.peek(rid)
        if members is not None:
            members.pop(uid, None)
            self._rooms_members.put(rid, members)

    def previous_tunread(self, subscription_id: str) -> tuple[str, ...] | None:
        """The thread ids last seen unread on this subscription; None when not known."""
        tunread = self._tunread.peek(subscription_id)
        if tunread is not None:
            return tunread
        owner = self._subscription_owner.get(subscription_id)
        members = None if owner is None else self._rooms_members.peek(owner[1])
        member = None if members is None or owner is None else members.get(owner[0])
        return None if member is None else member.tunread

    def remember_tunread(self, subscription_id: str, tunread: tuple[str, ...]) -> None:
        """Empty too: "none unread" is what the next thread's `tunread.0` is read against;
        forgotten, the looked-up document (already past that thread's read) stood in."""
        self._tunread.put(subscription_id, tunread)

    # --- internals -------------------------------------------------------------

    def _set_settings(self, values: Mapping[str, object]) -> None:
        """Parsed before kept: should parsing ever raise, the values it failed on are
        not kept to break every later setting change too."""
        settings = Settings.from_values(values)
        for problem in settings.problems:
            log.warning("bad_setting", problem=problem)
        self._setting_values = dict(values)
        self._settings = settings

    def _store_room(self, rid: str, subscriptions: Sequence[Subscription]) -> None:
        members = {s.uid: s for s in subscriptions}
        if self._rooms_members.put(rid, members):
            for s in subscriptions:
                self._subscription_owner[s.id] = (s.uid, s.rid)

    def _forget_members(self, _rid: str, members: dict[str, Subscription]) -> None:
        for subscription in members.values():
            self._subscription_owner.pop(subscription.id, None)

    def _store_devices(self, uid: str, tokens: tuple[PushToken, ...]) -> None:
        if self._devices.put(uid, tokens):
            for token in tokens:
                self._token_owner[token.id] = uid

    def _forget_tokens(self, _uid: str, tokens: tuple[PushToken, ...]) -> None:
        for token in tokens:
            self._token_owner.pop(token.id, None)
