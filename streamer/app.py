"""The daemon's life: start-up, the task group wiring the stages, and drain."""

from __future__ import annotations

import dataclasses
import os
import signal
from contextlib import ExitStack

import anyio
import structlog
from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from streamer import devmongo
from streamer.config import Config, redact_uri

log = structlog.get_logger("streamer.app")


def main(config: Config, dev_mongo: bool = False) -> int:
    with ExitStack() as stack:
        if dev_mongo and "STREAMER_MONGO__URI" not in os.environ:
            server = stack.enter_context(devmongo.running())
            log.info("dev_mongo_started", uri=server.uri)
            config = dataclasses.replace(
                config, mongo=dataclasses.replace(config.mongo, uri=server.uri)
            )
        return anyio.run(run, config)


async def run(config: Config) -> int:
    """0 after a requested shutdown; 1 when MongoDB refuses us at start-up."""
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(config.mongo.uri)
    try:
        try:
            await client.admin.command("ping")
        except PyMongoError as exc:
            # Wrong credentials or CA will not fix themselves: one clear line, no traceback.
            log.error("mongo_unreachable", uri=redact_uri(config.mongo.uri), error=str(exc))
            return 1
        log.info("mongo_connected", uri=redact_uri(config.mongo.uri))
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("shutdown_requested", signal=signal.Signals(signum).name)
                return 0
        return 0
    finally:
        await client.close()
