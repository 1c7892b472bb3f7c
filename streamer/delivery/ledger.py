"""One push per (user, message, device token), and one mail per (user, message,
address), across crashes, restarts, replays and instances.

Before a push goes out, `claim` inserts a record `{_id: {uid, mid, token},
state: "sending"}`; the unique `_id` makes the insert the claim, so a push
that was answered is never sent again, whoever retries it. After a final
answer (sent, dead token, rejected) `finish` marks it "sent"; after a
temporary failure `release` deletes it so the retry may claim it again. A
TTL index on `at` removes records once no retry can need them.

The remaining window: the process dies after the provider accepted the push
but before `finish` was written (one round trip to MongoDB). The record then
stays "sending" and nobody can tell whether the push went out. The next
attempt (the queue hands an entry to one instance at a time, so the attempt
that wrote it is over) logs `push_outcome_unknown` and, as `[delivery]
unknown_outcome` says:

- "skip" (the default, SPEC §7's "at most one push per device"): does not
  send it. No duplicate, but claims are written before the request, so every
  request still being written, queued in the transport or unread by the
  provider when the process died is lost: 25-58 per crash at 256 in flight in
  tests/test_chaos_crash.py (docs/reliability.md has the runs).
- "resend": sends it again. Nothing is lost; the pushes the provider had taken
  but whose answer was not yet recorded arrive twice: 81-99 per crash in that
  test, at most `[delivery] concurrency`.

A claim whose release could not be written (MongoDB down) is known not to
have been sent: this process takes it over in either mode (`_unreleased`).
Only a claim made by an attempt still running in this process is never taken
over (`_live`).

A timeout is retried in both modes although the provider may have accepted:
it is far more common than a crash, and giving up on every slow answer would
lose pushes routinely (SPEC §7 retries timeouts). It is the one duplicate
window of the default.

Writes go to MongoDB in groups (`GroupCommit`): while one bulk write is in
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
from typing import Any, TypeVar

import structlog
from pymongo import DeleteOne, InsertOne, UpdateOne, WriteConcern
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from streamer.delivery.base import Recipient
from streamer.delivery.errors import Outcome
from streamer.groupcommit import GroupCommit

log = structlog.get_logger("streamer.delivery.ledger")
R = TypeVar("R", bound=Recipient)
Doc = dict[str, Any]

SENT_LEDGER = "streamer_sent"
#: Records outlive any retry: the queue drops an entry `[queue] max_age` after its
#: message's insert (2 h by default); a day is the least kept.
DEFAULT_TTL = 86_400.0
#: Beyond `max_age`, for the last attempt taken before it to end (leases, a slow SMTP).
LAST_ATTEMPT_MARGIN = 3600.0
SENDING = "sending"
SENT = "sent"
INDEX_OPTIONS_CONFLICT = 85
PRIMARY_ACKNOWLEDGED = WriteConcern(w=1)
#: Marks and releases kept in memory while MongoDB could not take them, at most.
REMEMBERED_LIMIT = 100_000
UNKNOWN_ACTIONS = {
    False: "skipped: at most one push per device ([delivery] unknown_outcome = skip)",
    True: "sent again: at least once per device ([delivery] unknown_outcome = resend)",
}


def ledger_ttl(max_age: float) -> float:
    """How long records are kept: a record expiring while an entry may still be
    retried would let the retry push a device that has the push already."""
    return max(DEFAULT_TTL, max_age + LAST_ATTEMPT_MARGIN)


def _key(uid: str, mid: str, device: Recipient) -> Doc:
    return {"uid": uid, "mid": mid, "token": device.token}


def _date(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.UTC)


class SentLedger:
    def __init__(
        self,
        db: AsyncDatabase[Doc],
        *,
        collection: str = SENT_LEDGER,
        ttl: float = DEFAULT_TTL,
        resend_unknown: bool = False,
    ) -> None:
        self._records = db.get_collection(collection, write_concern=PRIMARY_ACKNOWLEDGED)
        self._ttl = int(ttl)
        self._resend_unknown = resend_unknown
        self._writes = GroupCommit(self._records)
        #: Keys claimed by attempts of this process that have not ended yet.
        self._live: set[tuple[str, str, str]] = set()
        #: Keys whose release could not be written: left "sending", surely not sent.
        self._unreleased: dict[tuple[str, str, str], None] = {}
        #: Final answers whose mark could not be written (MongoDB away), by key.
        self._unwritten: dict[tuple[str, str, str], Outcome] = {}

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

    async def claim(self, uid: str, mid: str, devices: Sequence[R], now: float) -> list[R]:
        """The devices this attempt may push to; the others were pushed before, or are
        being pushed by another attempt in this process. Call `end` when the attempt ends."""
        await self._write_answers(uid, mid, devices, now)
        devices = [
            d
            for d in devices
            if (uid, mid, d.token) not in self._live and (uid, mid, d.token) not in self._unwritten
        ]
        self._live.update((uid, mid, d.token) for d in devices)
        claimed: list[R] = []
        try:
            records = [_claim_record(uid, mid, d, now) for d in devices]
            codes = await self._writes.run([InsertOne(record) for record in records])
            taken = [record["_id"] for record, code in zip(records, codes, strict=True) if code]
            retaken = await self._retaken(uid, mid, taken)
            claimed = [
                d for d, code in zip(devices, codes, strict=True) if not code or d.token in retaken
            ]
        finally:
            self.end(uid, mid, [d for d in devices if d not in claimed])
        return claimed

    def end(self, uid: str, mid: str, devices: Sequence[Recipient]) -> None:
        """The attempt that claimed `devices` is over, however it ended."""
        self._live.difference_update((uid, mid, d.token) for d in devices)

    async def finish(
        self, uid: str, mid: str, device: Recipient, outcome: Outcome, now: float
    ) -> None:
        """A final answer arrived: never push this message to this device again.

        If the mark cannot be written, the answer is kept in memory and written by
        the next `claim` of that push, which skips the device instead of sending
        it twice: a MongoDB outage costs no duplicate, only a crash does.
        """
        self.end(uid, mid, [device])
        self._unwritten[(uid, mid, device.token)] = outcome
        _bound(self._unwritten)
        await self._writes.run([_finish_op(uid, mid, device, outcome, now)])
        self._unwritten.pop((uid, mid, device.token), None)

    async def _write_answers(
        self, uid: str, mid: str, devices: Sequence[Recipient], now: float
    ) -> None:
        """Write the marks `finish` could not, for the devices about to be claimed."""
        answered = {
            d.token: (d, outcome)
            for d in devices
            if (outcome := self._unwritten.get((uid, mid, d.token))) is not None
        }
        if not answered:
            return
        await self._writes.run(
            [_finish_op(uid, mid, d, outcome, now) for d, outcome in answered.values()]
        )
        for token in answered:
            self._unwritten.pop((uid, mid, token), None)

    async def release(self, uid: str, mid: str, device: Recipient) -> None:
        """A temporary failure: the push did not go out, so a retry may claim it."""
        self.end(uid, mid, [device])
        key = (uid, mid, device.token)
        self._unreleased[key] = None
        _bound(self._unreleased)
        await self._writes.run([DeleteOne({"_id": _key(uid, mid, device), "state": SENDING})])
        self._unreleased.pop(key, None)

    async def _retaken(self, uid: str, mid: str, keys: list[Doc]) -> set[str]:
        """The tokens of claims an attempt that is over left "sending" that this attempt
        sends: those surely not sent, and, when resending, those that may have been."""
        if not keys:
            return set()
        tokens: set[str] = set()
        async for doc in self._records.find({"_id": {"$in": keys}, "state": SENDING}):
            token = doc["_id"]["token"]
            if (uid, mid, token) in self._unreleased:
                del self._unreleased[(uid, mid, token)]
                tokens.add(token)
                continue
            if self._resend_unknown:
                tokens.add(token)
            log.warning(
                "push_outcome_unknown",
                uid=uid,
                mid=mid,
                token_id=doc.get("token_id"),
                action=UNKNOWN_ACTIONS[self._resend_unknown],
            )
        return tokens


def _bound(remembered: dict[Any, Any]) -> None:
    """Forget the oldest once there are too many: an entry dropped before its retry
    (read meanwhile, given up) would otherwise stay for the life of the process."""
    while len(remembered) > REMEMBERED_LIMIT:
        del remembered[next(iter(remembered))]


def _claim_record(uid: str, mid: str, device: Recipient, now: float) -> Doc:
    return {
        "_id": _key(uid, mid, device),
        "state": SENDING,
        "at": _date(now),
        "token_id": device.token_id,
    }


def _finish_op(uid: str, mid: str, device: Recipient, outcome: Outcome, now: float) -> UpdateOne:
    update = {"$set": {"state": SENT, "outcome": outcome.value, "at": _date(now)}}
    return UpdateOne({"_id": _key(uid, mid, device)}, update)
