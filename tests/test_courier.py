"""The courier's email path, in-process against the real queue and database."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.database import Database

from streamer.config import Config
from streamer.courier import Courier
from streamer.delivery.errors import CredentialsError
from streamer.delivery.http import InFlightCap
from streamer.delivery.ledger import SentLedger
from streamer.delivery.sender import PushSender
from streamer.ingest import Ingest
from streamer.queue import Entry, Queue
from tests.test_ingest import loaded
from tests.world import World

pytestmark = pytest.mark.anyio
Doc = dict[str, Any]


async def test_switching_mail_off_clears_a_refused_smtp_login_from_readiness(
    db: AsyncDatabase[Doc], sync_db: Database[Doc]
) -> None:
    """The operator answers email_credentials_invalid by removing SMTP_Host: no mail
    will succeed again to clear the problem, and /readyz must not stay 503 for it."""
    world = World(sync_db)  # Rocket.Chat's default settings: no SMTP server
    message = world.say(world.dm, "mail me")
    config = Config()
    directory, queue = await loaded(db, Queue)
    sender = PushSender({}, db, config.delivery, cap=InFlightCap(1), ledger=SentLedger(db))
    sender.credentials.failed("email", CredentialsError("535 authentication failed"))
    now = time.time()
    await queue.add([Entry(world.bob["_id"], world.dm["_id"], message["_id"], "email", now, now)])
    courier = Courier(directory, queue, sender, Ingest(directory, queue, config), config)
    shutdown = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(courier.run, shutdown)
        with anyio.fail_after(15):
            while await db["streamer_queue"].count_documents({}):  # noqa: ASYNC110
                await anyio.sleep(0.02)  # settled in MongoDB: a condition, not an event
        shutdown.set()
    assert sender.problem is None
