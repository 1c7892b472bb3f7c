"""At most one push per (user, message, device token), across crashes and restarts.

Before a push goes out, `claim` inserts a record `{_id: {uid, mid, token},
state: "sending"}`; the unique `_id` makes the insert the claim, so two
attempts (a restart, a second instance whose lease overlapped) cannot both
push. After a final answer (sent, dead token, rejected) `finish` marks it
"sent"; after a temporary failure `release` deletes it so the retry may claim
it again. A TTL index on `at` removes records once no retry can need them.

The remaining window: the process dies after the provider accepted the push
but before `finish` was written (one round trip to MongoDB). The record then
stays "sending" and a restart **skips** that device: at-most-once. We choose
skipping because the spec's promise is "at most one push per (user, message,
device)" and a duplicate is visible to the user, while the same crash window
before the request left (equally short) costs one push that the user still
sees in the app's unread badge. Each skip is logged (`push_outcome_unknown`).
A push cancelled mid-request (shutdown past its grace period) is the same case.

A timeout is the one case that is retried although the provider may have
accepted: it is far more common than a crash, and giving up on every slow
answer would lose pushes routinely. That is the documented duplicate window.

Writes go to MongoDB in groups (`_GroupCommit`): while one bulk write is in
flight the next claims and marks gather, so the ledger costs a round trip per
batch rather than two per push — without it the ledger, not the provider,
limits throughput (see `python -m bench.delivery`).

They are acknowledged by the primary alone (w:1, no journal wait), ~40 % more
pushes/s on the bench. The ledger guards against *our* process dying, and
such writes survive that; only a crash of mongod itself within its journal
interval (~100 ms), or a fail-over that rolls back, can lose a mark — at
worst one duplicate push, the failure this record exists to make rare.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from pymongo import DeleteOne, InsertOne, UpdateOne, WriteConcern
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, OperationFailure

from streamer.delivery.base import Device
from streamer.delivery.errors import Outcome

log = structlog.get_logger("streamer.delivery.ledger")
Doc = dict[str, Any]
WriteOp = InsertOne[Doc] | UpdateOne | DeleteOne

SENT_LEDGER = "streamer_sent"
#: Records outlive any retry: the queue keeps an entry 2 h and gives up after 1 h.
DEFAULT_TTL = 86_400.0
SENDING = "sending"
SENT = "sent"
DUPLICATE_KEY = 11000
INDEX_OPTIONS_CONFLICT = 85
PRIMARY_ACKNOWLEDGED = WriteConcern(w=1)


def _key(uid: str, mid: str, device: Device) -> Doc:
    return {"uid": uid, "mid": mid, "token": device.token}


def _date(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.UTC)


class SentLedger:
    def __init__(
        self, db: AsyncDatabase[Doc], *, collection: str = SENT_LEDGER, ttl: float = DEFAULT_TTL
    ) -> None:
        self._records = db.get_collection(collection, write_concern=PRIMARY_ACKNOWLEDGED)
        self._ttl = int(ttl)
        self._writes = _GroupCommit(self._records)

    async def ensure_indexes(self) -> None:
        """The TTL index that bounds the ledger; a changed `ttl` is applied in place."""
        try:
            await self._records.create_index("at", expireAfterSeconds=self._ttl)
        except OperationFailure as exc:
            if exc.code != INDEX_OPTIONS_CONFLICT:
                raise
            await self._records.database.command(
                "collMod",
                self._records.name,
                index={"keyPattern": {"at": 1}, "expireAfterSeconds": self._ttl},
            )

    async def claim(
        self, uid: str, mid: str, devices: Sequence[Device], now: float
    ) -> list[Device]:
        """The devices this attempt may push to; the others were pushed (or tried) before."""
        records: list[Doc] = [
            {"_id": _key(uid, mid, d), "state": SENDING, "at": _date(now), "token_id": d.token_id}
            for d in devices
        ]
        codes = await self._writes.run([InsertOne(record) for record in records])
        taken = [record["_id"] for record, code in zip(records, codes, strict=True) if code]
        await self._log_unknown(taken)
        return [d for d, code in zip(devices, codes, strict=True) if not code]

    async def finish(
        self, uid: str, mid: str, device: Device, outcome: Outcome, now: float
    ) -> None:
        """A final answer arrived: never push this message to this device again."""
        update = {"$set": {"state": SENT, "outcome": outcome.value, "at": _date(now)}}
        await self._writes.run([UpdateOne({"_id": _key(uid, mid, device)}, update)])

    async def release(self, uid: str, mid: str, device: Device) -> None:
        """A temporary failure: the push did not go out, so a retry may claim it."""
        await self._writes.run([DeleteOne({"_id": _key(uid, mid, device), "state": SENDING})])

    async def _log_unknown(self, keys: list[Doc]) -> None:
        """Claims left "sending" by a crash: the push may or may not have gone out."""
        if not keys:
            return
        async for doc in self._records.find({"_id": {"$in": keys}, "state": SENDING}):
            log.warning(
                "push_outcome_unknown",
                uid=doc["_id"]["uid"],
                mid=doc["_id"]["mid"],
                token_id=doc.get("token_id"),
                action="skipped: at most one push per device",
            )


@dataclass
class _Pending:
    ops: list[WriteOp]
    #: Per op: None, or the duplicate-key code when an insert found its record.
    codes: list[int | None] = field(default_factory=list)
    failure: BaseException | None = None
    done: bool = False


class _GroupCommit:
    """Many callers' small writes as one unordered bulk write (a group commit).

    Each caller queues its ops and takes the lock; whoever holds it writes
    everything queued so far, so callers that arrive during a write share the
    next one. No background task, no timer: an idle ledger writes at once.
    """

    def __init__(self, records: AsyncCollection[Doc]) -> None:
        self._records = records
        self._queued: list[_Pending] = []
        self._lock = anyio.Lock()

    async def run(self, ops: list[WriteOp]) -> list[int | None]:
        if not ops:
            return []
        mine = _Pending(ops)
        self._queued.append(mine)
        async with self._lock:
            if not mine.done:
                batch, self._queued = self._queued, []
                await self._write(batch)
        if mine.failure is not None:
            raise mine.failure
        return mine.codes

    async def _write(self, batch: list[_Pending]) -> None:
        ops = [op for pending in batch for op in pending.ops]
        codes: dict[int, int] = {}
        failure: BaseException | None = None
        try:
            await self._records.bulk_write(ops, ordered=False)
        except BulkWriteError as exc:
            codes = {int(e["index"]): int(e["code"]) for e in exc.details.get("writeErrors", [])}
            if exc.details.get("writeConcernErrors"):
                failure = exc
        except Exception as exc:
            failure = exc
            raise
        except BaseException:  # cancelled: the others must not wait for this write forever
            failure = OperationFailure("ledger write was cancelled")
            raise
        finally:
            _settle(batch, codes, failure)


def _settle(batch: list[_Pending], codes: dict[int, int], failure: BaseException | None) -> None:
    """Hand each caller its ops' results; any error but a duplicate claim is a failure."""
    index = 0
    for pending in batch:
        pending.codes = [codes.get(i) for i in range(index, index + len(pending.ops))]
        index += len(pending.ops)
        errors = [c for c in pending.codes if c is not None and c != DUPLICATE_KEY]
        if failure is not None:
            pending.failure = failure
        elif errors:
            pending.failure = OperationFailure(f"ledger write failed (code {errors[0]})", errors[0])
        pending.done = True
