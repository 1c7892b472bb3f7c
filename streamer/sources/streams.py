"""The two change streams: batched, resumable, reconnecting, never crash-looping.

`messages` follows message inserts on their own collection. `changes` is
database-wide and carries the changes of the four other collections the sidecar
follows, each with its own filter, handing each run of consecutive changes of
one collection to that collection's handler. Two streams, not one per
collection: mongod scans every oplog write once per open stream, Rocket.Chat's
own writes included. Messages keep a stream of their own: they are most of what
is read, a collection stream can project each attachment down to one field, and
that stream's saved token carries on; the other four collections change rarely.

Each stream is read one server batch at a time (one `getMore`): the batch is
turned into typed events and handed to the next stage, and the stream reads
nothing more until that returns (backpressure). Then the
batch's resume token — the `postBatchResumeToken`, so even an empty batch on a
quiet collection moves it forward — is saved (`resume.py`). Quiet streams save
at most every `idle_save_interval` seconds: every save is itself an oplog entry.

Failures, in order of how they are met:
- connection lost, not primary, step-down: reconnect with exponential backoff and
  jitter (tenacity), from the saved token; every attempt is logged and counted.
  A stream that had delivered before failing starts a fresh backoff.
- saved position no longer resumable (history lost, invalid token): if the
  stream opens from "now", the gap (token time → now) is logged as an error,
  counted in `streamer_change_stream_history_lost`, and the stream goes on from
  now; that restart point is saved until a batch is handled, and the caches the
  stream keeps current are reloaded. If it does not open from "now" either, the
  position was not the problem and the error is raised, with the position kept.
- a non-resumable error after the stream had delivered (its place gone from the
  oplog on a getMore): logged (`change_stream_failed`) and reopened from the
  saved position, where the case above applies.
- a malformed document: logged with its `_id` and skipped (`changes.py`).

Earlier versions ran one stream per collection; the tokens of those `changes`
replaces are carried over: its first start resumes after the oldest of them,
then drops them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import structlog
from bson import Timestamp
from prometheus_client import Counter
from pymongo.asynchronous.change_stream import AsyncChangeStream
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential,
    wait_random,
)

from streamer import metrics
from streamer.changebatch import next_batch
from streamer.config import Config
from streamer.model import (
    MESSAGES,
    PUSH_TOKENS,
    SETTING_IDS,
    SETTINGS,
    SUBSCRIPTIONS,
    USER_FIELDS,
    USERS,
)
from streamer.mongo import cleanup_within
from streamer.sources import changes as meaning
from streamer.sources.cache import CachedDirectory
from streamer.sources.events import MessageInserted, PresenceChanged, RoomRead, ThreadRead
from streamer.sources.resume import Position, ResumeTokens

log = structlog.get_logger("streamer.sources")
Doc = dict[str, Any]
Change = Mapping[str, Any]

OnMessages = Callable[[Sequence[MessageInserted]], Awaitable[None]]
OnReads = Callable[[Sequence[RoomRead | ThreadRead]], Awaitable[None]]
OnPresence = Callable[[Sequence[PresenceChanged]], Awaitable[None]]

#: The database-wide stream's name in saved tokens, metrics and log lines.
CHANGES = "changes"
#: The per-collection streams of earlier versions that `changes` replaces.
LEGACY_STREAMS = ("subscriptions", "users", "settings", "push_tokens")
#: Message fields the rules read (SPEC §2). Of the attachments only their
#: presence matters: projecting one sub-field keeps one (maybe empty) object each.
MESSAGE_FIELDS = (
    "_id", "rid", "msg", "ts", "u", "t", "tmid", "tshow", "tcount", "replies", "mentions",
    "_hidden", "editedAt", "e2e", "attachments.title",
)  # fmt: skip
#: Subscription fields whose change matters: reads, preferences, membership. Other
#: updates — above all the `$inc` of `unread` on every message — never leave MongoDB.
SUBSCRIPTION_FIELDS = (
    "ls", "tunread", "open", "archived", "disableNotifications", "ignored",
    "muteGroupMentions", "mobilePushNotifications", "emailNotifications",
    "mobilePrefOrigin", "emailPrefOrigin", "userHighlights", "name", "fname", "t", "rid", "u",
)  # fmt: skip
#: User fields whose change matters: presence, activity, preferences, addresses.
USER_WATCHED_FIELDS = (
    "username", "name", "active", "status", "statusConnection", "emails", "roles", "settings",
)  # fmt: skip
#: Server errors after which a change stream can be resumed (MongoDB's list).
RESUMABLE_CODES = frozenset(
    {6, 7, 43, 89, 91, 133, 150, 189, 234, 262, 9001, 10107, 11600, 11602, 13435, 13436}
)
#: A read zeroes `unread`; the per-message `$inc` of it is filtered out.
UNREAD_ZEROED = {"updateDescription.updatedFields.unread": 0}
CHANGE_EVENT_FIELDS = ("operationType", "clusterTime", "wallTime", "documentKey")
#: Seconds to close a stream's server cursor at shutdown before giving up on it.
CLOSE_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class StreamTuning:
    #: Most changes per server batch (and so per handler call).
    batch_size: int = 5000
    #: Seconds a getMore waits for changes on a quiet collection.
    max_await: float = 1.0
    #: Seconds to let changes gather after a batch that did not fill up. A waiting
    #: getMore is woken by every write to the oplog, whatever the collection, and each
    #: stream scans each write; gathered, a stream scans a run of writes at once and the
    #: daemon handles (and saves a token for) one batch where it would have handled many.
    gather: float = 0.02
    #: Seconds between token saves while a stream has nothing to deliver.
    idle_save_interval: float = 10.0
    reconnect_initial: float = 0.5
    reconnect_max: float = 30.0


Handler = Callable[[Sequence[Change]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Stream:
    name: str
    #: None: every collection of the database.
    collection: str | None
    pipeline: list[Doc]
    full_document: str | None
    handle: Handler
    #: Streams of earlier versions whose saved tokens this one takes over.
    carries: tuple[str, ...] = ()
    #: Its changes keep the caches current (if it misses some, they must be dropped).
    keeps_caches: bool = False
    #: Resumes at another instance's position when that one is further: what it read
    #: before there is durably handled (queued), and this instance keeps no state of it.
    follows_the_furthest: bool = False
    #: Counts the changes it reads, once each, however their batch was handled.
    seen: Counter | None = None


@dataclass(frozen=True, slots=True)
class Route:
    """Which changes of one collection matter (None: all), and who handles them."""

    match: Doc | None
    handle: Handler


class Lag:
    """How far a stream is behind the oplog, read at scrape time: now minus the time up
    to which its changes are known handled. 0 while it is caught up (its last read
    was empty); growing while a batch is being handled (from the batch's first
    change), and while the stream is down (from where it stopped), so a stuck handler
    or a stream reconnecting for minutes shows minutes instead of its last value."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._handled_up_to = clock()
        self._caught_up = False

    def handling(self, batch: Sequence[Change]) -> None:
        self._caught_up = False
        self._handled_up_to = meaning.change_time(batch[0])

    def handled(self, batch: Sequence[Change]) -> None:
        """An empty batch: caught up."""
        self._caught_up = not batch
        self._handled_up_to = meaning.change_time(batch[-1]) if batch else self._clock()

    def interrupted(self) -> None:
        self._caught_up = False

    def __call__(self) -> float:
        return 0.0 if self._caught_up else max(0.0, self._clock() - self._handled_up_to)


def is_transient(exc: BaseException) -> bool:
    """Worth reconnecting for: the network, an election, a shutdown — not a bad request."""
    if isinstance(exc, ConnectionFailure):
        return True
    return isinstance(exc, OperationFailure) and (
        exc.has_error_label("ResumableChangeStreamError") or exc.code in RESUMABLE_CODES
    )


class Sources:
    """Runs every change stream until cancelled; `ready` while all of them are open."""

    def __init__(
        self,
        db: AsyncDatabase[Doc],
        config: Config,
        directory: CachedDirectory,
        on_messages: OnMessages,
        on_reads: OnReads,
        on_presence: OnPresence,
        tuning: StreamTuning = StreamTuning(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self._clock = clock
        self._directory = directory
        self._on_messages = on_messages
        self._on_reads = on_reads
        self._on_presence = on_presence
        self._tuning = tuning
        self._tokens = ResumeTokens(
            db[config.mongo.state_collection], config.app.instance_id or "default", clock
        )
        self._routes = self._make_routes()
        self.streams = [
            Stream(
                "messages", MESSAGES, _messages_pipeline(), None, self._messages,
                follows_the_furthest=True, seen=metrics.MESSAGES_SEEN,
            ),
            Stream(
                CHANGES, None, _pipeline(self._routes), "updateLookup", self._dispatch,
                carries=LEGACY_STREAMS, keeps_caches=True,
            ),
        ]  # fmt: skip
        self._open: set[str] = set()
        #: Streams opened since this process started: only a start follows another
        #: instance's position, not a reconnect (this one's own is current then).
        self._opened_once: set[str] = set()
        self._lags = {stream.name: Lag(clock) for stream in self.streams}
        for name, lag in self._lags.items():
            metrics.STREAM_LAG.labels(name).set_function(lag)

    @property
    def ready(self) -> bool:
        return len(self._open) == len(self.streams)

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            for stream in self.streams:
                tg.start_soon(self._follow, stream, name=f"stream:{stream.name}")

    def _make_routes(self) -> dict[str, Route]:
        return {
            SUBSCRIPTIONS: Route(
                _updates_of(SUBSCRIPTION_FIELDS, also=UNREAD_ZEROED), self._subscriptions
            ),
            USERS: Route(_updates_of(USER_WATCHED_FIELDS), self._users),
            SETTINGS: Route({"documentKey._id": {"$in": sorted(SETTING_IDS)}}, self._settings),
            PUSH_TOKENS: Route(None, self._tokens_changed),
        }

    async def _dispatch(self, batch: Sequence[Change]) -> None:
        """Each run of consecutive changes of one collection to its handler, in order."""
        for collection, run in itertools.groupby(batch, key=collection_of):
            route = self._routes.get(collection or "")
            if route is not None:
                await route.handle(list(run))

    # --- what each collection's changes do ----------------------------------------

    async def _messages(self, batch: Sequence[Change]) -> None:
        inserted = meaning.messages_inserted(batch)
        if inserted:
            await self._on_messages(inserted)

    async def _subscriptions(self, batch: Sequence[Change]) -> None:
        reads, learned = meaning.subscription_reads(self._directory, batch)
        if reads:
            await self._on_reads(reads)
        learned.apply(self._directory)

    async def _users(self, batch: Sequence[Change]) -> None:
        changed, learned = meaning.presence_changes(self._directory, batch)
        if changed:
            await self._directory.record_presence(changed)
            await self._on_presence(changed)
        learned.apply(self._directory)

    async def _settings(self, batch: Sequence[Change]) -> None:
        meaning.settings_changed(self._directory, batch)

    async def _tokens_changed(self, batch: Sequence[Change]) -> None:
        meaning.tokens_changed(self._directory, batch)

    # --- the machinery -----------------------------------------------------------

    async def _follow(self, stream: Stream) -> None:
        """Tail one stream for ever, reconnecting with backoff on transient errors."""
        while True:
            retrying = AsyncRetrying(
                retry=retry_if_exception(is_transient),
                wait=wait_exponential(
                    multiplier=self._tuning.reconnect_initial, max=self._tuning.reconnect_max
                )
                + wait_random(0, self._tuning.reconnect_initial),
                before_sleep=lambda state: _log_reconnect(stream.name, state),
                reraise=True,
            )
            await retrying(self._tail, stream)

    async def _tail(self, stream: Stream) -> None:
        """Deliver batches until the stream fails or is invalidated.

        Returns (for an immediate reopen) on an invalidation or on a transient
        error after the stream had delivered; raises a transient error met before
        that, so the caller backs off.
        """
        position = await self._tokens.load(stream.name)
        carried = position == Position() and bool(stream.carries)
        if carried:
            position = Position(await self._tokens.oldest(stream.carries))
        first_open = stream.name not in self._opened_once
        self._opened_once.add(stream.name)
        if position == Position() or (stream.follows_the_furthest and first_open):
            newer = await self._tokens.newer_elsewhere(stream.name, position)
            position = position if newer is None else Position(newer)
        changes, batch = await self._open_stream(stream, position)
        self._open.add(stream.name)
        delivered = False
        try:
            while True:
                await self._deliver(stream, changes, batch)
                if carried:  # the first batch saved this stream's own token
                    await self._tokens.drop(*stream.carries)
                    carried = False
                delivered = True
                if not changes.alive:
                    log.warning("change_stream_invalidated", stream=stream.name)
                    return
                if len(batch) < self._tuning.batch_size:
                    await anyio.sleep(self._tuning.gather)
                batch = await next_batch(changes)
        except PyMongoError as exc:
            if not delivered:
                raise
            metrics.RECONNECTS.labels(stream.name).inc()
            if is_transient(exc):
                log.warning("change_stream_interrupted", stream=stream.name, error=describe(exc))
                return
            # Say its place fell off the oplog on a getMore: reopened from the saved
            # token, the open meets the same error and recovers (`_open_stream`).
            log.error(
                "change_stream_failed", stream=stream.name, error=describe(exc), action="reopen"
            )
            await anyio.sleep(self._tuning.reconnect_initial)
        finally:
            self._open.discard(stream.name)
            self._lags[stream.name].interrupted()
            await _close(changes)

    async def _deliver(
        self, stream: Stream, changes: AsyncChangeStream[Doc], batch: Sequence[Change]
    ) -> None:
        """Hand one batch on, then save where it ended (never before: see resume.py)."""
        lag = self._lags[stream.name]
        if batch:
            lag.handling(batch)  # and if it fails, still behind while it reconnects
            await self._handle(stream, batch)
            if stream.seen is not None:
                stream.seen.inc(len(batch))
        lag.handled(batch)
        token = changes.resume_token
        quiet_for = self._clock() - self._tokens.saved_at(stream.name)
        if token is not None and (batch or quiet_for >= self._tuning.idle_save_interval):
            # Shielded: a batch that was handled must not be handled again because
            # shutdown arrived during the save (pymongo's own timeouts bound it).
            with anyio.CancelScope(shield=True):
                await self._tokens.save(stream.name, token)

    async def _handle(self, stream: Stream, batch: Sequence[Change]) -> None:
        """Hand a batch on; a change that breaks its handler is logged and skipped alone.

        A bug met by one document must not stop the daemon: the supervisor's restart
        would replay the same batch and crash again, for ever. The batch is handed
        on again change by change (every handler is idempotent), so only the one
        change that fails is lost, with an error line naming it. Database errors
        are not bugs: they go up, to reconnect. Nor is shutdown: pymongo cancelled
        while it waits on its topology lock can raise RuntimeError instead of the
        cancellation (PYTHON-5167), so a cancelled task re-raises its cancellation
        and the batch stays unsaved.
        """
        try:
            await stream.handle(batch)
        except PyMongoError:
            raise
        except Exception:
            await anyio.lowlevel.checkpoint()
            if len(batch) > 1:
                for change in batch:
                    await self._handle(stream, [change])
                return
            key = batch[0].get("documentKey")
            doc_id = key.get("_id") if isinstance(key, Mapping) else None
            collection = collection_of(batch[0]) or stream.collection or "unknown"
            log.exception(
                "change_skipped", collection=collection, doc_id=doc_id, **_message_ids(batch[0])
            )
            metrics.MALFORMED_DOCUMENTS.labels(collection).inc()

    async def _open_stream(
        self, stream: Stream, position: Position
    ) -> tuple[AsyncChangeStream[Doc], list[Change]]:
        """Open at the saved position; with none (first start), where the caches were loaded.

        A position the server no longer has (it fell off the oplog) is reported and the
        stream reopens from now: a crash loop would help nobody.
        """
        try:
            if position.token is not None:
                return await self._watch(stream, start_after=position.token)
            if position.start_at is None:
                log.info("change_stream_first_start", stream=stream.name, at="cache load time")
            return await self._watch(
                stream, start_at=position.start_at or self._directory.loaded_at
            )
        except OperationFailure as exc:
            if is_transient(exc):
                raise
            now = await self._cluster_time()
            opened = await self._watch(stream, start_at=now)
            await self._history_lost(stream, position, exc, now)
            return opened

    async def _cluster_time(self) -> Timestamp | None:
        """Just after the newest operation in the oplog: "now" as a stream start."""
        reply = await self._db.command("ping")
        at = reply.get("operationTime")
        return Timestamp(at.time, at.inc + 1) if isinstance(at, Timestamp) else None

    async def _watch(
        self, stream: Stream, start_after: Mapping[str, Any] | None = None, start_at: Any = None
    ) -> tuple[AsyncChangeStream[Doc], list[Change]]:
        """Open the stream and read its first batch: a bad token may fail either step."""
        target = self._db if stream.collection is None else self._db[stream.collection]
        changes = await target.watch(
            stream.pipeline,
            full_document=stream.full_document,
            start_after=start_after,
            start_at_operation_time=start_at,
            batch_size=self._tuning.batch_size,
            max_await_time_ms=int(self._tuning.max_await * 1000),
        )
        try:
            return changes, await next_batch(changes)
        except BaseException:
            await _close(changes)
            raise

    async def _history_lost(
        self, stream: Stream, position: Position, exc: OperationFailure, now: Timestamp | None
    ) -> None:
        """Report the gap; save where the stream reopened, so the next start neither meets
        the lost position again nor skips the first batch if it is not handled; and drop
        the caches this stream keeps current, since the changes in the gap are not known."""
        since = position.time()
        until = self._clock() if now is None else float(now.time)
        log.error(
            "change_stream_history_lost",
            stream=stream.name,
            skipped_from=since,
            skipped_to=until,
            skipped_seconds=None if since is None else round(until - since, 3),
            code=exc.code,
            error=describe(exc),
            consequence="changes between these times were not processed",
        )
        metrics.HISTORY_LOST.labels(stream.name).inc()
        if now is not None:
            await self._tokens.save_start(stream.name, now)
        else:
            await self._tokens.forget(stream.name)
        if stream.keeps_caches:
            await self._directory.reload()


async def _close(changes: AsyncChangeStream[Doc]) -> None:
    """Close even while being cancelled, so the server-side cursor is not left behind."""
    with cleanup_within(CLOSE_TIMEOUT):
        await changes.close()


def describe(exc: BaseException | None) -> str:
    """One readable line: pymongo's messages carry whole topology descriptions."""
    text = "" if exc is None else f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else f"{text[:297]}..."


def _log_reconnect(stream: str, state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else None
    log.warning(
        "change_stream_reconnecting", stream=stream, attempt=state.attempt_number,
        wait_seconds=wait, error=describe(error),
    )  # fmt: skip
    metrics.RECONNECTS.labels(stream).inc()


def _message_ids(change: Change) -> dict[str, object]:
    """mid and rid of a message change: a search by message id must find the line
    that explains why it was never pushed."""
    if collection_of(change) not in (MESSAGES, None):
        return {}
    document = change.get("fullDocument")
    if not isinstance(document, Mapping):
        return {}
    return {"mid": document.get("_id"), "rid": document.get("rid")}


def collection_of(change: Change) -> str | None:
    ns = change.get("ns")
    collection = ns.get("coll") if isinstance(ns, Mapping) else None
    return collection if isinstance(collection, str) else None


def _pipeline(routes: Mapping[str, Route]) -> list[Doc]:
    """Each collection's changes that pass its filter, users trimmed."""
    alternatives = [
        {"ns.coll": collection}
        if route.match is None
        else {"$and": [{"ns.coll": collection}, route.match]}
        for collection, route in routes.items()
    ]
    trimmed = {"$switch": {"branches": [_trim_users()], "default": "$fullDocument"}}
    return [{"$match": {"$or": alternatives}}, {"$set": {"fullDocument": trimmed}}]


def _trim_users() -> Doc:
    """A `$switch` branch: a user document cut down to the fields the sidecar reads,
    which is what keeps login tokens and `services` out of this process. Written as
    an expression (a field missing from the document stays missing) because a
    projection cannot differ by collection."""
    picked: Doc = {}
    for field in ("_id", *USER_FIELDS):
        *parents, leaf = field.split(".")
        node = picked
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = f"$fullDocument.{field}"
    is_document = {"$eq": [{"$type": "$fullDocument"}, "object"]}
    return {"case": {"$and": [{"$eq": ["$ns.coll", USERS]}, is_document]}, "then": picked}


def _messages_pipeline() -> list[Doc]:
    projection = dict.fromkeys(CHANGE_EVENT_FIELDS, 1)
    projection.update({f"fullDocument.{field}": 1 for field in MESSAGE_FIELDS})
    return [{"$match": {"operationType": "insert"}}, {"$project": projection}]


def _updates_of(fields: Sequence[str], also: Doc | None = None) -> Doc:
    """Inserts, replaces and deletes, and the updates that set or remove one of `fields`."""
    pattern = f"^({'|'.join(fields)})(\\.|$)"

    def any_matches(array: object, item: str) -> Doc:
        return {
            "$expr": {
                "$anyElementTrue": [
                    {
                        "$map": {
                            "input": array,
                            "in": {"$regexMatch": {"input": item, "regex": pattern}},
                        }
                    }
                ]
            }
        }

    updated_keys = {"$objectToArray": {"$ifNull": ["$updateDescription.updatedFields", {}]}}
    removed = {"$ifNull": ["$updateDescription.removedFields", []]}
    alternatives: list[Doc] = [
        {"operationType": {"$in": ["insert", "replace", "delete"]}},
        any_matches(updated_keys, "$$this.k"),
        any_matches(removed, "$$this"),
    ]
    if also:
        alternatives.append(also)
    return {"$or": alternatives}
