"""The notification queue: the documented scheduling rules over a persisted heap.

The side collection is the truth; the in-memory `Schedule` says which entry to
try next. Every entry is leased in the collection before it is handed out, so
a stale schedule (another instance's write, a read that just cleared the
entry) costs one lookup and never a duplicate or a lost notification.

The app's order: `load()`, then `tg.start(queue.follow)` when several instances
share the collection; `add()` once per change-stream batch before saving the
resume token; consumers loop on `next_due(limit)` and settle each entry with
`done()`, `retry()`, `drop()` or, when interrupted, `release()`. `next_due()` is
safe to await from several tasks at once; it leases a batch of due entries in
two round trips, so one caller keeps hundreds of deliveries fed.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus
from bson import Timestamp
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import PyMongoError

from streamer import metrics
from streamer.changebatch import next_batch
from streamer.config import QueueConfig
from streamer.directory import parse_or_log
from streamer.queue.entry import Entry, uid_of
from streamer.queue.heap import Schedule, Slot, make_slot
from streamer.queue.reads import RecentReads
from streamer.queue.store import Doc, QueueStore, Read, entry_slot, parse_entry, parse_slot

log = structlog.get_logger("streamer.queue")

#: Reason code of entries that waited longer than `[queue] max_age`.
EXPIRED = "expired"
#: Pause before trying the database again after it failed.
RECONNECT_DELAY = 1.0
#: Seconds other instances' changes gather between reads (see `sources.StreamTuning`):
#: the schedule needs them soon, not at once, since every lease is checked anyway.
FOLLOW_GATHER = 0.1


class Queue:
    """Entries by due time, durable in `collection`, leased to one instance at a time."""

    def __init__(
        self,
        collection: AsyncCollection[Doc],
        config: QueueConfig,
        *,
        instance_id: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = QueueStore(collection, instance_id)
        self._config = config
        self._clock = clock
        self._schedule = Schedule()
        #: Entries this instance has leased and not yet settled.
        self._held: set[str] = set()
        #: Entries this instance inserted already leased to itself, with that lease's
        #: expiry: taken while half the lease is left, they need no lease write.
        self._owned: dict[str, tuple[Entry, float]] = {}
        self._reads = RecentReads(whole_user=config.clear_on_read != "room")
        self._changed: anyio.Event | None = None
        self._synced_at: Timestamp | None = None
        self._parse_slot = functools.partial(parse_slot, instance_id=instance_id)
        # Read at scrape time: set on changes only, the age would freeze exactly when
        # delivery stalls and nothing changes.
        metrics.QUEUE_DEPTH.set_function(lambda: len(self))
        metrics.QUEUE_OLDEST_DUE_AGE.set_function(self._oldest_due_age)

    def __len__(self) -> int:
        return len(self._schedule) + len(self._held)

    def next_due_at(self) -> float | None:
        """When the earliest entry this instance knows of is due; None when there is none."""
        first = self._schedule.first()
        return None if first is None else first.due_at

    async def load(self) -> None:
        """Create the indexes and rebuild the schedule from the collection."""
        await self._store.ensure_indexes()
        await self._reload()

    async def _reload(self) -> None:
        """Rebuild the schedule from the collection.

        Takers keep using the old schedule while the scan runs (several round trips
        at scale): what they change meanwhile — entries taken, given back, retried,
        added, cleared — is recorded and applied again to the new one, since the scan
        may have read each such entry before the change or after it.
        """
        self._synced_at = await self._store.operation_time()
        changes = self._schedule.record()
        try:
            slots = [slot async for doc in self._store.scan() if (slot := self._slot(doc))]
        finally:
            self._schedule.stop_recording()
        schedule = Schedule(slot for slot in slots if slot.key not in self._held)
        schedule.replay(changes)
        self._schedule = schedule
        self._owned.clear()  # still ours, but taken through the lease from now on
        log.info("queue_loaded", entries=len(self._schedule))
        self._changed_now()

    def _slot(self, doc: Doc) -> Slot | None:
        return parse_or_log(self._parse_slot, doc)

    async def add(self, entries: Sequence[Entry]) -> None:
        """Queue the entries durably (one write); an entry already queued is left as it is.

        While the insert is awaited, `follow` may already have scheduled a new entry
        from its change event, and a taker leased it: scheduling it again then would
        hand it out twice (the lease accepts this instance's own), so held ones are skipped.

        Entries due at once are inserted leased to this instance: it takes them within
        milliseconds, and the lease write and read-back they would cost then are saved.

        An entry already queued but known nowhere here is read back and scheduled: the
        batch is being handled again after an insert that was applied although it
        reported an error, or it was queued by another instance whose insert the
        follower has not shown yet.
        """
        entries = self._unread(entries)
        now = self._clock()
        until = now + self._config.lease_seconds
        due_now = {entry.id for entry in entries if entry.due_at <= now}
        self._forget_owned_past_half_lease(now)
        try:
            new = await self._store.insert(entries, leased=due_now, until=until)
        except anyio.get_cancelled_exc_class():
            # Shutdown: the insert may still land, leased to us; the clean stop frees
            # them (release_owned) rather than leave them to wait out the lease.
            self._owned.update((e.id, (e, until)) for e in entries if e.id in due_now)
            raise
        unknown = []
        for entry in entries:
            if entry.id in self._held:
                continue
            if entry.id in new:
                self._schedule.put(entry_slot(entry))
                if entry.id in due_now:
                    self._owned[entry.id] = (entry, until)
            elif self._schedule.get(entry.uid, entry.id) is None:
                unknown.append(entry.id)
        if unknown:
            await self._resync(unknown)
        self._changed_now()

    def _unread(self, entries: Sequence[Entry]) -> list[Entry]:
        """Leave out entries a read already handled would have cleared (`RecentReads`)."""
        unread: list[Entry] = []
        for entry in entries:
            if not self._reads.cleared(entry):
                unread.append(entry)
                continue
            log.info(
                "queue_cleared_on_read",
                uid=entry.uid, rid=entry.rid, mid=entry.mid, cleared=1,
                when="read before its message was handled",
            )  # fmt: skip
            metrics.QUEUE_CLEARED.inc()
        return unread

    async def clear_reads(self, reads: Sequence[Read]) -> int:
        """Users read rooms (uid, rid, at): remove their entries queued before the read
        (all of the user's, or that room's), in one write for the batch. A message that
        came after the read, handled first by the other stream, stays queued."""
        whole_user = self._config.clear_on_read != "room"
        cleared = await self._store.delete_read(reads, whole_user=whole_user)
        for uid, rid, at in reads:
            self._reads.note(uid, rid, at)
            removed = self._schedule.remove_read(uid, None if whole_user else rid, at)
            for key in removed:  # an owned entry is in the schedule until it is taken
                self._owned.pop(key, None)
            if removed:
                log.info("queue_cleared_on_read", uid=uid, rid=rid, cleared=len(removed))
        metrics.QUEUE_CLEARED.inc(cleared)
        return cleared

    async def users_offline(self, uids: list[str]) -> int:
        """The users went offline: their delayed entries are due now (one write)."""
        if not self._config.reschedule_on_presence or not uids:
            return 0
        now = self._clock()
        moved = await self._store.bring_forward(uids, now)
        for uid in uids:
            if brought := self._schedule.bring_forward(uid, now):
                log.info("queue_brought_forward", uid=uid, entries=brought)
        self._changed_now()
        return moved

    async def next_due(self, limit: int = 1) -> list[Entry]:
        """Wait for due entries, lease up to `limit` of them to this instance at once.

        On the way, entries older than `max_age` are dropped, and the documented
        per-user order is kept (see `_flushed`). The caller settles each entry
        with done, retry or drop. Never returns an empty list.
        """
        while True:
            slots = await self._due_slots(limit)
            try:
                entries = await self._take(slots)
            except PyMongoError as exc:
                self._give_back(slots)
                log.warning("queue_lease_failed", entries=len(slots), error=str(exc))
                await anyio.sleep(RECONNECT_DELAY)
                continue
            except BaseException:
                self._give_back(slots)
                with anyio.move_on_after(RECONNECT_DELAY, shield=True):
                    await self._store.release([slot.key for slot in slots])  # if leased
                raise
            if entries:
                return entries

    async def _due_slots(self, limit: int) -> list[Slot]:
        while True:
            now = self._clock()
            slots: list[Slot] = []
            while len(slots) < limit and (slot := self._schedule.pop_due(now)) is not None:
                slots.append(slot)
            if slots:
                self._held.update(slot.key for slot in slots)
                return slots
            first = self._schedule.first()
            if self._changed is None:
                self._changed = anyio.Event()
            changed = self._changed
            with anyio.move_on_after(math.inf if first is None else first.due_at - now):
                await changed.wait()

    def _give_back(self, slots: Sequence[Slot]) -> None:
        """Entries whose handling was interrupted are tried again (the leases are ours)."""
        for slot in slots:
            self._held.discard(slot.key)
            self._schedule.put(slot)
        self._changed_now()

    async def _take(self, slots: Sequence[Slot]) -> list[Entry]:
        now = self._clock()
        owned = self._still_owned(slots, now)
        keys = [slot.key for slot in slots if slot.key not in owned]
        leased = await self._store.lease(keys, now, now + self._config.lease_seconds)
        refused = [key for key in keys if key not in leased]
        self._held.difference_update(refused)
        entries = []
        for slot in slots:
            if slot.key in owned:
                entry: Entry | None = owned[slot.key]
            elif slot.key in leased:
                entry = await self._parsed(leased[slot.key])
            else:
                continue
            if entry is not None and await self._usable(entry, now):
                entries.append(entry)
        if refused:
            await self._resync(refused)
        return entries

    def _forget_owned_past_half_lease(self, now: float) -> None:
        """Past half its lease an entry inserted leased is taken through a lease write all
        the same (`_still_owned`): its copy kept here would only hold memory, hundreds of
        bytes an entry, for as long as the courier is behind. Oldest first, as added."""
        half = self._config.lease_seconds / 2
        for key, (_, until) in list(itertools.islice(self._owned.items(), 1000)):
            if until - now >= half:
                return
            del self._owned[key]

    def _still_owned(self, slots: Sequence[Slot], now: float) -> dict[str, Entry]:
        """Of the slots, the entries inserted leased to this instance whose lease has at
        least half its time left: enough to deliver them before anyone may take over."""
        found = {}
        for slot in slots:
            owned = self._owned.pop(slot.key, None)
            if owned is None or slot.attempts:
                continue
            entry, until = owned
            if until - now >= self._config.lease_seconds / 2:
                found[slot.key] = entry
        return found

    async def _parsed(self, doc: Doc) -> Entry | None:
        entry = parse_or_log(parse_entry, doc)
        if entry is None:
            await self._forget(doc["_id"])
        return entry

    async def _usable(self, entry: Entry, now: float) -> bool:
        """False when the entry was dropped or put back instead of handed out."""
        if now - entry.created_at > self._config.max_age:
            await self.drop(entry, EXPIRED)
            return False
        return not await self._flushed(entry, now)

    async def _resync(self, keys: Sequence[str]) -> None:
        """Leases were refused: place those entries where the collection says they are."""
        for doc in await self._store.find(keys):
            slot = self._slot(doc)
            if slot is not None and slot.key not in self._held:
                self._schedule.put(slot)
        self._changed_now()

    async def _flushed(self, entry: Entry, now: float) -> bool:
        """The documented rule: once a user's entry is processed, their other scheduled
        entries are due too, and this one goes back if one of them was created before
        it, so all go out in creation order.

        They are moved to this entry's due time (not the clock's now), so an entry
        created earlier sorts first even when the queue runs behind. Entries already
        due and created after this one are left alone: they follow it anyway. That
        is a burst to an offline user, where moving them cost two writes and a
        second lease for each entry but the last.
        """
        later = self._schedule.later(entry.uid, entry.due_at)
        if not any(s.due_at > now or s.created_at < entry.created_at for s in later):
            return False
        moved = await self._store.bring_forward([entry.uid], entry.due_at)
        self._schedule.bring_forward(entry.uid, entry.due_at)
        if not moved or all(s.created_at >= entry.created_at for s in later):
            return False
        await self.release(entry)
        return True

    async def done(self, entry: Entry) -> None:
        """The entry was delivered (or given up): it leaves the queue."""
        await self._forget(entry.id)

    async def _forget(self, key: str) -> None:
        try:
            await self._store.delete(key)
        finally:
            self._held.discard(key)
            self._owned.pop(key, None)

    async def retry(self, entry: Entry, due_at: float, error: str) -> None:
        """Try again at `due_at`; the attempt is recorded, so retries survive restarts."""
        try:
            kept = await self._store.reschedule(entry, due_at, error, self._clock())
        finally:
            self._held.discard(entry.id)
            self._owned.pop(entry.id, None)
        if kept:
            self._schedule.put(
                make_slot(
                    due_at, entry.created_at, entry.id, entry.uid, entry.rid, entry.attempts + 1
                )
            )
        else:
            log.info(
                "queue_retry_skipped",
                uid=entry.uid, rid=entry.rid, mid=entry.mid,
                why="entry was cleared by a read or taken over by another instance",
            )  # fmt: skip
        self._changed_now()

    async def release(self, *entries: Entry) -> None:
        """Give entries back untouched (their delivery was interrupted, say by shutdown):
        they stay due, and any instance may take them at once instead of after the lease.

        Back in the schedule even when the write fails (MongoDB away): the leases are
        still ours, so this instance takes the entries again once MongoDB is back.
        """
        try:
            await self._store.release([entry.id for entry in entries])
        finally:
            for entry in entries:
                self._held.discard(entry.id)
                self._owned.pop(entry.id, None)
                self._schedule.put(entry_slot(entry))
            self._changed_now()

    async def keep_leases(self) -> None:
        """Renew the leases of the entries being delivered, every third of a lease.

        A delivery may outlast its lease (an SMTP conversation of slow steps, a
        provider retried within one attempt): another instance would then take the
        entry and deliver it a second time, concurrently.
        """
        while True:
            await anyio.sleep(self._config.lease_seconds / 3)
            try:
                await self.renew_held()
            except PyMongoError as exc:
                log.warning("queue_lease_renewal_failed", entries=len(self._held), error=str(exc))

    async def renew_held(self) -> None:
        if self._held:
            until = self._clock() + self._config.lease_seconds
            await self._store.renew(list(self._held), until)

    async def release_owned(self) -> None:
        """At shutdown: free the entries inserted leased to this instance and not yet
        taken, so a restart or another instance takes them at once, not after the lease."""
        if self._owned:
            await self._store.release(list(self._owned))
            self._owned.clear()

    async def drop(self, entry: Entry, reason: str) -> None:
        """The entry will not be sent: it leaves the queue with a reason in the log."""
        await self._forget(entry.id)
        log.info(
            "queue_entry_dropped",
            uid=entry.uid, rid=entry.rid, mid=entry.mid, kind=entry.kind, reason=reason,
        )  # fmt: skip
        metrics.QUEUE_DROPPED.labels(reason).inc()

    async def follow(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the schedule in step with the collection as other instances write it.

        Needed when several instances share the collection: it is how one sees
        entries another inserted, retried or leased, and takes over entries whose
        owner died. Deletes are not followed (see `QueueStore.others_changes`).
        After any interruption the schedule is rebuilt from the collection, since
        changes in between were not seen.
        """
        started = False
        resync = False
        while True:
            try:
                if resync:
                    await self._reload()
                async with await self._store.collection.watch(
                    self._store.others_changes(),
                    full_document="updateLookup",
                    start_at_operation_time=self._synced_at,
                ) as stream:
                    if not started:
                        task_status.started()
                        started = True
                    while stream.alive:
                        for change in await next_batch(stream):
                            self._apply(change)
                        await anyio.sleep(FOLLOW_GATHER)
            except PyMongoError as exc:
                log.warning("queue_follow_interrupted", error=str(exc))
                await anyio.sleep(RECONNECT_DELAY)
            resync = True

    def _apply(self, change: Mapping[str, Any]) -> None:
        key = change.get("documentKey", {}).get("_id")
        if not isinstance(key, str) or key in self._held:
            return
        doc = change.get("fullDocument")
        if doc is None:
            if change.get("operationType") in ("update", "replace"):  # deleted meanwhile
                self._schedule.remove(uid_of(key), key)
                self._owned.pop(key, None)
            return
        slot = self._slot(doc)
        if slot is not None and self._schedule.get(slot.uid, key) != slot:
            self._schedule.put(slot)
            self._changed_now()

    def _changed_now(self) -> None:
        """Wake `next_due` to look again."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _oldest_due_age(self) -> float:
        first = self._schedule.first()
        return 0.0 if first is None else max(0.0, self._clock() - first.due_at)
