"""The side collection (`streamer_queue`): the durable truth behind the in-memory schedule.

Every decision that matters is taken here, in one conditional write: an entry
is leased only if it is due and nobody else holds a live lease on it, a retry
is recorded only by the lease holder, a read deletes whatever is queued. The
in-memory schedule is a fast index of this collection; when it is stale the
worst outcome is a wasted lookup.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from math import isfinite
from typing import Any

from bson import ObjectId, Timestamp
from pymongo import DeleteOne, IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.cursor import AsyncCursor
from pymongo.errors import BulkWriteError

from streamer.groupcommit import DUPLICATE_KEY, GroupCommit
from streamer.model import MalformedDocument
from streamer.queue.entry import Entry
from streamer.queue.heap import Slot, make_slot

Doc = dict[str, Any]

#: What the schedule needs to rebuild itself; the rest comes back with the lease.
SLOT_FIELDS = {
    "uid": 1,
    "rid": 1,
    "due_at": 1,
    "created_at": 1,
    "attempts": 1,
    "owner": 1,
    "lease_until": 1,
}
#: The side collection, as named in log lines and metric labels about malformed entries.
QUEUE = "streamer_queue"
#: The instance that inserted an entry (its follower skips its own inserts).
QUEUED_BY = "queued_by"
#: Which lease write took the entry: how a batch lease reads back what it got.
LEASE_ID = "lease_id"
_KINDS: frozenset[str] = frozenset({"push", "email"})
#: A read: who, which room, and when (MongoDB's time, as entries' `created_at`).
Read = tuple[str, str, float]


def to_document(entry: Entry, owner: str | None = None, lease_until: float = 0.0) -> Doc:
    return {
        "_id": entry.id,
        "uid": entry.uid,
        "rid": entry.rid,
        "mid": entry.mid,
        "kind": entry.kind,
        "due_at": entry.due_at,
        "created_at": entry.created_at,
        "attempts": entry.attempts,
        "first_failure_at": entry.first_failure_at,
        "last_error": entry.last_error,
        "owner": owner,
        "lease_until": lease_until,
    }


def parse_entry(doc: object) -> Entry:
    """A queue document as an `Entry`; `MalformedDocument` if it cannot be delivered."""
    doc = _mapping(doc)
    kind = doc.get("kind")
    if kind not in _KINDS:
        raise MalformedDocument(QUEUE, doc.get("_id"), f"kind {kind!r} is not push or email")
    first_failure = doc.get("first_failure_at")
    last_error = doc.get("last_error")
    return Entry(
        uid=_text(doc, "uid"),
        rid=_text(doc, "rid"),
        mid=_text(doc, "mid"),
        kind="push" if kind == "push" else "email",
        due_at=_time(doc, "due_at"),
        created_at=_time(doc, "created_at"),
        attempts=_count(doc, "attempts"),
        first_failure_at=None if first_failure is None else _time(doc, "first_failure_at"),
        last_error=None if last_error is None else str(last_error),
    )


def parse_slot(doc: object, instance_id: str) -> Slot:
    """The entry's place in the schedule.

    An entry leased by another instance is placed at its lease expiry: that is
    when it may be taken over if that instance died with it.
    """
    doc = _mapping(doc)
    key = doc["_id"]
    due_at = _time(doc, "due_at")
    owner = doc.get("owner")
    if owner is not None and owner != instance_id:
        due_at = max(due_at, _time(doc, "lease_until"))
    return make_slot(
        due_at, _time(doc, "created_at"), key, _text(doc, "uid"), _text(doc, "rid"),
        _count(doc, "attempts"),
    )  # fmt: skip


def entry_slot(entry: Entry) -> Slot:
    return make_slot(entry.due_at, entry.created_at, entry.id, entry.uid, entry.rid, entry.attempts)


def _mapping(doc: object) -> Mapping[str, Any]:
    if not isinstance(doc, dict | Mapping) or type(doc.get("_id")) is not str:
        doc_id = doc.get("_id") if isinstance(doc, Mapping) else None
        raise MalformedDocument(QUEUE, doc_id, "not a queue entry (no string _id)")
    return doc


# The checks below test exact types first: they run for every entry on a reload
# of a million, and BSON decodes to exactly these types.


def _text(doc: Mapping[str, Any], name: str) -> str:
    value = doc.get(name)
    if type(value) is not str or not value:
        raise MalformedDocument(QUEUE, doc["_id"], f"{name} is not a non-empty string")
    return value


def _time(doc: Mapping[str, Any], name: str) -> float:
    value = doc.get(name)
    if type(value) is float and isfinite(value):
        return value
    if type(value) is int:
        return float(value)
    raise MalformedDocument(QUEUE, doc["_id"], f"{name} is not epoch seconds")


def _count(doc: Mapping[str, Any], name: str) -> int:
    value = doc.get(name, 0)
    if type(value) is not int or value < 0:
        raise MalformedDocument(QUEUE, doc["_id"], f"{name} is not a count")
    return value


class QueueStore:
    """The side collection's operations, each one round trip (deletes shared by many)."""

    def __init__(self, collection: AsyncCollection[Doc], instance_id: str) -> None:
        self.collection = collection
        self.instance_id = instance_id
        self._deletes = GroupCommit(collection)

    async def ensure_indexes(self) -> None:
        await self.collection.create_indexes(
            [IndexModel("due_at"), IndexModel("uid"), IndexModel([("uid", 1), ("rid", 1)])]
        )

    async def operation_time(self) -> Timestamp | None:
        """The cluster's time now: following changes from here misses none made after it."""
        async with self.collection.database.client.start_session() as session:
            await self.collection.find_one({}, {"_id": 1}, session=session)
            return session.operation_time

    def scan(self) -> AsyncCursor[Doc]:
        """Every entry, with only the fields the schedule needs."""
        return self.collection.find({}, SLOT_FIELDS, batch_size=50_000)

    async def insert(
        self, entries: Sequence[Entry], leased: Collection[str] = (), until: float = 0.0
    ) -> set[str]:
        """Insert the entries in one unordered batch; the ids that were new.

        An entry already there (a replay, or another instance's insert) is left
        as it is, so an entry being retried keeps its attempts and due time: its
        insert fails on the unique `_id`, which is the answer "already queued".
        A plain insert, not an upsert: mongod then skips the lookup an upsert makes
        first, a tenth of its CPU per push on the bench. The `leased` ones are
        inserted already leased to this instance until `until`.
        """
        documents = [
            {**self._document(entry, leased, until), QUEUED_BY: self.instance_id}
            for entry in entries
        ]
        if not documents:
            return set()
        try:
            await self.collection.insert_many(documents, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details["writeErrors"]
            if any(e.get("code") != DUPLICATE_KEY for e in errors):
                raise
            failed = {e["index"] for e in errors}
            return {doc["_id"] for n, doc in enumerate(documents) if n not in failed}
        return {doc["_id"] for doc in documents}

    def _document(self, entry: Entry, leased: Collection[str], until: float) -> Doc:
        if entry.id in leased:
            return to_document(entry, self.instance_id, until)
        return to_document(entry)

    def others_changes(self) -> list[Doc]:
        """A change-stream pipeline leaving out this instance's own inserts and leases,
        and every delete.

        The instance applied its own writes to its schedule when it made them; echoed
        back they cost a lookup each, and an insert echoed after its entry was
        delivered and deleted would put it back in the schedule, for a refused lease
        later. Deletes carry no owner to tell them apart, and one comes for every
        push: following them cost more CPU (mongod's and the daemon's) than any other
        step of a push but the request itself. None is needed: an entry a read
        cleared is cleared by every instance from the same subscription change, and
        one another instance delivered sits in this schedule at its lease expiry,
        where one refused lease, shared with the rest of the batch, removes it.
        """
        mine = {"$ne": self.instance_id}
        # Written as $or of $ne: mongod 6.0 rejects the equivalent $nor when it
        # rewrites a change-stream filter ("$nor must be a nonempty array").
        return [
            {
                "$match": {
                    "$or": [
                        {"operationType": {"$nin": ["insert", "update", "delete"]}},
                        {"operationType": "insert", f"fullDocument.{QUEUED_BY}": mine},
                        {"operationType": "update", "updateDescription.updatedFields.owner": mine},
                    ]
                }
            }
        ]

    async def lease(self, keys: Sequence[str], now: float, until: float) -> dict[str, Doc]:
        """Take those of the entries that are due and not held by another live instance.

        Two round trips for a whole batch: one conditional update, stamped with a
        lease id of its own, then a read of the entries carrying that stamp.
        """
        if not keys:
            return {}
        stamp = ObjectId()
        await self.collection.update_many(
            {
                "_id": {"$in": list(keys)},
                "due_at": {"$lte": now},
                "$or": [
                    {"owner": None},
                    {"owner": self.instance_id},
                    {"lease_until": {"$lte": now}},
                ],
            },
            {"$set": {"owner": self.instance_id, "lease_until": until, LEASE_ID: stamp}},
        )
        cursor = self.collection.find({"_id": {"$in": list(keys)}, LEASE_ID: stamp})
        return {doc["_id"]: doc async for doc in cursor}

    async def find(self, keys: Sequence[str]) -> list[Doc]:
        return await self.collection.find({"_id": {"$in": list(keys)}}, SLOT_FIELDS).to_list()

    async def renew(self, keys: Sequence[str], until: float) -> None:
        """Extend this instance's leases on these entries."""
        await self.collection.update_many(
            {"_id": {"$in": list(keys)}, "owner": self.instance_id},
            {"$set": {"lease_until": until}},
        )

    async def release(self, keys: Sequence[str]) -> None:
        """Give the leases back without changing the entries."""
        await self.collection.update_many(
            {"_id": {"$in": list(keys)}, "owner": self.instance_id},
            {"$set": {"owner": None, "lease_until": 0.0}},
        )

    async def delete(self, key: str) -> None:
        """Grouped with the deletes of other deliveries finishing meanwhile: one per push
        would make the queue's command rate, not the provider, the limit."""
        await self._deletes.run([DeleteOne({"_id": key})])

    async def delete_read(self, reads: Sequence[Read], *, whole_user: bool) -> int:
        """Delete what the reads clear: the users' entries, or those of the rooms read,
        created up to the (latest) read."""
        latest: dict[tuple[str, str | None], float] = {}
        for uid, rid, at in reads:
            key = (uid, None if whole_user else rid)
            latest[key] = max(at, latest.get(key, at))
        if not latest:
            return 0
        clauses: list[Doc] = [
            {"uid": uid, **({} if rid is None else {"rid": rid}), "created_at": {"$lte": at}}
            for (uid, rid), at in sorted(latest.items(), key=lambda item: item[0][0])
        ]
        result = await self.collection.delete_many({"$or": clauses})
        return result.deleted_count

    async def bring_forward(self, uids: list[str], due_at: float) -> int:
        """Move the users' entries due after `due_at` to `due_at` (retries keep their back-off)."""
        result = await self.collection.update_many(
            {"uid": {"$in": list(uids)}, "attempts": 0, "due_at": {"$gt": due_at}},
            {"$set": {"due_at": due_at}},
        )
        return result.modified_count

    async def reschedule(self, entry: Entry, due_at: float, error: str, now: float) -> bool:
        """Record a failed attempt and release the lease; False if the lease was lost."""
        first_failure = now if entry.first_failure_at is None else entry.first_failure_at
        result = await self.collection.update_one(
            {"_id": entry.id, "owner": self.instance_id},
            {
                "$set": {
                    "due_at": due_at,
                    "first_failure_at": first_failure,
                    "last_error": error,
                    "owner": None,
                    "lease_until": 0.0,
                },
                "$inc": {"attempts": 1},
            },
        )
        return result.modified_count == 1
