"""The in-memory schedule: queued entries ordered by (due_at, created_at).

Pure: no I/O and no clock (callers pass `now`). It holds only what ordering and
the documented rules need — the rest of an entry lives in the side collection
and comes back when the entry is leased — so a million entries fit in a few
hundred megabytes.

The heap is split by the whole second an entry is due: a small heap of seconds,
and one heap per second. Due times cluster (now, now + 120 s, a retry's back-off),
so each per-second heap is shallow and its slots sit close together in memory;
popping costs about half what one heap of a million entries does.

Removal is lazy: a removed or rescheduled entry's old slot stays where it is and
is skipped when it reaches the top (its user's index no longer points to that
very slot). Reading a room therefore costs O(entries of that user), never a scan
of the heap; the heaps are rebuilt when dead slots outnumber live ones.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from heapq import heapify, heappop, heappush
from math import floor
from typing import NamedTuple


class Slot(NamedTuple):
    """One entry's place in the schedule; ordered by due_at, then creation, then key."""

    due_at: float
    created_at: float
    key: str
    uid: str
    rid: str
    #: Entries being retried keep their back-off: the rules that bring a user's
    #: entries forward leave them alone.
    attempts: int


#: Dead slots tolerated before a rebuild, beyond the number of live ones.
_COMPACT_SLACK = 1024
#: A recorded change, to apply again to another schedule.
Change = Callable[["Schedule"], object]


class Schedule:
    """Entries by due time, indexed by user so a read or a presence change is cheap."""

    __slots__ = ("_buckets", "_dead", "_journal", "_live", "_seconds", "_users")

    def __init__(self, slots: Iterable[Slot] = ()) -> None:
        #: Per whole second of due time, a heap of the slots due in it.
        self._buckets: dict[int, list[Slot]] = {}
        #: A heap of the seconds that have a bucket.
        self._seconds: list[int] = []
        #: The live slot of every entry, by user then entry id.
        self._users: dict[str, dict[str, Slot]] = {}
        self._live = 0
        self._dead = 0
        #: While not None, every change is also recorded here (see `record`).
        self._journal: list[Change] | None = None
        for slot in slots:
            self._index(slot)
        self._compact()

    def __len__(self) -> int:
        return self._live

    def get(self, uid: str, key: str) -> Slot | None:
        entries = self._users.get(uid)
        return None if entries is None else entries.get(key)

    def record(self) -> list[Change]:
        """From now until `stop_recording`, record every change in the returned list.

        For a rebuild from the collection while the schedule stays in use: the scan
        may read an entry before or after a change made meanwhile, so the changes
        are applied again to the rebuilt schedule (`replay`).
        """
        self._journal = []
        return self._journal

    def stop_recording(self) -> None:
        self._journal = None

    def replay(self, changes: Iterable[Change]) -> None:
        for change in changes:
            change(self)

    def put(self, slot: Slot) -> None:
        """Add an entry, or move it to the slot's time if it is already scheduled."""
        if self._journal is not None:
            self._journal.append(lambda schedule: schedule.put(slot))
        self._put(slot)

    def _put(self, slot: Slot) -> None:
        self._index(slot)
        second = floor(slot.due_at)
        bucket = self._buckets.get(second)
        if bucket is None:
            self._buckets[second] = bucket = []
            heappush(self._seconds, second)
        heappush(bucket, slot)

    def _index(self, slot: Slot) -> None:
        _, _, key, uid, _, _ = slot
        entries = self._users.get(uid)
        if entries is None:
            self._users[uid] = entries = {}
        if key in entries:
            self._dead += 1
        else:
            self._live += 1
        entries[key] = slot

    def remove(self, uid: str, key: str) -> bool:
        if self._journal is not None:
            self._journal.append(lambda schedule: schedule.remove(uid, key))
        entries = self._users.get(uid)
        if entries is None or entries.pop(key, None) is None:
            return False
        self._forgotten(uid, entries, 1)
        return True

    def remove_read(self, uid: str, rid: str | None, read_at: float) -> list[str]:
        """Remove the user's entries created up to `read_at`, of room `rid` or of every
        room (None); their keys. What came after the read is still unread."""
        if self._journal is not None:
            self._journal.append(lambda schedule: schedule.remove_read(uid, rid, read_at))
        entries = self._users.get(uid, {})
        keys = [
            key
            for key, slot in entries.items()
            if slot.created_at <= read_at and (rid is None or slot.rid == rid)
        ]
        for key in keys:
            del entries[key]
        self._forgotten(uid, entries, len(keys))
        return keys

    def _forgotten(self, uid: str, entries: dict[str, Slot], count: int) -> None:
        self._live -= count
        self._dead += count
        if not entries:
            self._users.pop(uid, None)
        if self._dead > self._live + _COMPACT_SLACK:
            self._compact()

    def _compact(self) -> None:
        """Rebuild the heaps from the live slots alone."""
        buckets: dict[int, list[Slot]] = {}
        for entries in self._users.values():
            for slot in entries.values():
                buckets.setdefault(floor(slot.due_at), []).append(slot)
        for bucket in buckets.values():
            heapify(bucket)
        self._buckets = buckets
        self._seconds = list(buckets)
        heapify(self._seconds)
        self._dead = 0

    def later(self, uid: str, due_at: float) -> list[Slot]:
        """The user's entries (not being retried) due after `due_at`."""
        entries = self._users.get(uid, {})
        return [s for s in entries.values() if s.due_at > due_at and not s.attempts]

    def bring_forward(self, uid: str, due_at: float) -> int:
        """Move the user's entries due after `due_at` (not being retried) to `due_at`."""
        if self._journal is not None:
            self._journal.append(lambda schedule: schedule.bring_forward(uid, due_at))
        moved = self.later(uid, due_at)
        for slot in moved:
            self._put(slot._replace(due_at=due_at))
        return len(moved)

    def first(self) -> Slot | None:
        """The earliest live entry, left in place (dead slots on top are dropped)."""
        seconds, buckets, users = self._seconds, self._buckets, self._users
        while seconds:
            bucket = buckets[seconds[0]]
            if not bucket:
                del buckets[heappop(seconds)]
                continue
            head = bucket[0]
            _, _, key, uid, _, _ = head
            entries = users.get(uid)
            if entries is not None and entries.get(key) is head:
                return head
            heappop(bucket)
            self._dead -= 1
        return None

    def pop_due(self, now: float) -> Slot | None:
        """Take out the earliest entry if it is due at `now`."""
        head = self.first()
        if head is None or head.due_at > now:
            return None
        heappop(self._buckets[self._seconds[0]])
        if self._journal is not None:
            self._journal.append(lambda schedule: schedule.remove(head.uid, head.key))
        entries = self._users[head.uid]
        del entries[head.key]
        if not entries:
            del self._users[head.uid]
        self._live -= 1
        return head


def make_slot(
    due_at: float, created_at: float, key: str, uid: str, rid: str, attempts: int = 0
) -> Slot:
    """A slot whose user and room ids are shared with every other entry of theirs.

    The same ids repeat across many entries; one copy of each keeps memory per
    entry down to the entry's own fields.
    """
    return Slot(due_at, created_at, key, sys.intern(uid), sys.intern(rid), attempts)
