"""The daemon's life: start-up, the task group wiring the stages, and drain.

    change streams ──▶ Ingest (rules) ──▶ Queue (heap + side collection) ──▶ Courier ──▶ providers

Each arrow is bounded: a stream reads its next batch only after the previous
one is decided and durably queued, and the courier leases only as many due
entries as there are free delivery slots, so a slow gateway slows intake instead
of growing memory.

Shutdown is one event (injectable, so tests stop the daemon deterministically):
set by SIGTERM/SIGINT, it stops the streams (their tokens were saved after the
last queued batch), lets deliveries in flight finish within `[app]
shutdown_grace`, hands unfinished entries back to the queue, frees the ones
queued leased to this instance but not yet taken, and returns 0. A
second signal cancels everything at once.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import ExitStack, asynccontextmanager
from typing import Any

import anyio
import pymongo
import structlog
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from streamer import devmongo
from streamer.clock import ServerClock
from streamer.config import Config, ConfigError, redact_uri
from streamer.courier import Courier
from streamer.delivery.apns import ApnsPushkin
from streamer.delivery.base import Pushkin
from streamer.delivery.fcm import FcmPushkin
from streamer.delivery.gateway import GatewayPushkin, WorkspaceToken
from streamer.delivery.http import HttpClient, InFlightCap, make_http_client
from streamer.delivery.ledger import SentLedger, ledger_ttl
from streamer.delivery.sender import PushSender
from streamer.directory import DatabaseDirectory
from streamer.health import Health, serve_http
from streamer.ingest import Ingest
from streamer.instance import InstanceClaim, InstanceTakenOver
from streamer.model import Settings, TokenKind
from streamer.mongo import cleanup_within, mongo_client
from streamer.queue import Queue
from streamer.sources.cache import CachedDirectory
from streamer.sources.streams import Sources

log = structlog.get_logger("streamer.app")
Doc = dict[str, object]
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
HEALTH_INTERVAL = 1.0
#: Seconds to free the entries queued leased to this instance at shutdown.
RELEASE_TIMEOUT = 5.0
STARTUP_TIMEOUT_MS = 10_000
#: Seconds past `[app] shutdown_grace` a drain may take before the process exits all
#: the same: a MongoDB gone mid-shutdown can leave pymongo waiting for ever
#: (PYTHON-5167), and a supervisor's stop timeout should not be what ends it.
SHUTDOWN_SLACK = 10.0
#: Seconds a second signal leaves the cancellation before the process just exits.
FORCED_EXIT_AFTER = 2.0


class StartupError(Exception):
    """The daemon cannot start; carries the log event and its fields."""

    def __init__(self, event: str, **fields: str) -> None:
        super().__init__(event)
        self.event = event
        self.fields = fields


def main(config: Config, dev_mongo: bool = False) -> int:
    with ExitStack() as stack:
        try:
            if dev_mongo and "STREAMER_MONGO__URI" not in os.environ:
                server = stack.enter_context(devmongo.running())
                log.info("dev_mongo_started", uri=server.uri)
                config = dataclasses.replace(
                    config, mongo=dataclasses.replace(config.mongo, uri=server.uri)
                )
            return anyio.run(run, config)
        except (Exception, BaseExceptionGroup) as exc:
            return _startup_failed(exc)


def _exit_unless_stopped_within(seconds: float, event: str) -> None:
    """Exit the process (code 1) if it is still running `seconds` from now.

    A thread, not a task: the tasks may be the ones stuck, in shielded clean-up
    waiting on a pymongo lock that will never be released.
    """

    def exit_now() -> None:
        log.error(event, after_seconds=seconds, consequence="exiting without the clean-up")
        os._exit(EXIT_FAILURE)

    timer = threading.Timer(seconds, exit_now)
    timer.daemon = True  # a clean stop before then ends the process, timer and all
    timer.start()


def _startup_failed(exc: BaseException) -> int:
    """One clear line and the exit code for what stopped the daemon (or its start)."""
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _startup_failed(exc.exceptions[0])
    if isinstance(exc, StartupError):
        log.error(exc.event, **exc.fields)
        return EXIT_FAILURE
    if isinstance(exc, ConfigError):
        log.error("configuration_error", error=str(exc))
        return EXIT_USAGE
    if isinstance(exc, devmongo.DevMongoUnavailable):
        log.error("dev_mongo_unavailable", error=str(exc))
        return EXIT_USAGE
    if isinstance(exc, InstanceTakenOver):
        log.error("instance_id_taken_over", error=str(exc))
        return EXIT_FAILURE
    # A bug, or MongoDB refusing for good (say, the changeStream action): one JSON
    # line with the traceback, where the operator's log pipeline looks for it.
    log.error("daemon_failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
    return EXIT_FAILURE


async def run(config: Config, shutdown: anyio.Event | None = None) -> int:
    """Run until `shutdown` is set (or a signal sets it); returns the exit code."""
    shutdown = shutdown or anyio.Event()
    async with _connected(config) as client:
        daemon = Daemon(config, client[config.mongo.database])
        claim = InstanceClaim(daemon.db[config.mongo.state_collection], daemon.instance_id)
        async with daemon.serving_http(), anyio.create_task_group() as tg:
            tg.start_soon(daemon.watch_signals, shutdown, tg.cancel_scope)
            await claim.acquire()  # before the queue loads: its leases are this id's
            try:
                async with anyio.create_task_group() as held:
                    held.start_soon(claim.keep)  # from now: loading can take seconds
                    async with daemon.resources():
                        await daemon.run(shutdown)
                    held.cancel_scope.cancel()
            finally:
                with cleanup_within(RELEASE_TIMEOUT):
                    await claim.release()  # a restart under this id need not wait
            tg.cancel_scope.cancel()
    if daemon.forced:
        return EXIT_FAILURE
    log.info("stopped")
    return EXIT_OK


class Daemon:
    """Builds the stages from the config and runs them in one task group."""

    def __init__(self, config: Config, db: AsyncDatabase[Doc]) -> None:
        self.config = config
        self.db = db
        self.instance_id = config.app.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self.forced = False
        #: From the start of delivery on, a stop drains; before it, there is nothing to drain.
        self.running = False
        self.health = Health()
        #: Where /metrics, /livez and /readyz answer (`host:port`), once serving.
        self.http_address = ""
        #: The gateway's token, in gateway mode: /readyz says when there is none.
        self.workspace_token: WorkspaceToken | None = None
        self.directory = CachedDirectory(
            db, db[config.mongo.state_collection], fallback=DatabaseDirectory(db)
        )
        self.clock = ServerClock(db.client)

    @asynccontextmanager
    async def serving_http(self) -> AsyncIterator[None]:
        """/metrics, /livez and /readyz from before the wait for the instance_id and the
        loading (a million queued entries take seconds): the process is up and says so,
        and /readyz says what it is not ready for yet."""
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            self.http_address = await tg.start(
                functools.partial(serve_http, self.health, self.config.http.listen, shutdown=stop)
            )
            log.info("http_listening", http=self.http_address)
            try:
                yield
            finally:
                stop.set()

    @asynccontextmanager
    async def resources(self) -> AsyncIterator[None]:
        """Load what must be loaded before the first event, and close it all after."""
        config = self.config
        await self.clock.read()
        await self.directory.load()
        self.queue = Queue(
            self.db[config.mongo.queue_collection],
            config.queue,
            instance_id=self.instance_id,
            clock=self.clock,
        )
        await self.queue.load()
        self.ingest = Ingest(self.directory, self.queue, config, self.clock)
        await self.ingest.settings()
        async with make_http_client(config.delivery) as client:
            ledger = SentLedger(
                self.db,
                ttl=ledger_ttl(config.queue.max_age),
                resend_unknown=config.delivery.unknown_outcome == "resend",
            )
            await ledger.ensure_indexes()
            pushkins = self._pushkins(client)
            self.sender = PushSender(
                pushkins,
                self.db,
                config.delivery,
                cap=InFlightCap(config.delivery.concurrency),
                ledger=ledger,
                clock=self.clock,
            )
            self.courier = Courier(
                self.directory, self.queue, self.sender, self.ingest, config, self.clock
            )
            try:
                yield
            finally:
                for pushkin in set(pushkins.values()):
                    await pushkin.aclose()

    def _pushkins(self, client: HttpClient) -> Mapping[TokenKind, Pushkin]:
        if self.config.delivery.mode == "direct":
            return direct_pushkins(self.config, client, self.ingest.latest_settings)
        self.workspace_token = WorkspaceToken(self.db)
        gateway = GatewayPushkin(
            client, lambda: self.ingest.latest_settings.push_gateways, self.workspace_token
        )
        return {"apn": gateway, "gcm": gateway}

    async def run(self, shutdown: anyio.Event) -> None:
        self.running = True
        sources = Sources(
            self.db,
            self.config,
            self.directory,
            on_messages=self.ingest.on_messages,
            on_reads=self.ingest.on_reads,
            on_presence=self.ingest.on_presence,
            clock=self.clock,
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(_run_until, shutdown, sources.run)
            tg.start_soon(self.clock.keep_reading)
            tg.start_soon(self._watch_health, sources)
            tg.start_soon(self._report_stopping, shutdown)
            await tg.start(self.queue.follow)
            tg.start_soon(self.queue.keep_leases)
            log.info("started", instance_id=self.instance_id, http=self.http_address)
            await self.courier.run(shutdown)
            with cleanup_within(RELEASE_TIMEOUT):
                await self.queue.release_owned()
            tg.cancel_scope.cancel()

    async def watch_signals(self, shutdown: anyio.Event, everything: anyio.CancelScope) -> None:
        """The first SIGTERM/SIGINT drains; a second one cancels everything at once.

        Listening from start-up: a stop while waiting for the instance_id or loading has
        nothing to drain and ends it at once (as PID 1 in a container, a signal without
        a handler would be ignored until the runtime's SIGKILL).
        """
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self.running:
                    log.info("shutdown_requested", signal=name, during="start-up")
                    _exit_unless_stopped_within(FORCED_EXIT_AFTER, "shutdown_forced_exit")
                    everything.cancel()
                    return
                if shutdown.is_set():
                    log.warning("shutdown_forced", signal=name)
                    self.forced = True
                    _exit_unless_stopped_within(FORCED_EXIT_AFTER, "shutdown_forced_exit")
                    everything.cancel()
                    return
                log.info("shutdown_requested", signal=name)
                grace = self.config.app.shutdown_grace
                _exit_unless_stopped_within(grace + SHUTDOWN_SLACK, "shutdown_stuck")
                shutdown.set()

    async def _report_stopping(self, shutdown: anyio.Event) -> None:
        """Not ready from the stop on: the drain and the clean-up after it may take
        seconds, and nothing should count on this process meanwhile."""
        await shutdown.wait()
        self.health.set_failed("app", "shutting down")

    async def _watch_health(self, sources: Sources) -> None:
        while True:
            await self._check_mongo()
            _set(self.health, "streams", sources.ready, "change streams are not all open")
            problem = self.sender.problem or await self._missing_credentials()
            _set(self.health, "delivery", problem is None, problem or "")
            await anyio.sleep(HEALTH_INTERVAL)

    async def _missing_credentials(self) -> str | None:
        """Credentials that no push has failed on yet, but every one would."""
        return None if self.workspace_token is None else await self.workspace_token.problem()

    async def _check_mongo(self) -> None:
        """Ping with pymongo's own deadline, never by cancelling: a task cancelled while
        pymongo waits in server selection breaks its topology lock ("Lock is not
        acquired", PYTHON-5167) for every other operation, and the daemon with it."""
        try:
            with pymongo.timeout(HEALTH_INTERVAL * 2):
                await self.db.client.admin.command("ping")
        except PyMongoError as exc:
            self.health.set_failed("mongo", f"MongoDB unreachable: {type(exc).__name__}")
        else:
            self.health.set_ready("mongo")


def direct_pushkins(
    config: Config, client: HttpClient, settings: Settings
) -> dict[TokenKind, Pushkin]:
    """White-labelled apps: FCM and/or APNs with the operator's own keys.

    APNs gets its own HTTP/2 client (the shared one's aiohttp transport speaks
    HTTP/1.1 only); a platform without credentials gets no pushkin, and its
    devices' pushes are rejected with a log line.
    """
    pushkins: dict[TokenKind, Pushkin] = {}
    if config.fcm.service_account_file:
        pushkins["gcm"] = FcmPushkin(config.fcm, client=client)
    if config.apns.key_file:
        pushkins["apn"] = ApnsPushkin(
            config.apns, production=settings.push_production, timeout=config.delivery.timeout
        )
    if not pushkins:
        raise ConfigError(
            '[delivery] mode = "direct" needs [fcm] service_account_file or [apns] key_file'
        )
    return pushkins


def _set(health: Health, component: str, ok: bool, why: str) -> None:
    if ok:
        health.set_ready(component)
    else:
        health.set_failed(component, why)


async def _run_until(event: anyio.Event, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run `work` until `event` is set: on shutdown the streams stop reading at once."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(work)
        await event.wait()
        tg.cancel_scope.cancel()


@asynccontextmanager
async def _connected(config: Config) -> AsyncIterator[AsyncMongoClient[Doc]]:
    """Fail fast with one clear line when MongoDB refuses us or cannot be reached at start:
    wrong credentials or CA will not fix themselves, and a supervisor (systemd, compose)
    restarts us when the database comes up later. After start-up the streams reconnect."""
    uri = redact_uri(config.mongo.uri)
    client = mongo_client(config.mongo.uri, server_selection_ms=STARTUP_TIMEOUT_MS)
    try:
        await client.admin.command("ping")
    except PyMongoError as exc:
        await client.close()
        raise StartupError("mongo_unreachable", uri=uri, error=str(exc)) from None
    log.info("mongo_connected", uri=uri)
    try:
        yield client
    finally:
        await client.close()
