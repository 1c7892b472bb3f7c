"""The notification queue: a pure heap and schedule policy, persisted to a side collection."""

from streamer.queue.entry import Entry, Kind, entry_id
from streamer.queue.queue import EXPIRED, Queue

__all__ = ["EXPIRED", "Entry", "Kind", "Queue", "entry_id"]
