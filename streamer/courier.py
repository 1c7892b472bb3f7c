"""Due queue entries out to the providers, bounded, and drained on shutdown.

Like arq's worker: the whole delivery life — take, deliver, settle, drain —
fits in this one class. Shutdown is an event: taking stops at once, deliveries
in flight get `[app] shutdown_grace` to finish, and any still running after
that are cancelled and their entries handed back to the queue, so nothing
acknowledged is lost.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import anyio.abc
import structlog
from pymongo.errors import PyMongoError

from streamer.config import Config
from streamer.delivery.email import Mailer, SmtpServer, email_content
from streamer.delivery.payload import build_push_content
from streamer.delivery.sender import (
    Attempts,
    Delivered,
    GivenUp,
    PushSender,
    RetryAt,
    device_of,
)
from streamer.ingest import Ingest
from streamer.model import Message
from streamer.queue import Entry, Queue
from streamer.rules import Reason
from streamer.sources.cache import CachedDirectory
from streamer.sources.streams import describe

log = structlog.get_logger("streamer.courier")
#: Concurrent takers: while one waits for its batch's lease and lookups, the other leases.
TAKERS = 2
#: Most entries leased and looked up together.
TAKE_BATCH = 100
#: Pause after MongoDB failed a batch's lookups, before leasing again.
RETRY_DELAY = 1.0

Result = Delivered | RetryAt | GivenUp | str


@dataclass(frozen=True, slots=True)
class _Batch:
    """What a batch of due entries needs from MongoDB, read once for all of them:
    per push, the message and the badge would otherwise be two round trips each."""

    messages: dict[str, Message]
    badges: dict[str, int]


class Courier:
    def __init__(
        self,
        directory: CachedDirectory,
        queue: Queue,
        sender: PushSender,
        ingest: Ingest,
        config: Config,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._directory = directory
        self._queue = queue
        self._sender = sender
        self._ingest = ingest
        self._config = config
        self._clock = clock
        self._in_flight = 0
        self._freed = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()

    async def run(self, shutdown: anyio.Event) -> None:
        """Deliver due entries until `shutdown`, then drain within the grace period."""
        async with anyio.create_task_group() as deliveries:
            async with anyio.create_task_group() as takers:
                takers.start_soon(_cancel_when_set, shutdown, takers.cancel_scope)
                for _ in range(TAKERS):
                    takers.start_soon(self._take, deliveries)
            await self._drain(deliveries.cancel_scope)

    async def _take(self, deliveries: anyio.abc.TaskGroup) -> None:
        """Lease due entries in batches as delivery slots free up, and start each."""
        while True:
            reserved = await self._reserve()
            entries: list[Entry] = []
            try:
                entries = await self._queue.next_due(reserved)
            finally:
                self._finished(reserved - len(entries))
            batch = await self._look_up(entries)
            if batch is None:
                continue
            for entry in entries:
                deliveries.start_soon(self._deliver_one, entry, batch)

    async def _reserve(self) -> int:
        """Wait for a free slot of `[delivery] concurrency`; take up to a batch of them."""
        concurrency = self._config.delivery.concurrency
        while self._in_flight >= concurrency:
            await self._freed.wait()
        reserved = min(TAKE_BATCH, concurrency - self._in_flight)
        if self._in_flight == 0:
            self._idle = anyio.Event()
        self._in_flight += reserved
        return reserved

    def _finished(self, count: int = 1) -> None:
        if not count:
            return
        self._in_flight -= count
        self._freed.set()
        self._freed = anyio.Event()
        if self._in_flight == 0:
            self._idle.set()

    async def _look_up(self, entries: list[Entry]) -> _Batch | None:
        """The batch's messages and badges; None if MongoDB failed (then the entries are
        handed back and taken again after a pause)."""
        try:
            messages = await self._directory.messages({entry.mid for entry in entries})
            badges = await self._directory.badges({e.uid for e in entries if e.kind == "push"})
            return _Batch(messages, badges)
        except BaseException as exc:
            await self._hand_back(*entries)  # one write, not one per entry
            self._finished(len(entries))
            if not isinstance(exc, PyMongoError):
                raise
            log.warning("delivery_interrupted", error=describe(exc), retry="when MongoDB is back")
            await anyio.sleep(RETRY_DELAY)
            return None

    async def _drain(self, deliveries: anyio.CancelScope) -> None:
        grace = self._config.app.shutdown_grace
        log.info("draining", in_flight=self._in_flight, grace=grace)
        with anyio.move_on_after(grace):
            await self._idle.wait()
        if self._in_flight:
            log.warning("drain_grace_expired", requeued=self._in_flight)
        deliveries.cancel()

    async def _deliver_one(self, entry: Entry, batch: _Batch) -> None:
        with structlog.contextvars.bound_contextvars(
            uid=entry.uid, rid=entry.rid, mid=entry.mid, kind=entry.kind
        ):
            await self._deliver_bound(entry, batch)

    async def _deliver_bound(self, entry: Entry, batch: _Batch) -> None:
        """Deliver and settle; every log line on the way names the entry."""
        try:
            await self._settle(entry, await self.deliver(entry, batch))
        except anyio.get_cancelled_exc_class():
            await self._hand_back(entry)
            raise
        except PyMongoError as exc:
            # MongoDB away (restart, election), or refusing a write: the entry is still
            # ours. Held a moment before it is given back, or an error that persists would
            # have it taken, failed and given back in a tight loop.
            log.warning("delivery_interrupted", error=describe(exc), retry="when MongoDB is back")
            try:
                await anyio.sleep(RETRY_DELAY)
            finally:
                await self._hand_back(entry)
        except Exception:
            # A bug must not kill the courier or lose the entry: retry it later.
            log.exception("delivery_crashed")
            try:
                with anyio.CancelScope(shield=True):
                    await self._queue.retry(entry, self._clock() + 60, "internal error")
            except PyMongoError:
                await self._hand_back(entry)
        finally:
            self._finished()

    async def _hand_back(self, *entries: Entry) -> None:
        """Give entries back to the queue. If MongoDB is away the write fails, but the
        entries are back in this instance's schedule and their leases are ours: they are
        retried once MongoDB answers, and the daemon does not stop for an outage."""
        with anyio.CancelScope(shield=True), contextlib.suppress(PyMongoError):
            await self._queue.release(*entries)

    async def deliver(self, entry: Entry, batch: _Batch) -> Result:
        """Send one entry if the rules still want it; a str result is why it was dropped."""
        message = batch.messages.get(entry.mid)
        if message is None:
            return Reason.MESSAGE_DELETED.code
        reason = await self._ingest.recheck(entry, message)
        if reason is not None:
            return reason
        if entry.kind == "email":
            return await self._email(entry, message)
        return await self._push(entry, message, batch.badges.get(entry.uid, 0))

    async def _push(self, entry: Entry, message: Message, badge: int) -> Result:
        settings = await self._ingest.settings()
        users = await self._directory.users({entry.uid, message.sender.id})
        recipient = users.get(entry.uid)
        tokens = (await self._directory.devices([entry.uid])).get(entry.uid, [])
        if recipient is None:
            return "user_deleted"
        if not tokens:
            return "no_device"
        content = build_push_content(
            message,
            await self._directory.room(entry.rid),
            recipient,
            settings,
            badge=badge,
            now=self._clock(),
            sender=users.get(message.sender.id),
        )
        attempts = Attempts(entry.attempts, entry.first_failure_at)
        return await self._sender.send(content, [device_of(t) for t in tokens], attempts)

    async def _email(self, entry: Entry, message: Message) -> Result:
        settings = await self._ingest.settings()
        server = SmtpServer.resolve(self._config.email, settings)
        if server is None:  # mail switched off: a refused login is no problem any more
            self._sender.credentials.answered("email")
            return "smtp_not_configured"
        users = await self._directory.users({entry.uid, message.sender.id})
        recipient = users.get(entry.uid)
        if recipient is None:
            return "user_deleted"
        room = await self._directory.room(entry.rid)
        if room is None:
            return "room_not_found"
        content = email_content(message, room, recipient, settings, users.get(message.sender.id))
        if content is None:
            return "no_email_address"
        attempts = Attempts(entry.attempts, entry.first_failure_at)
        return await self._sender.send_mail(Mailer(server), content, attempts)

    async def _settle(self, entry: Entry, result: Result) -> None:
        if isinstance(result, Delivered):
            await self._queue.done(entry)
        elif isinstance(result, RetryAt):
            await self._queue.retry(entry, result.at, result.error)
        elif isinstance(result, GivenUp):
            await self._queue.drop(entry, "given_up")
        else:
            await self._queue.drop(entry, result)


async def _cancel_when_set(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
