"""One queued notification: who, which message, which channel, when, and its retry history."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["push", "email"]


def entry_id(uid: str, mid: str, kind: Kind) -> str:
    """The entry's `_id` in the side collection.

    Deterministic, so a replayed change-stream batch, or several instances
    reading the same message, write one document instead of queueing twice.
    """
    return f"{uid}:{mid}:{kind}"


def uid_of(key: str) -> str:
    """The user id inside an entry id (Rocket.Chat user ids never contain ':').

    Only a hint for the in-memory schedule: a wrong answer costs a lookup, not a
    wrong delivery, because the side collection decides every lease.
    """
    return key.partition(":")[0]


@dataclass(frozen=True, slots=True)
class Entry:
    uid: str
    rid: str
    mid: str
    kind: Kind
    due_at: float
    created_at: float
    attempts: int = 0
    first_failure_at: float | None = None
    last_error: str | None = None

    @property
    def id(self) -> str:
        return entry_id(self.uid, self.mid, self.kind)
