"""The daemon end to end: `streamer run` as a subprocess, the real mongod, a real local gateway.

Each test seeds a small Rocket.Chat world, starts the daemon exactly as an
operator would (a config file), makes something happen in the database, and
asserts on what reached the gateway and what the daemon logged.
"""

from __future__ import annotations

import datetime as dt
import itertools
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from bson import DatetimeMS
from pymongo.database import Database

from tests import factories as f
from tests.daemon import Daemon, wait_until
from tests.servers import Reply, StubApp, serve_http
from tests.world import GCM, World, pushes_by_key, write_config

Doc = dict[str, Any]


@pytest.fixture
def gateway() -> Iterator[tuple[StubApp, str]]:
    app = StubApp()
    with serve_http(app) as url:
        yield app, url


@pytest.fixture
def world(sync_db: Database[Doc]) -> World:
    return World(sync_db)


@pytest.fixture
def daemon_for(
    tmp_path: Path, mongo_uri: str, db_name: str, gateway: tuple[StubApp, str]
) -> Iterator[Any]:
    started: list[Daemon] = []

    def start(**queue: Any) -> Daemon:
        config = write_config(tmp_path / "config.toml", mongo_uri, db_name, gateway[1], **queue)
        daemon = Daemon(config).start()
        started.append(daemon)
        daemon.wait_for_log("started", timeout=60)
        return daemon

    yield start
    for daemon in started:
        print("\n".join(daemon.raw[-40:]))  # shown by pytest when the test failed
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.kill()


def test_offline_users_direct_message_reaches_the_gateway(
    world: World, daemon_for: Any, gateway: tuple[StubApp, str]
) -> None:
    stub, _ = gateway
    daemon = daemon_for()
    message = world.say(world.dm, "are you there?")

    (request,) = stub.wait_for(1, GCM, timeout=30)
    body = request.json()
    assert request.headers["authorization"] == "Bearer ws-token"
    assert body["token"] == "gcm-device-bob"
    assert body["options"]["userId"] == world.bob["_id"]
    assert body["options"]["payload"]["messageId"] == message["_id"]
    assert body["options"]["payload"]["rid"] == world.dm["_id"]
    assert "are you there?" in body["options"]["text"]
    daemon.wait_for_log("message_decided", mid=message["_id"])
    base = f"http://{daemon.logs('started')[0]['http']}"
    wait_until(lambda: httpx.get(f"{base}/readyz").status_code == 200, 30)
    metrics = httpx.get(f"{base}/metrics").text
    assert 'streamer_pushes_total{provider="gateway",result="sent"} 1.0' in metrics
    assert "streamer_messages_seen_total 1.0" in metrics
    assert daemon.terminate() == 0
    assert "push:  yes" in explain(daemon, message["_id"], "bob")


def test_a_delivery_mongodb_keeps_refusing_is_retried_at_a_pace_then_sent(
    world: World, daemon_for: Any, gateway: tuple[StubApp, str], sync_db: Database[Doc]
) -> None:
    """The ledger's collection refuses every write (as if the daemon's user lost write
    access to it): the push is tried again about once a second, not in a tight loop,
    and goes out once writes are allowed again."""
    stub, _ = gateway
    sync_db.create_collection("streamer_sent", validator={"refused": True})
    daemon = daemon_for()
    message = world.say(world.dm)
    refusals = daemon.wait_for_log("delivery_interrupted", count=3, mid=message["_id"])
    times = [dt.datetime.fromisoformat(line["timestamp"]) for line in refusals[:3]]
    assert all(
        later - earlier >= dt.timedelta(seconds=0.9) for earlier, later in itertools.pairwise(times)
    )
    sync_db.command("collMod", "streamer_sent", validator={})
    (request,) = stub.wait_for(1, GCM, timeout=30)
    assert request.json()["options"]["payload"]["messageId"] == message["_id"]
    assert daemon.terminate() == 0


def queued_for_online_bob(
    world: World, daemon_for: Any, sync_db: Database[Doc], delay: float
) -> tuple[Daemon, Doc]:
    """Bob is online, so Alice's DM waits `delay` seconds in the queue: it is there now."""
    world.db.users.update_one({"_id": world.bob["_id"]}, {"$set": {"status": "online"}})
    daemon = daemon_for(delay_online=delay)
    message = world.say(world.dm)
    wait_until(lambda: sync_db.streamer_queue.count_documents({"mid": message["_id"]}), 30)
    return daemon, message


def test_online_users_push_waits_and_is_cancelled_by_reading_the_room(
    world: World, daemon_for: Any, gateway: tuple[StubApp, str], sync_db: Database[Doc]
) -> None:
    stub, _ = gateway
    daemon, _ = queued_for_online_bob(world, daemon_for, sync_db, delay=3600)
    sync_db.rocketchat_subscription.update_one(
        {"_id": world.bob_dm["_id"]},
        {"$set": {"ls": dt.datetime.now(dt.UTC), "unread": 0, "alert": False}},
    )
    daemon.wait_for_log("queue_cleared_on_read", uid=world.bob["_id"])
    assert sync_db.streamer_queue.count_documents({}) == 0
    assert daemon.terminate() == 0
    assert stub.received(GCM) == []


def test_online_users_push_goes_out_after_the_delay(
    world: World, daemon_for: Any, gateway: tuple[StubApp, str]
) -> None:
    stub, _ = gateway
    world.db.users.update_one({"_id": world.bob["_id"]}, {"$set": {"status": "online"}})
    daemon = daemon_for(delay_online=1)
    message = world.say(world.dm)
    (request,) = stub.wait_for(1, GCM, timeout=30)
    assert request.json()["options"]["payload"]["messageId"] == message["_id"]
    assert daemon.terminate() == 0


def test_a_message_deleted_before_its_push_is_due_sends_nothing(
    world: World, daemon_for: Any, gateway: tuple[StubApp, str], sync_db: Database[Doc]
) -> None:
    """The fire-time recheck reads the message again (once per batch of due entries)."""
    stub, _ = gateway
    daemon, message = queued_for_online_bob(world, daemon_for, sync_db, delay=5)
    sync_db.rocketchat_message.delete_one({"_id": message["_id"]})

    daemon.wait_for_log("queue_entry_dropped", mid=message["_id"], reason="message_deleted")
    assert sync_db.streamer_queue.count_documents({}) == 0
    assert daemon.terminate() == 0
    assert stub.received(GCM) == []


@pytest.mark.parametrize(
    ("collection", "change", "reason"),
    [
        ("rocketchat_subscription", {"ignored": ["u-alice"]}, "sender_ignored"),
        ("rocketchat_subscription", {"disableNotifications": True}, "room_notifications_disabled"),
        ("users", {"status": "busy"}, "user_busy"),
        ("rocketchat_subscription", {"mobilePushNotifications": "nothing"}, "preference_nothing"),
    ],
)
def test_a_recipient_who_should_not_get_a_push_gets_none_and_the_reason_is_logged(
    world: World,
    daemon_for: Any,
    gateway: tuple[StubApp, str],
    collection: str,
    change: dict[str, Any],
    reason: str,
) -> None:
    stub, _ = gateway
    target = world.bob_dm if collection == "rocketchat_subscription" else world.bob
    world.db[collection].update_one({"_id": target["_id"]}, {"$set": change})
    daemon = daemon_for()
    message = world.say(world.dm)
    (line,) = daemon.wait_for_log("message_decided", mid=message["_id"])
    assert line["not_pushed"].get(reason) == 1
    assert line["pushes"] == 0
    assert daemon.terminate() == 0
    assert stub.received(GCM) == []
    assert "push:  no, " in explain(daemon, message["_id"], "bob")
    assert f"[{reason}]" in explain(daemon, message["_id"], "bob")


def test_large_room_without_mention_sends_nothing(
    world: World, daemon_for: Any, gateway: tuple[StubApp, str]
) -> None:
    stub, _ = gateway
    others = [f.user(f"member{n}") for n in range(12)]
    world.db.users.insert_many(others)
    world.db.rocketchat_subscription.insert_many([f.subscription(u, world.channel) for u in others])
    world.db.rocketchat_settings.update_one(
        {"_id": "Notifications_Max_Room_Members"}, {"$set": {"value": 10}}
    )
    daemon = daemon_for()
    message = world.say(world.channel, "hello everyone")
    (line,) = daemon.wait_for_log("message_decided", mid=message["_id"])
    assert line["not_pushed"].get("large_room") == 13  # bob and the twelve others
    assert daemon.terminate() == 0
    assert stub.received(GCM) == []


def test_sigterm_mid_burst_then_restart_delivers_every_push_exactly_once(
    world: World, daemon_for: Any, gateway: tuple[StubApp, str]
) -> None:
    stub, _ = gateway
    stub.default = Reply(delay=0.005)  # a gateway a little slower than the daemon
    members = world.add_offline_members(40)
    first = daemon_for()
    mids = [world.say(world.channel, f"burst {n}")["_id"] for n in range(25)]
    stub.wait_for(100, GCM, timeout=60)
    assert first.terminate() == 0
    first.wait_for_log("stopped")
    sent_before_restart = len(stub.received(GCM))

    second = daemon_for()
    stub.wait_for(len(members) * 25 + 25, GCM, timeout=120)
    assert second.terminate() == 0
    seen = pushes_by_key(stub.received(GCM))
    expected = {(token, mid) for token in world.channel_tokens(members) for mid in mids}
    assert set(seen) == expected
    assert [key for key, count in seen.items() if count > 1] == []
    assert sent_before_restart < len(seen), "the burst finished before SIGTERM"


def explain(daemon: Daemon, mid: str, user: str) -> str:
    """What `streamer explain` says, run like an operator would against the same config."""
    result = subprocess.run(
        [sys.executable, "-m", "streamer", "explain", mid, "--user", user],
        env={**daemon.env, "STREAMER_CONFIG": str(daemon.config_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def test_a_date_javascript_writes_and_python_cannot_hold_costs_its_document_only(
    world: World, daemon_for: Any, gateway: tuple[StubApp, str]
) -> None:
    """JavaScript dates reach year 275760 (an importer's "never", `new Date(8.64e15)`);
    Python's stop at 9999. Read as a datetime, such a date failed the whole batch
    before any handler, and the restarted daemon met it again: no push for anyone."""
    stub, _ = gateway
    never = DatetimeMS(8_640_000_000_000_000)
    daemon = daemon_for()
    bad = world.say(world.dm, "from the far future", ts=never)
    good = world.say(world.dm, "still here?")
    stub.wait_for(1, GCM, timeout=30)
    daemon.wait_for_log("malformed_document", mid=bad["_id"])
    [request] = stub.received(GCM)
    assert request.json()["options"]["payload"]["messageId"] == good["_id"]
    assert daemon.terminate() == 0


def test_readyz_says_when_the_workspace_has_no_token_before_any_push(
    world: World, daemon_for: Any, sync_db: Database[Doc]
) -> None:
    """Every push would fail: /readyz must say so without waiting for one."""
    sync_db.rocketchat_workspace_credentials.delete_many({})
    daemon = daemon_for()
    base = f"http://{daemon.logs('started')[0]['http']}"

    def delivery() -> Any:
        return httpx.get(f"{base}/readyz").json()["components"]["delivery"]

    wait_until(lambda: "no workspace access token" in (delivery()["reason"] or ""), 30)
    assert daemon.terminate() == 0


def test_readyz_says_not_ready_as_soon_as_the_drain_starts(
    world: World, daemon_for: Any, gateway: tuple[StubApp, str]
) -> None:
    """A health check that still answers 200 while the process drains and stops
    routes new work to it: the stop must show at once, with its reason."""
    stub, _ = gateway
    stub.script(GCM, Reply(delay=3.0))  # the push in flight holds the drain
    daemon = daemon_for()
    base = f"http://{daemon.logs('started')[0]['http']}"
    wait_until(lambda: httpx.get(f"{base}/readyz").status_code == 200, 30)
    world.say(world.dm, "in flight at the stop")
    stub.wait_for(1, GCM, timeout=30)
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGTERM)
    daemon.wait_for_log("draining", timeout=10)
    response = httpx.get(f"{base}/readyz")
    assert response.status_code == 503
    assert response.json()["components"]["app"] == {"ready": False, "reason": "shutting down"}
    assert daemon.process.wait(timeout=30) == 0


def test_a_second_process_under_the_same_instance_id_waits_for_the_first(
    world: World, tmp_path: Path, mongo_uri: str, db_name: str, gateway: tuple[StubApp, str]
) -> None:
    """Both would take every entry as their own (see streamer/instance.py): the second
    says who holds the id and starts only once the first has stopped."""
    stub, url = gateway
    same = {"instance_id": '"streamer-1"'}
    config = write_config(tmp_path / "config.toml", mongo_uri, db_name, url, app=same)
    with Daemon(config) as first:
        first.wait_for_log("started", timeout=60)
        with Daemon(config) as second:
            (waiting,) = second.wait_for_log("instance_id_in_use", timeout=60)
            assert not second.logs("started")
            base = f"http://{second.logs('http_listening')[0]['http']}"
            assert httpx.get(f"{base}/livez").status_code == 200  # up, and says so
            assert httpx.get(f"{base}/readyz").status_code == 503
            assert waiting["holder_pid"] == first.process.pid  # type: ignore[union-attr]
            assert first.terminate() == 0
            second.wait_for_log("started", timeout=30)
            world.say(world.dm, "one of us is enough")
            stub.wait_for(1, GCM, timeout=30)
            assert second.terminate() == 0


def test_a_stop_while_waiting_for_the_instance_id_ends_the_process_cleanly(
    tmp_path: Path, mongo_uri: str, db_name: str, gateway: tuple[StubApp, str]
) -> None:
    """Nothing to drain yet; and as PID 1 in a container, a signal nobody handles is
    ignored until the runtime gives up and kills."""
    same = {"instance_id": '"streamer-1"'}
    config = write_config(tmp_path / "config.toml", mongo_uri, db_name, gateway[1], app=same)
    with Daemon(config) as first:
        first.wait_for_log("started", timeout=60)
        with Daemon(config) as second:
            second.wait_for_log("instance_id_in_use", timeout=60)
            assert second.terminate(timeout=10) == 0
        assert first.terminate() == 0
