"""The notification queue: a pure heap and schedule policy, persisted to a side collection."""

from streamer.queue.entry import Entry, Kind, entry_id
from streamer.queue.queue import EXPIRED, Queue, Recheck

__all__ = ["EXPIRED", "Entry", "Kind", "Queue", "Recheck", "entry_id"]
