"""PushSender: what each gateway answer does to the token, the retry and the ledger."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import pytest
from prometheus_client import REGISTRY
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from structlog.testing import capture_logs

from streamer.config import DeliveryConfig, FcmConfig
from streamer.delivery.base import Device
from streamer.delivery.errors import REFUSALS_IN_A_ROW, Outcome
from streamer.delivery.fcm import FcmPushkin
from streamer.delivery.gateway import GatewayPushkin, WorkspaceToken
from streamer.delivery.http import InFlightCap, ProviderClient, make_http_client
from streamer.delivery.ledger import SENT_LEDGER, SentLedger
from streamer.delivery.sender import (
    Attempts,
    Delivered,
    GivenUp,
    PushSender,
    RetryAt,
    RetryPolicy,
    device_of,
)
from streamer.model import PUSH_TOKENS, PushToken
from tests import factories
from tests.credentials import write_service_account
from tests.failpoints import BAD_VALUE, fail_commands
from tests.servers import Reply, StubApp, serve_connections
from tests.test_gateway import CONTENT, NOW, Clock, store_workspace_token

Doc = dict[str, object]
CONFIG = DeliveryConfig(
    concurrency=8, timeout=0.5, retry_initial=1.0, retry_max=300.0, give_up_after=3600.0
)
ALICE = factories.user("alice")
FIRST = Attempts(0, None)
MakeSender = Callable[..., PushSender]


@pytest.fixture
async def client() -> AsyncIterator[ProviderClient]:
    async with make_http_client(CONFIG) as http:
        yield http


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def make_sender(
    db: AsyncDatabase[Doc], client: ProviderClient, gateway_url: str, clock: Clock
) -> AsyncIterator[MakeSender]:
    """A fresh sender per call, as after a restart: nothing shared but the database."""
    await store_workspace_token(db, "workspace-token-1")

    def make(resend_unknown: bool = False, config: DeliveryConfig = CONFIG) -> PushSender:
        pushkin = GatewayPushkin(
            client, lambda: [gateway_url], WorkspaceToken(db, clock), clock=clock
        )
        ledger = SentLedger(db, resend_unknown=resend_unknown)
        return PushSender(
            {"apn": pushkin, "gcm": pushkin},
            db,
            config,
            cap=InFlightCap(4),
            ledger=ledger,
            clock=clock,
        )

    yield make


async def stored_devices(db: AsyncDatabase[Doc], *kinds: str) -> list[Device]:
    docs = [
        factories.push_token(ALICE, kind, token={kind: f"{kind}-{i}"})
        for i, kind in enumerate(kinds)
    ]
    await db[PUSH_TOKENS].insert_many(docs)
    return [device_of(PushToken.from_doc(doc)) for doc in docs]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.anyio
async def test_every_device_of_the_user_gets_the_push(
    make_sender: MakeSender, db: AsyncDatabase[Doc], stub: StubApp
) -> None:
    devices = await stored_devices(db, "apn", "gcm", "gcm", "gcm", "apn", "gcm")
    result = await make_sender().send(CONTENT, devices, FIRST)
    assert result == Delivered()
    assert sorted(r.json()["token"] for r in stub.received()) == sorted(d.token for d in devices)


@pytest.mark.anyio
async def test_only_a_refused_push_is_logged_as_rejected(
    make_sender: MakeSender, db: AsyncDatabase[Doc], stub: StubApp
) -> None:
    refused, delivered = await stored_devices(db, "gcm", "apn")
    stub.script("/push/gcm/send", Reply(422))
    with capture_logs() as logs:
        assert await make_sender().send(CONTENT, [refused, delivered], FIRST) == Delivered()
    rejected = [line["token_id"] for line in logs if line["event"] == "push_rejected"]
    assert rejected == [refused.token_id]


@pytest.mark.anyio
async def test_a_dead_token_is_deleted_from_rocket_chat(
    make_sender: MakeSender, db: AsyncDatabase[Doc], stub: StubApp
) -> None:
    dead, alive = await stored_devices(db, "gcm", "apn")
    stub.script("/push/gcm/send", Reply(406))
    deleted_before = metric("streamer_tokens_deleted_total")
    assert await make_sender().send(CONTENT, [dead, alive], FIRST) == Delivered()
    remaining = [doc["_id"] async for doc in db[PUSH_TOKENS].find({})]
    assert remaining == [alive.token_id]
    assert metric("streamer_tokens_deleted_total") == deleted_before + 1


@pytest.mark.anyio
async def test_a_dead_token_mongodb_cannot_delete_is_still_recorded_and_the_rest_finish(
    make_sender: MakeSender, db: AsyncDatabase[Doc], stub: StubApp, mongo: AsyncMongoClient[Doc]
) -> None:
    """The phone's token is dead and its delete fails. The answer is final all the same:
    recorded, not left "sending" (an unknown outcome, never sent again by default); the
    token stays for the next push to find dead. The tablet's push, in flight, finishes."""
    dead, alive = await stored_devices(db, "gcm", "apn")
    stub.script("/push/gcm/send", Reply(406))
    stub.script("/push/apn/send", Reply(delay=0.2))  # in flight when the delete fails
    await fail_commands(mongo, mode={"times": 1}, failCommands=["delete"], errorCode=BAD_VALUE)
    with capture_logs() as logs:
        assert await make_sender().send(CONTENT, [dead, alive], FIRST) == Delivered()
    records = {doc["_id"]["token"]: doc async for doc in db[SENT_LEDGER].find({})}
    assert records[alive.token]["state"] == records[dead.token]["state"] == "sent"
    assert records[dead.token]["outcome"] == Outcome.DEAD_TOKEN.value
    assert [line["token_id"] for line in logs if line["event"] == "dead_token_not_deleted"] == [
        dead.token_id
    ]
    assert await db[PUSH_TOKENS].count_documents({"_id": dead.token_id}) == 1
    assert len(stub.received("/push/apn/send")) == 1


@pytest.mark.anyio
async def test_mongodb_failing_before_the_request_is_a_retry_not_a_crash(
    make_sender: MakeSender, db: AsyncDatabase[Doc], stub: StubApp, mongo: AsyncMongoClient[Doc]
) -> None:
    """The workspace token could not be read: nothing was sent, so the claim is freed and
    the push retried, with no traceback counted as an unexpected error."""
    [device] = await stored_devices(db, "gcm")
    await fail_commands(mongo, mode={"times": 1}, failCommands=["find"], errorCode=BAD_VALUE)
    unexpected_before = metric(
        "streamer_pushes_total", provider="gateway", result="unexpected_error"
    )
    with capture_logs() as logs:
        result = await make_sender().send(CONTENT, [device], FIRST)
    assert isinstance(result, RetryAt) and "MongoDB unavailable" in result.error
    assert "push_failed_unexpectedly" not in [line["event"] for line in logs]
    assert metric("streamer_pushes_total", provider="gateway", result="unexpected_error") == (
        unexpected_before
    )
    assert stub.received() == []
    assert await db[SENT_LEDGER].count_documents({}) == 0  # the claim was freed


def held_until(
    asked: threading.Event, released: threading.Event
) -> Callable[[socket.socket], None]:
    """A token server that hangs until the test releases it, then fails."""

    def answer(connection: socket.socket) -> None:
        connection.recv(65536)
        asked.set()
        released.wait(60)
        with contextlib.suppress(OSError):
            connection.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")

    return answer


@pytest.mark.anyio
async def test_a_push_waiting_for_its_token_holds_no_slot_another_provider_needs(
    tmp_path: Path, db: AsyncDatabase[Doc], gateway_url: str, stub: StubApp, clock: Clock
) -> None:
    """One slot in flight. The Android push waits for Google's token server, which hangs;
    the iPhone's push (here through the gateway) goes out meanwhile, not after it."""
    await store_workspace_token(db, "workspace-token-1")
    android, iphone = await stored_devices(db, "gcm", "apn")
    asked, released = threading.Event(), threading.Event()
    config = dataclasses.replace(CONFIG, timeout=60.0)
    with serve_connections(held_until(asked, released)) as oauth_url:
        path, _ = write_service_account(tmp_path, token_uri=f"{oauth_url}/token")
        async with make_http_client(config) as client:
            fcm = FcmPushkin(FcmConfig(service_account_file=str(path)), client=client)
            gateway = GatewayPushkin(client, lambda: [gateway_url], WorkspaceToken(db, clock))
            sender = PushSender(
                {"gcm": fcm, "apn": gateway}, db, config, cap=InFlightCap(1),
                ledger=SentLedger(db), clock=clock,
            )  # fmt: skip
            try:
                async with anyio.create_task_group() as pushes:
                    pushes.start_soon(sender.send, CONTENT, [android], FIRST)
                    assert await anyio.to_thread.run_sync(asked.wait, 20)
                    with anyio.fail_after(20):  # far below the 60 s the token wait may take
                        assert await sender.send(CONTENT, [iphone], FIRST) == Delivered()
                    released.set()
            finally:
                released.set()
    assert [r.json()["token"] for r in stub.received()] == [iphone.token]


@pytest.mark.anyio
async def test_refusals_of_every_push_keep_the_tokens_and_say_why(
    make_sender: MakeSender, db: AsyncDatabase[Doc], stub: StubApp
) -> None:
    """A wrong topic or sandbox tokens sent to production: every push comes back "dead".
    Past REFUSALS_IN_A_ROW with none through, no more tokens are deleted (each one would
    cost a user a reinstall), the pushes are kept, and /readyz says why, until a push
    goes through."""
    devices = await stored_devices(db, *["gcm"] * (REFUSALS_IN_A_ROW + 5))
    stub.default = Reply(406)
    sender = make_sender()
    result = await sender.send(CONTENT, devices, FIRST)
    assert isinstance(result, RetryAt)
    remaining = await db[PUSH_TOKENS].count_documents({})
    assert remaining == len(devices) - (REFUSALS_IN_A_ROW - 1)
    assert sender.problem is not None and "none went through" in sender.problem
    stub.default = Reply(200)
    [alive] = await stored_devices(db, "apn")
    assert await sender.send(CONTENT, [alive], FIRST) == Delivered()
    assert sender.problem is None
    stub.default = Reply(406)
    kept = [d for d in devices if await db[PUSH_TOKENS].count_documents({"_id": d.token_id})]
    assert await sender.send(CONTENT, kept[:1], FIRST) == Delivered()  # deleted this time
    assert await db[PUSH_TOKENS].count_documents({"_id": kept[0].token_id}) == 0


@pytest.mark.anyio
async def test_a_push_cut_short_by_the_end_of_the_grace_is_retried_not_lost(
    make_sender: MakeSender, db: AsyncDatabase[Doc], stub: StubApp
) -> None:
    """`shutdown_grace` ran out while the gateway was still answering. Left "sending",
    the default `unknown_outcome` would never send it again: a push lost on every
    graceful stop with a slow provider. It is retried, as after a timeout."""
    [device] = await stored_devices(db, "gcm")
    stub.script("/push/gcm/send", Reply(delay=5.0))
    async with anyio.create_task_group() as tg:
        tg.start_soon(make_sender().send, CONTENT, [device], FIRST)
        with anyio.fail_after(10):
            while not stub.received():  # noqa: ASYNC110
                await anyio.sleep(0.01)  # the request is in flight: a condition to wait on
        tg.cancel_scope.cancel()
    assert await db[SENT_LEDGER].count_documents({}) == 0
    assert await make_sender().send(CONTENT, [device], FIRST) == Delivered()
    assert len(stub.received()) == 2


@pytest.mark.anyio
async def test_a_rejected_push_is_dropped_and_the_token_kept(
    make_sender: MakeSender, db: AsyncDatabase[Doc], stub: StubApp
) -> None:
    [device] = await stored_devices(db, "gcm")
    stub.script("/push/gcm/send", Reply(422))
    assert await make_sender().send(CONTENT, [device], FIRST) == Delivered()
    assert await db[PUSH_TOKENS].count_documents({}) == 1


@pytest.mark.anyio
async def test_retry_after_is_honoured(
    make_sender: MakeSender, db: AsyncDatabase[Doc], stub: StubApp, clock: Clock
) -> None:
    [device] = await stored_devices(db, "gcm")
    stub.script("/push/gcm/send", Reply(429, headers={"retry-after": "120"}))
    result = await make_sender().send(CONTENT, [device], FIRST)
    assert isinstance(result, RetryAt)
    assert result.at == NOW + 120
    assert result.attempts == Attempts(1, NOW)


@pytest.mark.anyio
async def test_server_errors_back_off_exponentially_with_jitter(
    make_sender: MakeSender, db: AsyncDatabase[Doc], stub: StubApp, clock: Clock
) -> None:
    [device] = await stored_devices(db, "gcm")
    stub.script("/push/gcm/send", Reply(503), Reply(503))
    sender = make_sender()
    first = await sender.send(CONTENT, [device], FIRST)
    assert isinstance(first, RetryAt)
    assert NOW + 1 <= first.at <= NOW + 2  # initial, plus up to `initial` of jitter
    clock.now = first.at
    second = await sender.send(CONTENT, [device], first.attempts)
    assert isinstance(second, RetryAt)
    assert clock.now + 2 <= second.at <= clock.now + 3
    assert second.attempts == Attempts(2, NOW)


@pytest.mark.anyio
async def test_retry_then_success_pushes_only_the_devices_that_failed(
    make_sender: MakeSender, db: AsyncDatabase[Doc], stub: StubApp, clock: Clock
) -> None:
    iphone, android = await stored_devices(db, "apn", "gcm")
    stub.script("/push/gcm/send", Reply(500))
    sender = make_sender()
    retry = await sender.send(CONTENT, [iphone, android], FIRST)
    assert isinstance(retry, RetryAt)
    clock.now = retry.at
    assert await sender.send(CONTENT, [iphone, android], retry.attempts) == Delivered()
    paths = sorted(r.path for r in stub.received())
    assert paths == ["/push/apn/send", "/push/gcm/send", "/push/gcm/send"]


@pytest.mark.anyio
async def test_a_push_failing_past_give_up_after_is_given_up(
    make_sender: MakeSender, db: AsyncDatabase[Doc], stub: StubApp
) -> None:
    [device] = await stored_devices(db, "gcm")
    stub.script("/push/gcm/send", Reply(503))
    failing_since = NOW - CONFIG.give_up_after
    given_up_before = metric("streamer_push_given_up_total")
    result = await make_sender().send(CONTENT, [device], Attempts(7, failing_since))
    assert isinstance(result, GivenUp)
    assert "503" in result.error
    assert metric("streamer_push_given_up_total") == given_up_before + 1


@pytest.mark.anyio
async def test_invalid_credentials_retry_and_mark_the_sender_unhealthy_until_a_success(
    make_sender: MakeSender, db: AsyncDatabase[Doc], stub: StubApp, clock: Clock
) -> None:
    [device] = await stored_devices(db, "apn")
    stub.script("/push/apn/send", *[Reply(401)] * 4)
    sender = make_sender()
    result = await sender.send(CONTENT, [device], FIRST)
    assert isinstance(result, RetryAt)
    assert "streamer doctor" in result.error
    assert sender.problem is not None
    assert sender.problem is not None and "401" in sender.problem  # what /readyz reports
    clock.now = result.at
    assert await sender.send(CONTENT, [device], result.attempts) != Delivered()
    assert await sender.send(CONTENT, [device], result.attempts) == Delivered()
    assert sender.problem is None


@pytest.mark.anyio
async def test_any_answer_of_the_provider_ends_the_credentials_failure(
    make_sender: MakeSender, db: AsyncDatabase[Doc], stub: StubApp
) -> None:
    """Fixed credentials, but the next push goes to a dead token: ready again all the same."""
    [device] = await stored_devices(db, "gcm")
    stub.script("/push/gcm/send", Reply(401), Reply(401), Reply(406))
    sender = make_sender()
    assert isinstance(await sender.send(CONTENT, [device], FIRST), RetryAt)
    assert sender.problem is not None
    assert await sender.send(CONTENT, [device], FIRST) == Delivered()  # the token is dead
    assert sender.problem is None


@pytest.mark.anyio
async def test_one_providers_success_does_not_end_anothers_credentials_failure(
    make_sender: MakeSender, db: AsyncDatabase[Doc], stub: StubApp
) -> None:
    """Direct mode: APNs working says nothing of a revoked FCM key; /readyz stays failed
    (and the loud line stays one) until FCM itself answers."""
    android, iphone = await stored_devices(db, "gcm", "apn")
    stub.script("/push/gcm/send", Reply(401), Reply(401), Reply(401), Reply(401))
    sender = make_sender(config=dataclasses.replace(CONFIG, mode="direct"))
    with capture_logs() as logs:
        for _ in range(2):
            assert isinstance(await sender.send(CONTENT, [android], FIRST), RetryAt)
            assert await sender.send(CONTENT, [iphone], FIRST) == Delivered()
            assert sender.problem is not None
            assert sender.problem is not None and sender.problem.startswith("fcm: ")
    assert len([line for line in logs if line["event"] == "push_credentials_invalid"]) == 1
    assert await sender.send(CONTENT, [android], FIRST) == Delivered()
    assert sender.problem is None


@pytest.mark.anyio
async def test_invalid_credentials_are_logged_loudly_once_not_per_push(
    make_sender: MakeSender, db: AsyncDatabase[Doc], stub: StubApp
) -> None:
    [device] = await stored_devices(db, "apn")
    stub.default = Reply(401)
    sender = make_sender()
    with capture_logs() as logs:
        for _ in range(3):
            await sender.send(CONTENT, [device], FIRST)
    loud = [line for line in logs if line["event"] == "push_credentials_invalid"]
    assert len(loud) == 1
    assert loud[0]["log_level"] == "error"
    assert "workspace not registered or credentials invalid" in loud[0]["error"]


@pytest.mark.anyio
async def test_a_device_marked_sent_before_a_crash_is_not_pushed_again(
    make_sender: MakeSender, db: AsyncDatabase[Doc], stub: StubApp
) -> None:
    [device] = await stored_devices(db, "gcm")
    ledger = SentLedger(db)
    await ledger.claim(CONTENT.uid, CONTENT.mid, [device], NOW)
    await ledger.finish(CONTENT.uid, CONTENT.mid, device, Outcome.SENT, NOW)
    # the process dies here; a new one picks the queue entry up again
    assert await make_sender().send(CONTENT, [device], FIRST) == Delivered()
    assert stub.received() == []


@pytest.mark.anyio
@pytest.mark.parametrize(("resend_unknown", "pushes"), [(False, 0), (True, 1)])
async def test_a_push_whose_outcome_a_crash_hid_is_skipped_or_sent_again(
    make_sender: MakeSender,
    db: AsyncDatabase[Doc],
    stub: StubApp,
    resend_unknown: bool,
    pushes: int,
) -> None:
    [device] = await stored_devices(db, "gcm")
    await SentLedger(db).claim(CONTENT.uid, CONTENT.mid, [device], NOW)
    # the process dies between the claim and the mark: maybe sent. At most once by
    # default (the entry is done), at least once when configured to resend.
    with capture_logs() as logs:
        sender = make_sender(resend_unknown)
        assert await sender.send(CONTENT, [device], FIRST) == Delivered()
    assert len(stub.received()) == pushes
    assert [line["event"] for line in logs].count("push_outcome_unknown") == 1


@pytest.mark.anyio
async def test_the_same_message_to_the_same_device_twice_is_pushed_once(
    make_sender: MakeSender, db: AsyncDatabase[Doc], stub: StubApp
) -> None:
    [device] = await stored_devices(db, "gcm")
    twin = dataclasses.replace(device, token_id="another-doc-same-token")
    sender = make_sender()
    assert await sender.send(CONTENT, [device, twin], FIRST) == Delivered()
    assert await sender.send(CONTENT, [device], FIRST) == Delivered()
    assert len(stub.received()) == 1


@pytest.mark.anyio
async def test_pushes_are_counted_by_provider_and_result(
    make_sender: MakeSender, db: AsyncDatabase[Doc], stub: StubApp
) -> None:
    devices = await stored_devices(db, "gcm", "apn")
    stub.script("/push/apn/send", Reply(422))
    sent = metric("streamer_pushes_total", provider="gateway", result="sent")
    rejected = metric("streamer_pushes_total", provider="gateway", result="rejected")
    await make_sender().send(CONTENT, devices, FIRST)
    assert metric("streamer_pushes_total", provider="gateway", result="sent") == sent + 1
    assert metric("streamer_pushes_total", provider="gateway", result="rejected") == rejected + 1


@pytest.mark.anyio
async def test_a_timed_out_push_is_retried_because_it_may_not_have_arrived(
    make_sender: MakeSender, db: AsyncDatabase[Doc], stub: StubApp, clock: Clock
) -> None:
    [device] = await stored_devices(db, "gcm")
    stub.script("/push/gcm/send", Reply(delay=1.0))
    sender = make_sender()
    retry = await sender.send(CONTENT, [device], FIRST)
    assert isinstance(retry, RetryAt)
    assert "timed out" in retry.error
    clock.now = retry.at
    assert await sender.send(CONTENT, [device], retry.attempts) == Delivered()
    assert len(stub.received()) == 2


@pytest.mark.anyio
async def test_the_in_flight_cap_holds_requests_beyond_its_limit() -> None:
    cap = InFlightCap(2)
    release = anyio.Event()
    before = metric("streamer_pushes_in_flight")
    entered: list[int] = []

    async def request(n: int) -> None:
        async with cap.slot():
            entered.append(n)
            await release.wait()

    async with anyio.create_task_group() as tasks:
        for n in range(5):
            tasks.start_soon(request, n)
        await anyio.wait_all_tasks_blocked()
        assert len(entered) == 2
        assert metric("streamer_pushes_in_flight") == before + 2
        release.set()
    assert len(entered) == 5
    assert metric("streamer_pushes_in_flight") == before


def test_a_retry_after_longer_than_give_up_after_waits_only_until_the_give_up_time() -> None:
    """A gateway's `Retry-After: 86400` must not park a push past its give-up time."""
    policy = RetryPolicy(CONFIG, clock=lambda: NOW)
    failing_since = NOW - 600
    retry = policy.after_failure("503", 86_400.0, Attempts(3, failing_since))
    assert isinstance(retry, RetryAt)
    assert retry.at == failing_since + CONFIG.give_up_after
