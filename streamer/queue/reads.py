"""The latest read of each user (or room), remembered for entries queued after it.

Messages and reads come by two change streams, each at its own pace. A message
inserted before a read, but handled after it (its stream behind, reconnecting,
or replaying), would be queued after the read cleared the queue, and sent
although read: Rocket.Chat, clearing at the moment of the read, never sends it.
The fire-time re-check catches it for the room read, not for the user's other
rooms that `clear_on_read = "user"` clears too. Pure: no I/O, no clock.
"""

from __future__ import annotations

from streamer.queue.entry import Entry

#: Reads remembered at most, the oldest forgotten first: a stream is seconds behind
#: the other, not days, and a user reading again is remembered anew.
REMEMBERED = 100_000


class RecentReads:
    def __init__(self, *, whole_user: bool, limit: int = REMEMBERED) -> None:
        self._whole_user = whole_user
        self._limit = limit
        self._latest: dict[tuple[str, str | None], float] = {}

    def note(self, uid: str, rid: str, at: float) -> None:
        key = self._key(uid, rid)
        latest = max(at, self._latest.pop(key, at))  # re-inserted: the newest last
        self._latest[key] = latest
        if len(self._latest) > self._limit:
            del self._latest[next(iter(self._latest))]

    def cleared(self, entry: Entry) -> bool:
        """Created no later than a read it would have been cleared by."""
        read_at = self._latest.get(self._key(entry.uid, entry.rid))
        return read_at is not None and entry.created_at <= read_at

    def _key(self, uid: str, rid: str) -> tuple[str, str | None]:
        return (uid, None if self._whole_user else rid)
