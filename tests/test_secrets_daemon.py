"""Secrets in the running daemon's output: none, whatever goes wrong.

`streamer run` against the authenticated TLS mongod (password in the URI), with
a workspace token, an SMTP password the SMTP server refuses, a secret stored
under the wrong type, and a gateway answering 401 then 500: every byte the
daemon writes is searched for every secret, by value.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from pymongo import MongoClient

from streamer.devmongo import free_port
from tests import factories as f
from tests import securemongo
from tests.daemon import Daemon, wait_until
from tests.securemongo import SecureMongo
from tests.servers import Reply, StubApp, serve_http
from tests.test_security import Sink
from tests.world import GCM, World, write_config

Doc = dict[str, Any]
WORKSPACE_TOKEN = "wst-" + secrets.token_urlsafe(24)
OLD_SETTING_TOKEN = "ost-" + secrets.token_urlsafe(24)
SMTP_PASSWORD = "smtp-" + secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def secure() -> Iterator[SecureMongo]:
    with securemongo.running() as server:
        yield server


@pytest.fixture
def refusing_smtp() -> Iterator[int]:
    """An SMTP server that refuses every login, so the password is tried and fails."""

    def refuse(*_: object) -> AuthResult:
        return AuthResult(success=False, handled=False)

    port = free_port()
    controller = Controller(
        Sink(), hostname="127.0.0.1", port=port, authenticator=refuse, auth_require_tls=False
    )
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


def seed(secure: SecureMongo, smtp_port: int) -> World:
    client: MongoClient[Doc] = MongoClient(secure.uri())
    db = client[secure.database]
    for name in db.list_collection_names():
        db.drop_collection(name)
    world = World(db)
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    db.rocketchat_workspace_credentials.update_one(
        {"_id": "wc"}, {"$set": {"accessToken": WORKSPACE_TOKEN, "expirationDate": expires}}
    )
    smtp = {
        "SMTP_Host": "127.0.0.1",
        "SMTP_Port": smtp_port,
        "SMTP_Username": "rocket",
        "SMTP_Password": SMTP_PASSWORD,
        "From_Email": "rocket@example.org",
        # A secret stored with the wrong type: its problem line must not quote it.
        "Cloud_Workspace_Access_Token": [OLD_SETTING_TOKEN],
    }
    db.rocketchat_settings.insert_many([f.setting(k, v) for k, v in smtp.items()])
    return world


def test_no_secret_in_the_daemons_output_when_everything_fails(
    secure: SecureMongo, refusing_smtp: int, tmp_path: Path
) -> None:
    world = seed(secure, refusing_smtp)
    gateway = StubApp(default=Reply(500, b'{"error": "internal"}'))
    gateway.script(GCM, Reply(401), Reply(401), Reply(403), Reply(403))
    with serve_http(gateway) as url:
        config = write_config(tmp_path / "config.toml", secure.uri(), secure.database, url)
        with Daemon(config) as daemon:
            daemon.wait_for_log("started", timeout=60)
            message = world.say(world.dm, "psst")
            daemon.wait_for_log("push_credentials_invalid", timeout=30)
            wait_until(lambda: len(gateway.received(GCM)) >= 6, 30, lambda: "500s after 401s")
            daemon.wait_for_log("push_retry_scheduled", count=3, mid=message["_id"])
            daemon.wait_for_log("bad_setting", timeout=30)
            wait_until(lambda: _smtp_refused(daemon), 30, lambda: "the SMTP login refused")
            readyz = f"http://{daemon.logs('started')[0]['http']}/readyz"
            wait_until(lambda: _blames_email(readyz), 10, lambda: "/readyz: the SMTP login")
            assert daemon.terminate() == 0
    assert gateway.received(GCM)[0].headers["authorization"] == f"Bearer {WORKSPACE_TOKEN}"
    output = "\n".join(daemon.raw)
    for secret in (secure.password, quote(secure.password, safe=""), WORKSPACE_TOKEN,
                   OLD_SETTING_TOKEN, SMTP_PASSWORD):  # fmt: skip
        assert secret not in output


def _smtp_refused(daemon: Daemon) -> bool:
    return any(
        "email" in line.get("kind", "") and line.get("event") == "email_retry_scheduled"
        for line in daemon.logs()
    )


def _blames_email(readyz: str) -> bool:
    delivery = httpx.get(readyz).json()["components"]["delivery"]
    return not delivery["ready"] and "email: " in delivery["reason"]
