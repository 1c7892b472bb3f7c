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

A timeout is the one case that is retried although the provider may have
accepted: it is far more common than a crash, and giving up on every slow
answer would lose pushes routinely. That is the documented duplicate window.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import structlog
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, OperationFailure

from streamer.delivery.base import Device
from streamer.delivery.errors import Outcome

log = structlog.get_logger("streamer.delivery.ledger")
Doc = dict[str, Any]

SENT_LEDGER = "streamer_sent"
#: Records outlive any retry: the queue keeps an entry 2 h and gives up after 1 h.
DEFAULT_TTL = 86_400.0
SENDING = "sending"
SENT = "sent"
DUPLICATE_KEY = 11000
INDEX_OPTIONS_CONFLICT = 85


def _key(uid: str, mid: str, device: Device) -> Doc:
    return {"uid": uid, "mid": mid, "token": device.token}


def _date(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.UTC)


class SentLedger:
    def __init__(
        self, db: AsyncDatabase[Doc], *, collection: str = SENT_LEDGER, ttl: float = DEFAULT_TTL
    ) -> None:
        self._records = db[collection]
        self._ttl = int(ttl)

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
        if not devices:
            return []
        records: list[Doc] = [
            {"_id": _key(uid, mid, d), "state": SENDING, "at": _date(now), "token_id": d.token_id}
            for d in devices
        ]
        try:
            await self._records.insert_many(records, ordered=False)
        except BulkWriteError as exc:
            taken = _duplicate_indexes(exc)
            await self._log_unknown([records[i]["_id"] for i in taken])
            return [d for i, d in enumerate(devices) if i not in taken]
        return list(devices)

    async def finish(
        self, uid: str, mid: str, device: Device, outcome: Outcome, now: float
    ) -> None:
        """A final answer arrived: never push this message to this device again."""
        await self._records.update_one(
            {"_id": _key(uid, mid, device)},
            {"$set": {"state": SENT, "outcome": outcome.value, "at": _date(now)}},
        )

    async def release(self, uid: str, mid: str, device: Device) -> None:
        """A temporary failure: the push did not go out, so a retry may claim it."""
        await self._records.delete_one({"_id": _key(uid, mid, device), "state": SENDING})

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


def _duplicate_indexes(exc: BulkWriteError) -> set[int]:
    """Which inserts hit an existing record; any other write error is a real failure."""
    errors = exc.details.get("writeErrors", [])
    if any(e.get("code") != DUPLICATE_KEY for e in errors):
        raise exc
    return {int(e["index"]) for e in errors}
