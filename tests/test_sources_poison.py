"""A change that breaks its handler (a bug met by one document) costs that change alone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import pytest
from prometheus_client import REGISTRY
from pymongo.asynchronous.database import AsyncDatabase
from structlog.testing import capture_logs

from streamer.model import MESSAGES
from streamer.sources.events import MessageInserted
from tests import factories as f
from tests.test_sources import ALICE, GENERAL, Recorder, running, wait_until

pytestmark = pytest.mark.anyio
Doc = dict[str, Any]


class Poisoned(Recorder):
    """The next stage with a bug: any batch holding the message "poison" raises."""

    async def on_messages(self, events: Sequence[MessageInserted]) -> None:
        if any(event.message.text == "poison" for event in events):
            raise RuntimeError("a bug met by one document")
        await super().on_messages(events)


async def test_the_change_that_breaks_its_handler_is_skipped_and_its_batch_still_handled(
    db: AsyncDatabase[Doc],
) -> None:
    recorder = Poisoned()
    seen_before = REGISTRY.get_sample_value("streamer_messages_seen_total") or 0.0
    before = [f.message(GENERAL, ALICE, f"before {n}") for n in range(3)]
    poison = f.message(GENERAL, ALICE, "poison")
    after = [f.message(GENERAL, ALICE, f"after {n}") for n in range(3)]
    async with running(db, recorder):
        with capture_logs() as logs:
            await db[MESSAGES].insert_many([*before, poison, *after])
            await wait_until(lambda: after[-1]["_id"] in recorder.messages)
            await db[MESSAGES].insert_one(later := f.message(GENERAL, ALICE, "later"))
            await wait_until(lambda: later["_id"] in recorder.messages)
    assert recorder.messages == [doc["_id"] for doc in [*before, *after, later]]
    skipped = [line for line in logs if line["event"] == "change_skipped"]
    assert [line["doc_id"] for line in skipped] == [poison["_id"]]
    # Handed on again change by change, the batch still counts its messages once.
    assert REGISTRY.get_sample_value("streamer_messages_seen_total") == seen_before + 8
    assert (skipped[0]["mid"], skipped[0]["rid"]) == (poison["_id"], poison["rid"])


class CancelledIntoRuntimeError(Recorder):
    """Cancelled while pymongo waits on its topology lock, a call can raise
    RuntimeError("Lock is not acquired.") instead of the cancellation (PYTHON-5167)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = anyio.Event()

    async def on_messages(self, events: Sequence[MessageInserted]) -> None:
        self.entered.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            raise RuntimeError("Lock is not acquired.") from None


async def test_a_handler_failing_because_of_shutdown_keeps_its_batch_for_the_next_start(
    db: AsyncDatabase[Doc],
) -> None:
    stopped = CancelledIntoRuntimeError()
    message = f.message(GENERAL, ALICE, "in flight at shutdown")
    with capture_logs() as logs:
        async with running(db, stopped):
            await db[MESSAGES].insert_one(message)
            with anyio.fail_after(15):
                await stopped.entered.wait()
    assert [line for line in logs if line["event"] == "change_skipped"] == []
    recorder = Recorder()
    async with running(db, recorder):
        await wait_until(lambda: recorder.messages == [message["_id"]])
