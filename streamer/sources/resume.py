"""Where each change stream left off, persisted in the state collection.

One document per (instance, stream): `_id = "resume:<instance>:<stream>"`, holding
the resume token saved after the batch it ends was handled. Saving after the
handler (never before) is what makes a restart lose nothing: a batch whose
handler did not finish is read again, and downstream is idempotent by message id.

An instance with no token of its own for a stream (its `instance_id` was set or
changed, or it joins instances already running) picks up at the newest token
another instance saved for that stream rather than at "now": the changes in
between were handled by that instance, or are handled again (idempotent), and
none is skipped. The messages stream goes further: an instance restarting
behind another resumes at the other's newer token, since every message before
it is durably queued by that instance already, and a message queued again after
its entry was delivered costs a lookup and a refused ledger claim. Not across a
lost history, though: an instance whose position fell off the oplog went on from
"now", the loss is kept in its position (`history_lost_at`), and an instance
behind that instant reads on from its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from typing import Any, NamedTuple

import structlog
from bson import Timestamp
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from streamer import metrics

log = structlog.get_logger("streamer.sources.resume")
Doc = dict[str, Any]
#: When a stream's history was lost (epoch seconds): kept for good in its position.
LOST_AT = "history_lost_at"


def token_time(token: Mapping[str, Any] | None) -> float | None:
    """The cluster time (epoch seconds) a resume token points at, if it can be read.

    A token's `_data` is a hex KeyString that starts with the type byte 0x82 and
    the 4-byte seconds of the event's cluster time.
    """
    data = None if token is None else token.get("_data")
    if not isinstance(data, str) or len(data) < 10 or not data.startswith("82"):
        return None
    try:
        return float(int(data[2:10], 16))
    except ValueError:
        return None


class Position(NamedTuple):
    """Where a stream resumes: after a token, else at a cluster time, else unknown."""

    token: Mapping[str, Any] | None = None
    start_at: Timestamp | None = None

    def time(self) -> float | None:
        """The cluster time (epoch seconds) it points at, if it can be read."""
        if self.token is not None:
            return token_time(self.token)
        return None if self.start_at is None else float(self.start_at.time)


def _event_order(token: Mapping[str, Any]) -> str:
    """`_data` starts with the cluster time (seconds, then the increment within the
    second) in big-endian hex: as strings, tokens sort by the event they mark."""
    return str(token.get("_data", ""))


def _read_everything_after(doc: Doc, since: float | None) -> bool:
    lost_at = doc.get(LOST_AT)
    if not isinstance(lost_at, int | float):
        return True
    return since is not None and lost_at < since


def _later(token: Mapping[str, Any], than: Position) -> bool:
    if than.token is not None:
        return _event_order(token) > _event_order(than.token)
    if than.start_at is None:
        return True
    seconds = token_time(token)
    return seconds is not None and seconds > than.start_at.time


class ResumeTokens:
    """Loads and saves one instance's resume tokens; exposes each token's age as a metric."""

    def __init__(
        self, state: AsyncCollection[Doc], instance: str, clock: Callable[[], float] = time.time
    ) -> None:
        self._state = state
        self._instance = instance
        self._clock = clock
        self._saved_at: dict[str, float] = {}
        #: Where this process's own streams got to: a reconnect resumes there, not at
        #: the saved position, which instances without an `instance_id` share.
        self._held: dict[str, Position] = {}

    def key(self, stream: str) -> str:
        return f"resume:{self._instance}:{stream}"

    async def load(self, stream: str) -> Position:
        held = self._held.get(stream)
        if held is not None:
            return held
        doc = await self._state.find_one({"_id": self.key(stream)})
        if doc is None:
            return Position()
        saved_at = doc.get("saved_at")
        self._track(stream, float(saved_at) if isinstance(saved_at, int | float) else self._clock())
        token, start_at = doc.get("token"), doc.get("start_at")
        return Position(
            token if isinstance(token, Mapping) else None,
            start_at if isinstance(start_at, Timestamp) else None,
        )

    async def save(self, stream: str, token: Mapping[str, Any]) -> None:
        """Only ever forward. Instances without an `instance_id` share one position, and
        one behind would move it back: a restart would then queue again messages whose
        entries were delivered since (each a lookup and a refused ledger claim). Behind
        the saved token, the save is left out; this process still resumes from its own
        token on a reconnect."""
        self._held[stream] = Position(token)
        behind_this_one = [
            {"token": {"$exists": False}},
            {"token._data": {"$not": {"$type": "string"}}},
            {"token._data": {"$lte": _event_order(token)}},
        ]
        await self._save(stream, {"token": dict(token)}, "start_at", {"$or": behind_this_one})

    async def save_start(self, stream: str, at: Timestamp) -> None:
        """Where a stream whose history was lost reopened, until its first batch is
        handled: a restart before then reopens there, not later, skipping nothing more."""
        self._held[stream] = Position(start_at=at)
        await self._save(stream, {"start_at": at, LOST_AT: float(at.time)}, "token")

    async def forget(self, stream: str) -> None:
        """A position lost with no restart point known: none is kept, but the loss is
        (other instances must not follow this one across it)."""
        self._held.pop(stream, None)
        await self._write(stream, {LOST_AT: self._clock()}, ("token", "start_at"))

    async def _save(
        self, stream: str, position: Doc, unset: str, only_if: Doc | None = None
    ) -> None:
        now = self._clock()
        # A filtered upsert that misses inserts, and the _id already there refuses it:
        # the position saved is further on, and stays.
        with suppress(DuplicateKeyError):
            await self._write(stream, {**position, "saved_at": now}, (unset,), only_if)
        self._track(stream, now)

    async def _write(
        self, stream: str, fields: Doc, unset: tuple[str, ...], only_if: Doc | None = None
    ) -> None:
        await self._state.update_one(
            {"_id": self.key(stream), **(only_if or {})},
            {"$set": {**fields, "stream": stream}, "$unset": dict.fromkeys(unset, "")},
            upsert=True,
        )

    async def oldest(self, streams: Sequence[str]) -> Mapping[str, Any] | None:
        """The earliest by cluster time of these streams' saved tokens (not tracked:
        for carrying tokens over from streams that no longer run)."""
        keys = [self.key(stream) for stream in streams]
        saved = await self._saved({"_id": {"$in": keys}})
        return min((doc["token"] for doc in saved), key=_event_order, default=None)

    async def newer_elsewhere(self, stream: str, than: Position) -> Mapping[str, Any] | None:
        """The latest token another instance saved for this stream, if it is later than
        `than` (or `than` is unknown); not tracked.

        An instance that lost its history went on from "now": what came between its
        old position and then was read by nobody, so it is followed only by an
        instance whose own position is past that loss.
        """
        docs = await self._saved(
            {"stream": stream, "_id": {"$regex": "^resume:", "$ne": self.key(stream)}}
        )
        if than != Position():
            docs = [doc for doc in docs if _read_everything_after(doc, than.time())]
        newest = max(docs, key=lambda doc: _event_order(doc["token"]), default=None)
        if newest is None or not _later(newest["token"], than):
            return None
        log.info(
            "resume_from_other_instance",
            stream=stream,
            instance=self._instance,
            saved_by=newest["_id"],
            why="another instance got further" if than != Position() else "no position of its own",
        )
        token: Mapping[str, Any] = newest["token"]
        return token

    async def _saved(self, query: Doc) -> list[Doc]:
        """The saved positions matching `query` that hold a token."""
        return [
            doc async for doc in self._state.find(query) if isinstance(doc.get("token"), Mapping)
        ]

    async def drop(self, *streams: str) -> None:
        await self._state.delete_many({"_id": {"$in": [self.key(s) for s in streams]}})
        for stream in streams:
            self._saved_at.pop(stream, None)
            self._held.pop(stream, None)

    def saved_at(self, stream: str) -> float:
        """When the token was last saved (0 if never): quiet streams save only now and then."""
        return self._saved_at.get(stream, 0.0)

    def _track(self, stream: str, saved_at: float) -> None:
        first = stream not in self._saved_at
        self._saved_at[stream] = saved_at
        if first:
            metrics.RESUME_TOKEN_AGE.labels(stream).set_function(
                lambda: self._clock() - self._saved_at.get(stream, self._clock())
            )
