"""Typed events the sources hand downstream; nothing downstream sees a raw change document."""

from __future__ import annotations

from dataclasses import dataclass

from streamer.model import Message, Presence


@dataclass(frozen=True, slots=True)
class MessageInserted:
    message: Message
    #: Server time of the insert (change event clusterTime), epoch seconds.
    cluster_time: float


@dataclass(frozen=True, slots=True)
class RoomRead:
    """The user read a room: a subscription update set `ls` or zeroed `unread`."""

    uid: str
    rid: str
    #: Server time of the read (the change's wallTime), epoch seconds: what was
    #: queued before it is read; what came after it is not.
    at: float


@dataclass(frozen=True, slots=True)
class ThreadRead:
    """The user read a thread: `tunread` lost `tmid`."""

    uid: str
    rid: str
    tmid: str
    #: As `RoomRead.at`.
    at: float


@dataclass(frozen=True, slots=True)
class PresenceChanged:
    uid: str
    status: Presence
    previous: Presence | None
    #: When the daemon saw the change (epoch seconds): "away since" when status is away.
    at: float


SourceEvent = MessageInserted | RoomRead | ThreadRead | PresenceChanged
