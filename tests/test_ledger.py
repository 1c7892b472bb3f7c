"""SentLedger: the idempotency record that keeps a restart from pushing twice."""

from __future__ import annotations

import anyio
import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure
from structlog.testing import capture_logs

from streamer.config import QueueConfig
from streamer.delivery import ledger as ledger_module
from streamer.delivery.base import Device
from streamer.delivery.errors import Outcome
from streamer.delivery.ledger import SENT_LEDGER, SentLedger, ledger_ttl
from tests.failpoints import BAD_VALUE, failing_commands

Doc = dict[str, object]
NOW = 1_700_000_000.0
PHONE = Device(token_id="t1", kind="gcm", token="gcm-1")
TABLET = Device(token_id="t2", kind="gcm", token="gcm-2")


async def ttl_of(db: AsyncDatabase[Doc]) -> object:
    indexes = await db[SENT_LEDGER].index_information()
    return next(i["expireAfterSeconds"] for i in indexes.values() if i["key"] == [("at", 1)])


@pytest.mark.anyio
async def test_records_expire_by_ttl_index(db: AsyncDatabase[Doc]) -> None:
    await SentLedger(db, ttl=600).ensure_indexes()
    assert await ttl_of(db) == 600


def test_records_outlive_every_entry_that_may_still_retry_them() -> None:
    """Kept a day at least; with `[queue] max_age` of days, as long as an entry lives."""
    assert ledger_ttl(QueueConfig().max_age) == 86_400
    assert ledger_ttl(3 * 86_400) > 3 * 86_400


@pytest.mark.anyio
async def test_a_changed_ttl_replaces_the_old_one(db: AsyncDatabase[Doc]) -> None:
    await SentLedger(db, ttl=600).ensure_indexes()
    await SentLedger(db, ttl=900).ensure_indexes()
    assert await ttl_of(db) == 900


@pytest.mark.anyio
async def test_a_device_can_be_claimed_once_per_message(db: AsyncDatabase[Doc]) -> None:
    ledger = SentLedger(db)
    assert await ledger.claim("u1", "m1", [PHONE, TABLET], NOW) == [PHONE, TABLET]
    assert await ledger.claim("u1", "m1", [PHONE, TABLET], NOW) == []
    assert await ledger.claim("u1", "m2", [PHONE], NOW) == [PHONE]


@pytest.mark.anyio
async def test_a_finished_device_stays_claimed(db: AsyncDatabase[Doc]) -> None:
    ledger = SentLedger(db)
    await ledger.claim("u1", "m1", [PHONE], NOW)
    await ledger.finish("u1", "m1", PHONE, Outcome.SENT, NOW)
    await ledger.release("u1", "m1", PHONE)  # too late: it went out
    assert await ledger.claim("u1", "m1", [PHONE, TABLET], NOW) == [TABLET]
    record = await db[SENT_LEDGER].find_one({"_id.token": PHONE.token})
    assert record is not None and (record["state"], record["outcome"]) == ("sent", "sent")


@pytest.mark.anyio
async def test_a_released_device_can_be_claimed_again(db: AsyncDatabase[Doc]) -> None:
    ledger = SentLedger(db)
    await ledger.claim("u1", "m1", [PHONE], NOW)
    await ledger.release("u1", "m1", PHONE)
    assert await ledger.claim("u1", "m1", [PHONE], NOW) == [PHONE]


@pytest.mark.anyio
async def test_concurrent_claims_share_writes_and_each_device_is_won_once(
    db: AsyncDatabase[Doc],
) -> None:
    ledger = SentLedger(db)
    devices = [Device(token_id=f"t{i}", kind="gcm", token=f"gcm-{i}") for i in range(40)]
    won: list[Device] = []

    async def claim(device: Device) -> None:
        won.extend(await ledger.claim("u1", "m1", [device], NOW))

    async with anyio.create_task_group() as tasks:
        for device in devices + devices:  # every device claimed twice at once
            tasks.start_soon(claim, device)
    assert sorted(d.token for d in won) == sorted(d.token for d in devices)
    assert await db[SENT_LEDGER].count_documents({"state": "sending"}) == len(devices)


@pytest.mark.anyio
@pytest.mark.parametrize(("resend", "retaken"), [(False, []), (True, [PHONE])])
async def test_a_claim_a_crash_left_sending_is_skipped_or_resent_as_configured(
    db: AsyncDatabase[Doc], resend: bool, retaken: list[Device]
) -> None:
    """The phone's push may or may not have gone out; the tablet's was answered."""
    crashed, restarted = SentLedger(db), SentLedger(db, resend_unknown=resend)
    await crashed.claim("u1", "m1", [PHONE, TABLET], NOW)
    await crashed.finish("u1", "m1", TABLET, Outcome.SENT, NOW)
    with capture_logs() as logs:
        assert await restarted.claim("u1", "m1", [PHONE, TABLET], NOW) == retaken
    assert [(line["event"], line["token_id"]) for line in logs] == [
        ("push_outcome_unknown", PHONE.token_id)
    ]


@pytest.mark.anyio
async def test_a_claim_is_not_taken_over_while_its_attempt_runs_but_after_it_ended(
    db: AsyncDatabase[Doc],
) -> None:
    ledger = SentLedger(db, resend_unknown=True)
    assert await ledger.claim("u1", "m1", [PHONE], NOW) == [PHONE]
    assert await ledger.claim("u1", "m1", [PHONE], NOW) == []
    ledger.end("u1", "m1", [PHONE])  # ended with no answer recorded
    assert await ledger.claim("u1", "m1", [PHONE], NOW) == [PHONE]


@pytest.mark.anyio
async def test_a_claim_whose_release_failed_was_not_sent_and_is_taken_over_when_skipping(
    db: AsyncDatabase[Doc], mongo: AsyncMongoClient[Doc]
) -> None:
    ledger = SentLedger(db)
    await ledger.claim("u1", "m1", [PHONE], NOW)
    async with failing_commands(mongo, failCommands=["delete"], errorCode=BAD_VALUE):
        with pytest.raises(OperationFailure):
            await ledger.release("u1", "m1", PHONE)  # a temporary failure: not sent
    with capture_logs() as logs:
        assert await ledger.claim("u1", "m1", [PHONE], NOW) == [PHONE]
    assert logs == []


@pytest.mark.anyio
async def test_an_answer_whose_mark_failed_is_written_by_the_next_claim_not_pushed_again(
    db: AsyncDatabase[Doc],
) -> None:
    ledger = SentLedger(db)
    await ledger.claim("u1", "m1", [PHONE], NOW)
    # MongoDB refuses the mark (as it would while unreachable): the answer stays in memory.
    await db.command("collMod", SENT_LEDGER, validator={"state": "sending"})
    with pytest.raises(OperationFailure):
        await ledger.finish("u1", "m1", PHONE, Outcome.SENT, NOW)
    await db.command("collMod", SENT_LEDGER, validator={})
    assert await ledger.claim("u1", "m1", [PHONE], NOW) == []
    record = await db[SENT_LEDGER].find_one({"_id.token": PHONE.token})
    assert record is not None and (record["state"], record["outcome"]) == ("sent", "sent")


@pytest.mark.anyio
async def test_answers_kept_in_memory_while_mongodb_refuses_them_are_bounded(
    db: AsyncDatabase[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry dropped before its retry would keep its unwritten mark for ever."""
    monkeypatch.setattr(ledger_module, "REMEMBERED_LIMIT", 2)
    ledger = SentLedger(db)
    devices = [Device(token_id=f"t{i}", kind="gcm", token=f"gcm-{i}") for i in range(3)]
    await ledger.claim("u1", "m1", devices, NOW)
    await db.command("collMod", SENT_LEDGER, validator={"state": "sending"})
    for device in devices:
        with pytest.raises(OperationFailure):
            await ledger.finish("u1", "m1", device, Outcome.SENT, NOW)
    await db.command("collMod", SENT_LEDGER, validator={})
    # The two newest answers are still written by the next claim; the oldest is forgotten.
    assert await ledger.claim("u1", "m1", devices[1:], NOW) == []
    assert await db[SENT_LEDGER].count_documents({"state": "sent"}) == 2
