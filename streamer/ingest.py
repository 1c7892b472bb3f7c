"""Change-stream batches in, queue entries out.

One decision pass and one bulk queue write per change-stream batch: the resume
token is saved only after `on_messages` returns, so everything acknowledged is
already durable in the queue, and a replayed batch finds its entries already queued.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence

import structlog

from streamer import metrics
from streamer.config import Config, override_settings
from streamer.decisions import count_decisions, decide_message, decision_counts, recheck
from streamer.model import Message, Settings
from streamer.queue import EXPIRED, Entry, Kind, Queue
from streamer.queue.policy import due_at
from streamer.rules import Decision
from streamer.sources.cache import CachedDirectory
from streamer.sources.events import MessageInserted, PresenceChanged, RoomRead, ThreadRead

log = structlog.get_logger("streamer.ingest")
#: Entries per queue write. A batch of busy rooms' messages fans out to hundreds of
#: thousands of entries (5,000 messages to 100 members each: half a million, 500 MB
#: as entries and documents at once, measured); written in chunks as they come,
#: memory stays bounded. The batch's token is still saved after the last chunk.
ADD_CHUNK = 10_000


class Ingest:
    def __init__(
        self,
        directory: CachedDirectory,
        queue: Queue,
        config: Config,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._directory = directory
        self._queue = queue
        self._config = config
        self._clock = clock
        self.latest_settings = Settings()
        self._overridden: Settings | None = None

    async def settings(self) -> Settings:
        """Rocket.Chat's settings as cached, with the config's overrides on top.

        Called for every push; the cache hands out one `Settings` object until a
        setting changes, so the overrides are applied once per change, not per push.
        """
        settings = await self._directory.settings()
        if settings is not self._overridden:
            self._overridden = settings
            self.latest_settings = override_settings(settings, self._config)
        return self.latest_settings

    async def recheck(self, entry: Entry, message: Message) -> str | None:
        """At fire time: the reason code to drop the entry, or None to send it."""
        reason = await recheck(
            self._directory,
            entry.uid,
            message,
            entry.kind,
            await self.settings(),
            self._config,
            self._clock(),
        )
        return None if reason is None else reason.code

    async def on_messages(self, batch: Sequence[MessageInserted]) -> None:
        """Decisions are counted once the whole batch is queued: a batch that fails is
        handed on again (`streams._handle`), and is then decided a second time."""
        settings = await self.settings()
        now = self._clock()
        await self._directory.prefetch({event.message.rid for event in batch})
        entries: list[Entry] = []
        counts: Counter[tuple[str, str]] = Counter()
        expired = 0
        for event in batch:
            decided = await self._entries_for(event, settings, now, counts)
            fresh = [entry for entry in decided if not self._expired(entry)]
            expired += len(decided) - len(fresh)
            entries += fresh
            if len(entries) >= ADD_CHUNK:
                await self._queue.add(entries)
                entries = []
        if entries:
            await self._queue.add(entries)
        count_decisions(counts)
        if expired:
            self._report_expired(expired, batch, now)

    def _expired(self, entry: Entry) -> bool:
        """Older than `max_age` when due: the queue would drop it when taken. After an
        outage longer than `max_age` that is the whole backlog, and each entry would cost
        an insert, a lease, a delete and a log line for nothing."""
        return entry.due_at - entry.created_at > self._config.queue.max_age

    def _report_expired(self, count: int, batch: Sequence[MessageInserted], now: float) -> None:
        metrics.QUEUE_DROPPED.labels(EXPIRED).inc(count)
        log.warning(
            "entries_expired_before_queued",
            entries=count,
            oldest_message_age=round(now - min(event.cluster_time for event in batch)),
            max_age=self._config.queue.max_age,
            why="the messages were inserted longer than [queue] max_age ago (an outage?)",
        )

    async def on_reads(self, batch: Sequence[RoomRead | ThreadRead]) -> None:
        await self._queue.clear_reads([(read.uid, read.rid, read.at) for read in batch])

    async def on_presence(self, batch: Sequence[PresenceChanged]) -> None:
        offline = [change.uid for change in batch if change.status == "offline"]
        await self._queue.users_offline(list(dict.fromkeys(offline)))

    async def _entries_for(
        self,
        event: MessageInserted,
        settings: Settings,
        now: float,
        counts: Counter[tuple[str, str]],
    ) -> list[Entry]:
        """Judged old or live as at its insert (the server's time, as Rocket.Chat judges
        it in-process): a message inserted while the daemon was down or reconnecting
        was live, and is late, not old. Its entries are as old as the insert, so
        `max_age` counts from it as Rocket.Chat's queue TTL does; delays run from `now`."""
        outcome = await decide_message(
            self._directory, event.message, settings, self._config, event.cluster_time
        )
        counts.update(decision_counts(outcome))
        return [
            self._entry(decision, kind, settings, now, event.cluster_time)
            for decision in outcome.decisions
            for kind in self._kinds(decision)
        ]

    @staticmethod
    def _kinds(decision: Decision) -> list[Kind]:
        """The rules already said no email when `[email] enabled = false`."""
        kinds: list[Kind] = ["push"] if decision.push else []
        if decision.email:
            kinds.append("email")
        return kinds

    def _entry(
        self, decision: Decision, kind: Kind, settings: Settings, now: float, inserted_at: float
    ) -> Entry:
        return Entry(
            uid=decision.uid,
            rid=decision.rid,
            mid=decision.mid,
            kind=kind,
            due_at=due_at(
                decision.status,
                now,
                self._config.queue,
                away_since=self._directory.away_since(decision.uid),
                always_notify_mobile=settings.always_notify_mobile,
            ),
            created_at=inserted_at,
        )
