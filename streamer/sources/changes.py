"""What each change document means: typed events for the next stage, updates for the caches.

One function per collection, each taking a whole batch. A malformed document or
change is logged with its `_id` (through `parse_or_log`) and skipped; the rest of
the batch goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from bson import Timestamp

from streamer.directory import parse_or_log
from streamer.model import (
    PUSH_TOKENS,
    SUBSCRIPTIONS,
    USERS,
    MalformedDocument,
    Message,
    Presence,
    PushToken,
    Subscription,
    User,
    presence_of,
    to_epoch,
)
from streamer.sources.cache import CachedDirectory
from streamer.sources.events import MessageInserted, PresenceChanged, RoomRead, ThreadRead

log = structlog.get_logger("streamer.sources")
Change = Mapping[str, Any]


def change_time(change: Change) -> float:
    """When the change happened on the server: `wallTime` (ms), else `clusterTime` (s)."""
    wall = to_epoch(change.get("wallTime"))
    if wall is not None:
        return wall
    cluster = change.get("clusterTime")
    return float(cluster.time) if isinstance(cluster, Timestamp) else time.time()


def _document_id(change: Change) -> object:
    key = change.get("documentKey")
    return key.get("_id") if isinstance(key, Mapping) else None


def _string_id(collection: str, change: Change) -> str | None:
    """The changed document's `_id` if it is a string, as all of Rocket.Chat's are.

    Any other `_id` makes it a bad document: logged (once per write, not on its
    delete) like every other, not silently passed over.
    """
    doc_id = _document_id(change)
    if isinstance(doc_id, str):
        return doc_id
    if change.get("operationType") != "delete":
        parse_or_log(functools.partial(_not_a_string_id, collection), doc_id)
    return None


def _not_a_string_id(collection: str, doc_id: object) -> None:
    raise MalformedDocument(collection, doc_id, "_id is not a non-empty string")


def messages_inserted(changes: Sequence[Change]) -> list[MessageInserted]:
    inserted = []
    for change in changes:
        if change.get("operationType") != "insert":
            continue
        message = parse_or_log(Message.from_doc, change.get("fullDocument"))
        if message is not None:
            inserted.append(MessageInserted(message, change_time(change)))
    return inserted


@dataclasses.dataclass(slots=True)
class Learned:
    """What a batch teaches the caches that events are derived from: each user's
    presence, each subscription's unread threads.

    Applied only once the batch's events were handed on. A batch read again after
    its handler failed (a MongoDB error) then meets these as they were and reports
    the same presence changes and thread reads again, instead of finding nothing new.
    """

    #: By user id: the user to cache, or None to drop a cached one.
    users: dict[str, User | None] = dataclasses.field(default_factory=dict)
    tunreads: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def apply(self, directory: CachedDirectory) -> None:
        for uid, user in self.users.items():
            if user is None:
                directory.forget_user(uid)
            else:
                directory.user_changed(user)
        for subscription_id, tunread in self.tunreads.items():
            directory.remember_tunread(subscription_id, tunread)


def subscription_reads(
    directory: CachedDirectory, changes: Sequence[Change]
) -> tuple[list[RoomRead | ThreadRead], Learned]:
    """Keep the subscription caches current and report the reads the batch contains."""
    reads: list[RoomRead | ThreadRead] = []
    learned = Learned()
    for change in changes:
        subscription_id = _string_id(SUBSCRIPTIONS, change)
        if subscription_id is None:
            continue
        operation = change.get("operationType")
        if operation == "delete":
            directory.subscription_removed(subscription_id)
            learned.tunreads.pop(subscription_id, None)
        elif operation in ("insert", "replace"):
            subscription = parse_or_log(Subscription.from_doc, change.get("fullDocument"))
            if subscription is not None:
                directory.subscription_changed(subscription)
                learned.tunreads[subscription.id] = subscription.tunread
        elif operation == "update":
            reads.extend(_subscription_updated(directory, learned, subscription_id, change))
    return reads, learned


def _subscription_updated(
    directory: CachedDirectory, learned: Learned, subscription_id: str, change: Change
) -> list[RoomRead | ThreadRead]:
    description = change.get("updateDescription") or {}
    updated = description.get("updatedFields") or {}
    full = change.get("fullDocument")
    # updateLookup returns the document as it is now (None once deleted): good for
    # the cache and for uid/rid, which never change; the event's own fields say
    # what this update did.
    subscription = None if full is None else parse_or_log(Subscription.from_doc, full)
    owner = (
        (subscription.uid, subscription.rid)
        if subscription is not None
        else directory.subscription_owner(subscription_id)
    )
    previous, tunread = _follow_tunread(
        directory, learned, subscription_id, description, subscription
    )
    if subscription is not None:
        if tunread is not None:
            subscription = dataclasses.replace(subscription, tunread=tunread)
        directory.subscription_changed(subscription)
    if owner is None:
        log.debug("read_of_unknown_subscription", subscription_id=subscription_id)
        return []
    uid, rid = owner
    at = change_time(change)
    reads: list[RoomRead | ThreadRead] = []
    if _room_read(updated):
        reads.append(RoomRead(uid, rid, at))
    if previous is not None and tunread is not None:
        reads.extend(ThreadRead(uid, rid, tmid, at) for tmid in previous if tmid not in tunread)
    return reads


def _room_read(updated: Mapping[str, Any]) -> bool:
    """Rocket.Chat's read sets `ls` to now and `alert` false; "mark as unread" sets `ls`
    back to an older message's time, with `alert` true: no read at all."""
    marked_unread = updated.get("alert") is True
    return ("ls" in updated or updated.get("unread") == 0) and not marked_unread


def _follow_tunread(
    directory: CachedDirectory,
    learned: Learned,
    subscription_id: str,
    description: Mapping[str, Any],
    current: Subscription | None,
) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    """`tunread` before and after this update, where known; `learned` takes the latter.

    With no previous value, the looked-up document's `tunread` is the best start
    for the next comparison.
    """
    if subscription_id in learned.tunreads:
        previous: tuple[str, ...] | None = learned.tunreads[subscription_id]
    else:
        previous = directory.previous_tunread(subscription_id)
    after = tunread_after(previous, description)
    if after is not None:
        learned.tunreads[subscription_id] = after
    elif previous is None and current is not None:
        learned.tunreads[subscription_id] = current.tunread
    return previous, after


def tunread_after(
    previous: tuple[str, ...] | None, description: Mapping[str, Any]
) -> tuple[str, ...] | None:
    """The subscription's `tunread` after this update; None when untouched or not knowable.

    MongoDB reports an array either whole (`tunread`), per element (`tunread.3`
    after a `$push`) or cut short (`truncatedArrays`); the last two need the
    previous value.
    """
    updated: Mapping[str, Any] = description.get("updatedFields") or {}
    if "tunread" in (description.get("removedFields") or ()):
        return ()
    if "tunread" in updated:
        value = updated["tunread"]
        return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()
    elements = {k: v for k, v in updated.items() if k.startswith("tunread.")}
    cuts = [
        cut.get("newSize")
        for cut in description.get("truncatedArrays") or ()
        if isinstance(cut, Mapping) and cut.get("field") == "tunread"
    ]
    if not elements and not cuts:
        return None
    if previous is None:
        return None
    items = list(previous)
    for size in cuts:
        if isinstance(size, int):
            del items[size:]
    for key, value in sorted(elements.items(), key=lambda kv: _index(kv[0])):
        index = _index(key)
        if isinstance(value, str) and 0 <= index < len(items):
            items[index] = value
        elif isinstance(value, str):
            items.append(value)
    return tuple(items)


def _index(key: str) -> int:
    _, _, position = key.partition(".")
    return int(position) if position.isdecimal() else -1


def presence_changes(
    directory: CachedDirectory, changes: Sequence[Change]
) -> tuple[list[PresenceChanged], Learned]:
    """Report every change of `status`; the users to cache are in the `Learned`.

    A cached user's presence changes only with a change that sets `status`: the
    document looked up for any other change may already carry a later status, and
    caching it would hide that status's own change when it comes.
    """
    found: list[PresenceChanged] = []
    learned = Learned()
    #: Presence as of the change being read, for users whose status the batch set.
    presence: dict[str, Presence | None] = {}
    for change in changes:
        uid = _string_id(USERS, change)
        if uid is None:
            continue
        operation = change.get("operationType")
        if operation == "delete":
            directory.user_removed(uid)
            learned.users.pop(uid, None)
            presence[uid] = None
            continue
        checked = parse_or_log(_new_status, change)
        if checked is None:
            continue
        (status,) = checked
        user = _current_user(change)
        previous = presence[uid] if uid in presence else directory.presence(uid)
        if status is not None:
            presence[uid] = status
        known = status or previous
        if user is not None:
            learned.users[uid] = None if known is None else dataclasses.replace(user, status=known)
        if status is not None and status != previous and operation in ("update", "replace"):
            found.append(PresenceChanged(uid, status, previous, change_time(change)))
    return found, learned


def _current_user(change: Change) -> User | None:
    full = change.get("fullDocument")
    return None if full is None else parse_or_log(User.from_doc, full)


def _new_status(change: object) -> tuple[Presence | None]:
    """The status this change set (not the looked-up document's, which may be newer).

    In a 1-tuple, so "no status change" (None) differs from "malformed" (raised).
    """
    if not isinstance(change, Mapping):
        raise MalformedDocument(USERS, None, "not a change document")
    if change.get("operationType") == "update":
        fields = (change.get("updateDescription") or {}).get("updatedFields") or {}
        if "status" not in fields:
            return (None,)
        status = fields["status"]
    else:
        full = change.get("fullDocument") or {}
        status = full.get("status")
    presence = presence_of(status)
    if presence is None:
        raise MalformedDocument(USERS, _document_id(change), f"status={status!r} is not a presence")
    return (presence,)


def settings_changed(directory: CachedDirectory, changes: Sequence[Change]) -> None:
    for change in changes:
        setting_id = _document_id(change)
        if not isinstance(setting_id, str):
            continue
        if change.get("operationType") == "delete":
            directory.setting_changed(setting_id, None)
            continue
        full = change.get("fullDocument")
        if isinstance(full, Mapping):
            directory.setting_changed(setting_id, full.get("value"))


def tokens_changed(directory: CachedDirectory, changes: Sequence[Change]) -> None:
    """Drop the owners' cached devices; a bad token is reported now, as it is written,
    not whenever its owner's devices happen to be read next."""
    for change in changes:
        token_id = _string_id(PUSH_TOKENS, change)
        if token_id is None:
            continue
        full = change.get("fullDocument")
        if isinstance(full, Mapping):
            parse_or_log(PushToken.from_doc, full)
        owner = full.get("userId") if isinstance(full, Mapping) else None
        directory.token_changed(token_id, owner if isinstance(owner, str) else None)
