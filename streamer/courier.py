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

import anyio
import anyio.abc
import structlog
from pymongo.errors import PyMongoError

from streamer.config import Config
from streamer.delivery.email import Mailer, SmtpServer, email_content
from streamer.delivery.errors import DeliveryError, TemporaryDeliveryError
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
from streamer.sources.cache import CachedDirectory
from streamer.sources.streams import describe

log = structlog.get_logger("streamer.courier")
#: Concurrent `next_due` callers (see `Courier._take`).
TAKERS = 16

Result = Delivered | RetryAt | GivenUp | str


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
        self._slots = anyio.Semaphore(config.delivery.concurrency)
        self._in_flight = 0
        self._idle = anyio.Event()
        self._idle.set()

    async def run(self, shutdown: anyio.Event) -> None:
        """Deliver due entries until `shutdown`, then drain within the grace period."""
        async with anyio.create_task_group() as deliveries:
            async with anyio.create_task_group() as takers:
                takers.start_soon(_cancel_when_set, shutdown, takers.cancel_scope)
                for _ in range(min(TAKERS, self._config.delivery.concurrency)):
                    takers.start_soon(self._take, deliveries)
            await self._drain(deliveries.cancel_scope)

    async def _take(self, deliveries: anyio.abc.TaskGroup) -> None:
        """One of several takers: each lease is a database round-trip, so one taker alone
        would cap delivery at a few hundred entries a second."""
        while True:
            await self._slots.acquire()
            try:
                entry = await self._queue.next_due()
            except BaseException:
                self._slots.release()
                raise
            self._started()
            deliveries.start_soon(self._deliver_one, entry)

    async def _drain(self, deliveries: anyio.CancelScope) -> None:
        grace = self._config.app.shutdown_grace
        log.info("draining", in_flight=self._in_flight, grace=grace)
        with anyio.move_on_after(grace):
            await self._idle.wait()
        if self._in_flight:
            log.warning("drain_grace_expired", requeued=self._in_flight)
        deliveries.cancel()

    def _started(self) -> None:
        if self._in_flight == 0:
            self._idle = anyio.Event()
        self._in_flight += 1

    def _finished(self) -> None:
        self._in_flight -= 1
        self._slots.release()
        if self._in_flight == 0:
            self._idle.set()

    async def _deliver_one(self, entry: Entry) -> None:
        try:
            with structlog.contextvars.bound_contextvars(
                uid=entry.uid, rid=entry.rid, mid=entry.mid, kind=entry.kind
            ):
                await self._settle(entry, await self.deliver(entry))
        except anyio.get_cancelled_exc_class():
            await self._hand_back(entry)
            raise
        except PyMongoError as exc:
            # MongoDB away (restart, election): the entry is still ours; try it again.
            log.warning("delivery_interrupted", error=describe(exc), retry="when MongoDB is back")
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

    async def _hand_back(self, entry: Entry) -> None:
        """Give the entry back to the queue. If MongoDB is away the write fails, but the
        entry is back in this instance's schedule and its lease is ours: it is retried
        once MongoDB answers, and the daemon does not stop for an outage."""
        with anyio.CancelScope(shield=True), contextlib.suppress(PyMongoError):
            await self._queue.release(entry)

    async def deliver(self, entry: Entry) -> Result:
        """Send one entry; a str result is the reason it was dropped instead."""
        message = await self._directory.message(entry.mid)
        if message is None:
            return "message_deleted"
        if entry.kind == "email":
            return await self._email(entry, message)
        return await self._push(entry, message)

    async def _push(self, entry: Entry, message: Message) -> Result:
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
            badge=await self._directory.badge(entry.uid),
            now=self._clock(),
            sender=users.get(message.sender.id),
        )
        attempts = Attempts(entry.attempts, entry.first_failure_at)
        return await self._sender.send(content, [device_of(t) for t in tokens], attempts)

    async def _email(self, entry: Entry, message: Message) -> Result:
        settings = await self._ingest.settings()
        server = SmtpServer.resolve(self._config.email, settings)
        if server is None:
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
        try:
            await Mailer(server).send(content)
        except DeliveryError as exc:
            # SMTP down, or its login refused (an operator fixes that): keep the mail and retry.
            retry_after = exc.retry_after if isinstance(exc, TemporaryDeliveryError) else None
            attempts = Attempts(entry.attempts, entry.first_failure_at)
            return self._sender.retries.after_failure(str(exc), retry_after, attempts)
        return Delivered()

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
