"""The courier's email path, in-process against the real queue and database."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from aiosmtpd.controller import Controller
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.database import Database

from streamer.config import Config
from streamer.courier import Courier
from streamer.delivery.errors import CredentialsError
from streamer.delivery.http import InFlightCap
from streamer.delivery.ledger import SentLedger
from streamer.delivery.sender import PushSender
from streamer.devmongo import free_port
from streamer.ingest import Ingest
from streamer.queue import Entry, Queue
from tests import factories as f
from tests.test_email import Mailbox
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


@pytest.fixture
def mail_server() -> Iterator[tuple[Mailbox, int]]:
    mailbox, port = Mailbox(), free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield mailbox, port
    finally:
        controller.stop()


async def run_until_settled(courier: Courier, db: AsyncDatabase[Doc]) -> None:
    shutdown = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(courier.run, shutdown)
        with anyio.fail_after(15):
            while await db["streamer_queue"].count_documents({}):  # noqa: ASYNC110
                await anyio.sleep(0.02)  # settled in MongoDB: a condition, not an event
        shutdown.set()


async def test_a_mail_queued_again_after_it_went_out_is_not_sent_twice(
    db: AsyncDatabase[Doc], sync_db: Database[Doc], mail_server: tuple[Mailbox, int]
) -> None:
    """A batch replayed after its first chunk was mailed, or another instance's stream
    late by more than a delivery: the same entry is queued again, as new, once the first
    is done and deleted. Pushes had the ledger to stop a second one; mail had nothing."""
    mailbox, port = mail_server
    world = World(sync_db)
    values = {"SMTP_Host": "127.0.0.1", "SMTP_Port": port, "From_Email": "chat@example.org"}
    for setting_id, value in values.items():
        sync_db.rocketchat_settings.replace_one(
            {"_id": setting_id}, f.setting(setting_id, value), upsert=True
        )
    message = world.say(world.dm, "mail me once")
    config = Config()
    directory, queue = await loaded(db, Queue)
    sender = PushSender({}, db, config.delivery, cap=InFlightCap(1), ledger=SentLedger(db))
    courier = Courier(directory, queue, sender, Ingest(directory, queue, config), config)
    now = time.time()
    mail = Entry(world.bob["_id"], world.dm["_id"], message["_id"], "email", now, now)
    for _ in range(2):
        await queue.add([mail])
        await run_until_settled(courier, db)
    assert len(mailbox.envelopes) == 1
