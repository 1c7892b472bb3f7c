"""Two `streamer run` processes on one database, with a rolling restart between them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from pymongo.database import Database

from tests.daemon import Daemon, wait_until
from tests.servers import StubApp
from tests.test_e2e import gateway  # noqa: F401  (a fixture)
from tests.test_email import Mailbox, smtp  # noqa: F401  (a fixture)
from tests.world import GCM, World, pushes_by_key, settled, write_config

Doc = dict[str, Any]


def test_two_instances_and_a_rolling_restart_send_every_push_and_mail_once(
    tmp_path: Path,
    mongo_uri: str,
    db_name: str,
    sync_db: Database[Doc],
    gateway: tuple[StubApp, str],  # noqa: F811
    smtp: tuple[Mailbox, int],  # noqa: F811
) -> None:
    """What one instance delivers while the other restarts, the other must not read
    again when it is back: pushes have the ledger, but mail would go out twice."""
    stub, url = gateway
    mailbox, port = smtp
    world = World(sync_db)
    email = {"host": '"127.0.0.1"', "port": port, "security": '"none"'}
    email |= {"from_address": '"chat@example.org"'}

    def config(instance: str) -> Path:
        app = {"instance_id": f'"{instance}"'}
        return write_config(
            tmp_path / f"{instance}.toml", mongo_uri, db_name, url, app, email=email
        )

    said: list[Doc] = []

    def say(label: str, count: int) -> Doc:
        said.extend(world.say(world.dm, f"{label} {n}") for n in range(count))
        everything = len(said)
        wait_until(
            lambda: settled(sync_db, everything) and mailed(mailbox, said).total() >= everything,
            60,
        )
        return said[-1]

    with Daemon(config("a")) as a, Daemon(config("b")) as b:
        for daemon in (a, b):
            daemon.wait_for_log("started", timeout=60)
        say("both up", 5)
        assert b.terminate() == 0
        say("b restarting", 5)
        with Daemon(config("b")) as back:
            back.wait_for_log("started", timeout=60)
            last = say("b back", 5)
            back.wait_for_log("message_decided", mid=last["_id"])  # it read past the rest
            assert back.terminate() == 0
        assert a.terminate() == 0
    assert pushes_by_key(stub.received(GCM)) == Counter(
        {("gcm-device-bob", message["_id"]): 1 for message in said}
    )
    assert mailed(mailbox, said) == Counter(message["msg"] for message in said)


def mailed(mailbox: Mailbox, said: list[Doc]) -> Counter[str]:
    """How many mails carried each message's text (the texts are unique here)."""
    bodies = [envelope.content.decode(errors="replace") for envelope in mailbox.envelopes]
    return Counter(message["msg"] for message in said for body in bodies if message["msg"] in body)
