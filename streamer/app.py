"""The daemon's life: start-up, the task group wiring the stages, and drain."""

from __future__ import annotations

import dataclasses
import os
import signal
from contextlib import ExitStack

import anyio
import structlog
from pymongo import AsyncMongoClient

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
        anyio.run(run, config)
    return 0


async def run(config: Config) -> None:
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(config.mongo.uri)
    try:
        await client.admin.command("ping")
        log.info("mongo_connected", uri=redact_uri(config.mongo.uri))
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("shutdown_requested", signal=signal.Signals(signum).name)
                return
    finally:
        await client.close()
