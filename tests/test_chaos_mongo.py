"""MongoDB faults under load: the daemon rides them out and loses nothing.

Each test runs its own MongoDB (the session's is shared by every other test),
seeds a Rocket.Chat world there, starts `streamer run` against it, and breaks
the database in the middle of a burst of pushes to offline users:

- the only mongod stopped for ~10 s and started again on the same data;
- the primary of a three-member set stepping down, so another one takes over.

The daemon must keep running, say so on `/readyz` while MongoDB is away,
reconnect, and deliver every (device, message) of the burst.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo import MongoClient
from pymongo.errors import AutoReconnect

from streamer import devmongo
from streamer.app import SHUTDOWN_SLACK
from tests.daemon import Daemon, wait_until
from tests.servers import Reply, StubApp, serve_http
from tests.world import GCM, Doc, World, pushes_by_key, settled, write_config

MEMBERS = 40
MESSAGES = 50
DATABASE = "rocketchat"
OUTAGE = 10.0


@pytest.fixture
def gateway() -> Iterator[tuple[StubApp, str]]:
    app = StubApp(Reply(delay=0.01))  # slower than the daemon: the burst lasts a few seconds
    with serve_http(app) as url:
        yield app, url


class Burst:
    """A daemon against `uri`, a world seeded there, and the pushes a burst must produce."""

    def __init__(self, uri: str, tmp_path: Path, gateway: tuple[StubApp, str]) -> None:
        self.stub, gateway_url = gateway
        self.tmp_path = tmp_path
        self.client: MongoClient[Doc] = MongoClient(uri)
        self.world = World(self.client[DATABASE])
        self.members = self.world.add_offline_members(MEMBERS)
        config = write_config(tmp_path / "config.toml", uri, DATABASE, gateway_url)
        self.daemon = Daemon(config).start()
        self.daemon.wait_for_log("started", timeout=60)
        self.mids: list[str] = []

    @property
    def readyz(self) -> str:
        return f"http://{self.daemon.logs('started')[0]['http']}/readyz"

    def running(self) -> bool:
        return self.daemon.process is not None and self.daemon.process.poll() is None

    def mid_burst(self) -> bool:
        """Some pushes of the messages said so far went out, not all of them."""
        return 0 < len(self.stub.received(GCM)) < len(self.expected())

    def say(self, count: int) -> None:
        start = len(self.mids)
        self.mids += [
            self.world.say(self.world.channel, f"burst {n}")["_id"]
            for n in range(start, start + count)
        ]

    def expected(self) -> set[tuple[str, str]]:
        return {(t, mid) for t in self.world.channel_tokens(self.members) for mid in self.mids}

    def settle(self) -> None:
        """Wait until nothing more will be sent; every push arrived, duplicates are printed."""
        total = len(self.expected())
        db = self.client[DATABASE]
        wait_until(lambda: settled(db, total), 60, lambda: "the queue to drain")
        seen = pushes_by_key(self.stub.received(GCM))
        duplicates = {key: n for key, n in seen.items() if n > 1}
        lost = self.expected() - set(seen)
        print(f"\n{len(lost)} of {total} pushes lost, {len(duplicates)} duplicates")
        assert set(seen) - self.expected() == set()
        assert lost == set()
        # No crash, no timeout: the ledger's duplicate windows are not met. (A clean
        # stop and a step-down, which waits for a secondary to catch up, roll nothing back.)
        assert duplicates == {}

    def close(self) -> None:
        log = self.tmp_path / "daemon.log"
        log.write_text("\n".join(self.daemon.raw))
        assert self.daemon.process is not None
        exit_code = self.daemon.process.poll()
        print(f"daemon log: {log}; exit code {exit_code}")  # shown by pytest on failure
        if exit_code is None:
            self.daemon.kill()
        self.client.close()


def ready(url: str) -> tuple[int, Any]:
    try:
        response = httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return 0, None
    return response.status_code, response.json()


def mongo_down(url: str) -> bool:
    """/readyz answers 503 and blames MongoDB."""
    status, report = ready(url)
    return status == 503 and report["components"]["mongo"]["ready"] is False


def outage_over(burst: Burst, since: float) -> bool:
    """Polled while mongod is down: the daemon runs and says it is not ready, every time."""
    assert burst.running(), "the daemon exited while MongoDB was down"
    assert mongo_down(burst.readyz), "/readyz did not blame MongoDB while it was down"
    return time.monotonic() - since >= OUTAGE


def test_mongod_stopped_for_ten_seconds_mid_burst_loses_nothing(
    tmp_path: Path, gateway: tuple[StubApp, str]
) -> None:
    stub, _ = gateway
    with devmongo.running() as server:
        burst = Burst(server.uri, tmp_path, gateway)
        try:
            burst.say(MESSAGES // 2)
            stub.wait_for(200, GCM, timeout=60)
            server.stop()
            down_at = time.monotonic()
            assert burst.mid_burst(), "the burst was over before mongod stopped"
            wait_until(lambda: mongo_down(burst.readyz), 30, lambda: "/readyz: mongo not ready")
            wait_until(lambda: outage_over(burst, down_at), OUTAGE + 5)
            server.restart()
            wait_until(lambda: ready(burst.readyz)[0] == 200, 60, lambda: "/readyz 200 again")
            burst.say(MESSAGES - MESSAGES // 2)
            burst.settle()
            assert burst.daemon.terminate() == 0
        finally:
            burst.close()


def test_primary_step_down_mid_burst_loses_nothing(
    tmp_path: Path, gateway: tuple[StubApp, str]
) -> None:
    stub, _ = gateway
    with devmongo.running_replica_set(n=3) as replica_set:
        burst = Burst(replica_set.uri, tmp_path, gateway)
        try:
            burst.say(MESSAGES // 2)
            stub.wait_for(200, GCM, timeout=60)
            old = replica_set.primary()
            step_down(old)
            assert burst.mid_burst(), "the burst was over before the step-down"
            new = replica_set.primary()
            assert new.port != old.port
            burst.say(MESSAGES - MESSAGES // 2)  # written to the new primary
            burst.settle()
            assert burst.daemon.terminate() == 0
        finally:
            burst.close()


def step_down(member: devmongo.DevMongo) -> None:
    """Ask the primary to step down (it drops its connections, so the answer may be lost)."""
    uri = f"mongodb://127.0.0.1:{member.port}/?directConnection=true"
    with MongoClient(uri) as client, contextlib.suppress(AutoReconnect):
        client.admin.command("replSetStepDown", 30)


@pytest.mark.parametrize("signals", [1, 2], ids=["sigterm", "sigterm-twice"])
def test_a_stop_while_mongod_is_down_ends_the_process(
    tmp_path: Path, gateway: tuple[StubApp, str], signals: int
) -> None:
    """Clean-up waiting on a MongoDB that is gone must not keep the process for ever:
    one signal ends it within the grace period and the slack after it, a second at once.
    (pymongo can be left waiting on a lock for good, PYTHON-5167.)"""
    stub, _ = gateway
    with devmongo.running() as server:
        burst = Burst(server.uri, tmp_path, gateway)
        try:
            burst.say(MESSAGES // 2)
            stub.wait_for(100, GCM, timeout=60)
            server.stop()
            wait_until(lambda: mongo_down(burst.readyz), 30, lambda: "/readyz: mongo not ready")
            assert burst.daemon.process is not None
            for _ in range(signals):  # one at a time: pending signals coalesce
                burst.daemon.process.send_signal(signal.SIGTERM)
                burst.daemon.wait_for_log("shutdown_requested", timeout=30)
            # A bound to wait for, not a measured speed: the grace is 5 s in this config.
            exit_code = burst.daemon.process.wait(timeout=5.0 + SHUTDOWN_SLACK + 15)
            assert exit_code in (0, 1)
            stopped_by = "shutdown_forced" if signals == 2 else "shutdown_stuck"
            assert burst.daemon.logs(stopped_by) or exit_code == 0
        finally:
            burst.close()
