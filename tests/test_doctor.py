"""`streamer doctor` against the real mongod and a local stand-in for the Push Gateway.

A healthy deployment passes every check; each misconfiguration produces its
FAIL line with the fix, and the command exits 1.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pymongo.asynchronous.database import AsyncDatabase

from streamer import doctor
from streamer.config import ApnsConfig, Config, DeliveryConfig, FcmConfig, MongoConfig
from streamer.delivery.http import ProviderClient, make_http_client
from streamer.devmongo import free_port
from streamer.doctor import Check, Status, run_checks
from tests import factories as f
from tests.servers import Reply, StubApp, serve_http

Doc = dict[str, Any]
WORKSPACE_TOKEN = "workspace-access-token-1"
GATEWAY_PATH = "/push/gcm/send"


@pytest.fixture
def gateway() -> Iterator[tuple[StubApp, str]]:
    app = StubApp(default=Reply(status=406, body={"error": "invalid device token"}))
    with serve_http(app) as url:
        yield app, url


@pytest.fixture
def config(gateway: tuple[StubApp, str], db_name: str, mongo_uri: str) -> Config:
    return Config(
        mongo=MongoConfig(uri=mongo_uri, database=db_name),
        delivery=DeliveryConfig(gateway_urls=(gateway[1],), timeout=5.0),
    )


@pytest.fixture
async def http() -> AsyncIterator[ProviderClient]:
    """The daemon's own client, as `streamer doctor` uses it."""
    async with make_http_client(DeliveryConfig(timeout=5.0)) as client:
        yield client


def _later(**delta: float) -> dt.datetime:
    return f.utcnow() + dt.timedelta(**delta)


async def seed_healthy(db: AsyncDatabase[Doc]) -> None:
    """A registered Rocket.Chat 6.x with push on, a device, and its own queue disabled."""
    settings = f.default_settings(
        Cloud_Service_Agree_PrivacyTerms=True,
        SMTP_Host="smtp.example.org",
        From_Email="chat@example.org",
    )
    await db["rocketchat_settings"].insert_many(settings)
    await db["rocketchat_statistics"].insert_many(
        [
            {"_id": "s1", "version": "0.70.0", "createdAt": _later(days=-30)},
            {"_id": "s2", "version": "6.10.2", "createdAt": _later(hours=-1)},
        ]
    )
    await db["rocketchat_workspace_credentials"].insert_one(
        {
            "_id": "c1",
            "scope": "",
            "accessToken": WORKSPACE_TOKEN,
            "expirationDate": _later(hours=1),
        }
    )
    await db["_raix_push_app_tokens"].insert_one(f.push_token(f.user("alice")))


async def set_setting(db: AsyncDatabase[Doc], setting_id: str, value: Any) -> None:
    await db["rocketchat_settings"].replace_one(
        {"_id": setting_id}, f.setting(setting_id, value), upsert=True
    )


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {check.name: check for check in checks}


def failed(checks: list[Check]) -> list[Check]:
    return [check for check in checks if check.status is Status.FAIL]


def only_failure(checks: list[Check]) -> Check:
    failures = failed(checks)
    assert len(failures) == 1, failures
    assert failures[0].fix
    return failures[0]


pytestmark = pytest.mark.anyio


async def test_a_healthy_gateway_deployment_passes_every_check(
    db: AsyncDatabase[Doc], config: Config, http: ProviderClient, gateway: tuple[StubApp, str]
) -> None:
    await seed_healthy(db)
    checks = await run_checks(config, db, http)
    assert [c for c in checks if c.status is not Status.PASS] == []
    assert len(checks) == 13
    probe = gateway[0].received(GATEWAY_PATH)
    assert len(probe) == 1
    assert probe[0].headers["authorization"] == f"Bearer {WORKSPACE_TOKEN}"
    assert probe[0].json()["token"] == doctor.PROBE_DEVICE_TOKEN
    assert "6.10.2" in by_name(checks)["Rocket.Chat version"].detail


async def test_a_host_clock_far_from_mongodbs_warns(
    db: AsyncDatabase[Doc], config: Config, http: ProviderClient, gateway: tuple[StubApp, str]
) -> None:
    """The local mongod keeps this machine's true time; the 'host' here is 10 min behind."""
    await seed_healthy(db)
    checks = await run_checks(config, db, http, wall=lambda: time.time() - 600)
    clock = by_name(checks)["Host clock"]
    assert clock.status is Status.WARN
    assert "10 min behind MongoDB's" in clock.detail
    assert "NTP" in clock.fix
    assert failed(checks) == []


async def test_a_database_without_rocket_chat_settings_stops_the_checks(
    db: AsyncDatabase[Doc], config: Config, http: ProviderClient
) -> None:
    """The wrong [mongo] database: every other check would judge built-in defaults."""
    checks = await run_checks(config, db, http)
    assert [c.status for c in checks] == [Status.PASS, Status.FAIL]
    assert "holds no Rocket.Chat settings" in checks[1].detail
    assert "[mongo] database" in checks[1].fix


async def test_the_report_never_shows_the_workspace_token(
    db: AsyncDatabase[Doc], config: Config, gateway: tuple[StubApp, str]
) -> None:
    await seed_healthy(db)
    gateway[0].script(GATEWAY_PATH, Reply(status=401, body={"status": 401}))
    out = io.StringIO()
    assert await anyio.to_thread.run_sync(doctor.main, config, out) == 1
    report = out.getvalue()
    assert "PASS  MongoDB replica set and change streams" in report
    assert "FAIL  Push Gateway reachable and accepting the token" in report
    assert "fix: " in report
    assert WORKSPACE_TOKEN not in report


async def test_an_old_rocketchat_fails(
    db: AsyncDatabase[Doc], config: Config, http: ProviderClient
) -> None:
    await seed_healthy(db)
    await db["rocketchat_statistics"].insert_one(
        {"_id": "s3", "version": "0.74.2", "createdAt": f.utcnow()}
    )
    check = only_failure(await run_checks(config, db, http))
    assert check.name == "Rocket.Chat version"
    assert "0.74.2" in check.detail
    assert "Upgrade" in check.fix


@pytest.mark.parametrize(
    ("setting_id", "value", "named"),
    [
        ("Register_Server", False, "Register_Server"),
        ("Cloud_Workspace_Id", "", "Cloud_Workspace_Id"),
        ("Cloud_Service_Agree_PrivacyTerms", False, "Privacy Terms"),
    ],
)
async def test_an_unregistered_workspace_fails(
    db: AsyncDatabase[Doc],
    config: Config,
    http: ProviderClient,
    setting_id: str,
    value: Any,
    named: str,
) -> None:
    await seed_healthy(db)
    await set_setting(db, setting_id, value)
    check = only_failure(await run_checks(config, db, http))
    assert check.name == "Workspace registered"
    assert named in check.detail
    assert "Registration" in check.fix


async def test_an_expired_workspace_token_fails(
    db: AsyncDatabase[Doc], config: Config, http: ProviderClient
) -> None:
    await seed_healthy(db)
    await db["rocketchat_workspace_credentials"].update_one(
        {"_id": "c1"}, {"$set": {"expirationDate": _later(hours=-2)}}
    )
    check = only_failure(await run_checks(config, db, http))
    assert check.name == "Workspace access token"
    assert "expired 2" in check.detail
    assert "Sync" in check.fix


async def test_the_token_setting_of_older_servers_is_used(
    db: AsyncDatabase[Doc], config: Config, http: ProviderClient, gateway: tuple[StubApp, str]
) -> None:
    await seed_healthy(db)
    await db["rocketchat_workspace_credentials"].delete_many({})
    await set_setting(db, "Cloud_Workspace_Access_Token", "older-token")
    await set_setting(db, "Cloud_Workspace_Access_Token_Expires_At", _later(hours=1))
    checks = await run_checks(config, db, http)
    assert failed(checks) == []
    assert "Cloud_Workspace_Access_Token" in by_name(checks)["Workspace access token"].detail
    assert gateway[0].received()[0].headers["authorization"] == "Bearer older-token"


async def test_a_missing_workspace_token_fails(
    db: AsyncDatabase[Doc], config: Config, http: ProviderClient, gateway: tuple[StubApp, str]
) -> None:
    await seed_healthy(db)
    await db["rocketchat_workspace_credentials"].delete_many({})
    gateway[0].script(GATEWAY_PATH, Reply(status=401, body={"status": 401}))
    names = [c.name for c in failed(await run_checks(config, db, http))]
    assert names == ["Workspace access token", "Push Gateway reachable and accepting the token"]
    assert "authorization" not in gateway[0].received()[0].headers


async def test_a_gateway_that_rejects_the_token_fails(
    db: AsyncDatabase[Doc], config: Config, http: ProviderClient, gateway: tuple[StubApp, str]
) -> None:
    await seed_healthy(db)
    gateway[0].script(GATEWAY_PATH, Reply(status=401, body={"status": 401}))
    check = only_failure(await run_checks(config, db, http))
    assert "rejected the workspace token (401)" in check.detail
    assert "Sync" in check.fix


async def test_an_address_that_is_no_gateway_fails(
    db: AsyncDatabase[Doc], config: Config, http: ProviderClient, gateway: tuple[StubApp, str]
) -> None:
    """A wrong Push_gateway (a web server, not a gateway) answers 404: not "accepted"."""
    await seed_healthy(db)
    gateway[0].script(GATEWAY_PATH, Reply(status=404, body={"error": "not found"}))
    check = only_failure(await run_checks(config, db, http))
    assert "answered 404: no Push Gateway at that address" in check.detail


async def test_the_gateway_switched_off_in_rocketchat_warns_in_gateway_mode(
    db: AsyncDatabase[Doc], config: Config, http: ProviderClient
) -> None:
    await seed_healthy(db)
    await set_setting(db, "Push_enable_gateway", False)
    checks = await run_checks(config, db, http)
    assert failed(checks) == []
    check = by_name(checks)["Push Gateway enabled in Rocket.Chat"]
    assert check.status is Status.WARN
    assert 'mode = "direct"' in check.fix


async def test_an_unreachable_gateway_fails_and_a_working_one_only_warns(
    db: AsyncDatabase[Doc], config: Config, http: ProviderClient, gateway: tuple[StubApp, str]
) -> None:
    await seed_healthy(db)
    dead = f"http://127.0.0.1:{free_port()}"
    alone = dataclasses.replace(config, delivery=DeliveryConfig(gateway_urls=(dead,)))
    check = only_failure(await run_checks(alone, db, http))
    assert f"{dead} unreachable" in check.detail
    assert "firewall" in check.fix
    both = dataclasses.replace(config, delivery=DeliveryConfig(gateway_urls=(dead, gateway[1])))
    check = by_name(await run_checks(both, db, http))[
        "Push Gateway reachable and accepting the token"
    ]
    assert check.status is Status.WARN


@pytest.mark.parametrize(
    ("setting_id", "value"),
    [("Push_enable", False), ("Troubleshoot_Disable_Notifications", True)],
)
async def test_push_switched_off_fails(
    db: AsyncDatabase[Doc], config: Config, http: ProviderClient, setting_id: str, value: bool
) -> None:
    await seed_healthy(db)
    await set_setting(db, setting_id, value)
    check = only_failure(await run_checks(config, db, http))
    assert check.name == "Push enabled"
    assert setting_id in check.detail


async def test_no_device_tokens_fails(
    db: AsyncDatabase[Doc], config: Config, http: ProviderClient
) -> None:
    await seed_healthy(db)
    await db["_raix_push_app_tokens"].update_many({}, {"$set": {"enabled": False}})
    check = only_failure(await run_checks(config, db, http))
    assert check.name == "Device tokens"
    assert "mobile app" in check.fix


async def test_rocketchat_still_queueing_notifications_fails(
    db: AsyncDatabase[Doc], config: Config, http: ProviderClient
) -> None:
    await seed_healthy(db)
    entry = {"_id": "q1", "uid": "u-bob", "rid": "GENERAL", "mid": "m1", "ts": f.utcnow()}
    await db[doctor.NOTIFICATION_QUEUE].insert_one(entry)
    await db[doctor.NOTIFICATION_QUEUE].delete_one({"_id": "q1"})  # sent and removed, as RC does
    check = only_failure(await run_checks(config, db, http))
    assert check.name == "Rocket.Chat's own queue disabled"
    assert "NOTIFICATIONS_SCHEDULE_DELAY_OFFLINE=-1" in check.fix


async def test_email_without_smtp_only_warns(
    db: AsyncDatabase[Doc], config: Config, http: ProviderClient
) -> None:
    await seed_healthy(db)
    await db["rocketchat_settings"].delete_many({"_id": {"$in": ["SMTP_Host", "From_Email"]}})
    checks = await run_checks(config, db, http)
    assert failed(checks) == []
    assert by_name(checks)["Email (SMTP)"].status is Status.WARN


async def test_unreachable_mongodb_fails_alone() -> None:
    config = Config(
        mongo=MongoConfig(uri=f"mongodb://127.0.0.1:{free_port()}/?serverSelectionTimeoutMS=300")
    )
    out = io.StringIO()
    assert await anyio.to_thread.run_sync(doctor.main, config, out) == 1
    assert out.getvalue().startswith("FAIL  MongoDB replica set and change streams")
    assert "fix: Check [mongo] uri" in out.getvalue()


# Direct mode ------------------------------------------------------------------


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> str:
    path.write_bytes(data)
    path.chmod(mode)
    return str(path)


def _p8() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _service_account() -> bytes:
    key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    return (
        b'{"type": "service_account", "project_id": "p", "client_email": "s@p.iam", '
        b'"private_key": ' + repr(key).replace("'", '"').encode() + b"}"
    )


def direct_config(config: Config, tmp_path: Path, p8_mode: int = 0o600) -> Config:
    return dataclasses.replace(
        config,
        delivery=DeliveryConfig(mode="direct"),
        fcm=FcmConfig(
            service_account_file=_write_private(tmp_path / "fcm.json", _service_account())
        ),
        apns=ApnsConfig(
            key_file=_write_private(tmp_path / "AuthKey.p8", _p8(), p8_mode),
            key_id="ABC123",
            team_id="TEAM123",
        ),
    )


async def test_a_healthy_direct_deployment_passes_every_check(
    db: AsyncDatabase[Doc], config: Config, http: ProviderClient, tmp_path: Path
) -> None:
    await seed_healthy(db)
    checks = await run_checks(direct_config(config, tmp_path), db, http)
    assert [c for c in checks if c.status is not Status.PASS] == []
    assert "FCM credentials (Android)" in by_name(checks)


async def test_a_world_readable_apns_key_fails(
    db: AsyncDatabase[Doc], config: Config, http: ProviderClient, tmp_path: Path
) -> None:
    await seed_healthy(db)
    check = only_failure(await run_checks(direct_config(config, tmp_path, 0o644), db, http))
    assert check.name == "APNs credentials (iOS)"
    assert "readable by every user" in check.detail
    assert "chmod 600" in check.fix


async def test_an_unreadable_fcm_key_fails(
    db: AsyncDatabase[Doc], config: Config, http: ProviderClient, tmp_path: Path
) -> None:
    await seed_healthy(db)
    missing = dataclasses.replace(
        direct_config(config, tmp_path), fcm=FcmConfig(service_account_file=str(tmp_path / "no"))
    )
    check = only_failure(await run_checks(missing, db, http))
    assert check.name == "FCM credentials (Android)"
    assert "does not exist" in check.detail


async def test_android_devices_without_fcm_credentials_fail(
    db: AsyncDatabase[Doc], config: Config, http: ProviderClient, tmp_path: Path
) -> None:
    await seed_healthy(db)
    unset = dataclasses.replace(direct_config(config, tmp_path), fcm=FcmConfig())
    check = only_failure(await run_checks(unset, db, http))
    assert "1 registered devices" in check.detail
    assert "service_account_file" in check.fix


# The command ------------------------------------------------------------------


async def test_the_command_exits_1_and_prints_the_fix(
    db: AsyncDatabase[Doc], config: Config, tmp_path: Path
) -> None:
    await seed_healthy(db)
    await set_setting(db, "Push_enable", False)
    config_file = tmp_path / "config.toml"
    config_file.write_text(
        f'[mongo]\nuri = "{config.mongo.uri}"\ndatabase = "{config.mongo.database}"\n'
        f'[delivery]\ngateway_urls = ["{config.delivery.gateway_urls[0]}"]\n'  # type: ignore[index]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMER_")}
    with anyio.fail_after(60):
        done = await anyio.run_process(
            [sys.executable, "-m", "streamer", "doctor", "--config", str(config_file)],
            check=False,
            env={**env, "PYTHONPATH": str(Path(__file__).parent.parent)},
        )
    stdout = done.stdout.decode()
    assert done.returncode == 1, stdout + done.stderr.decode()
    assert "FAIL  Push enabled: setting Push_enable is false" in stdout
    assert "fix: Turn on Administration > Settings > Push > Enable." in stdout
    assert "PASS  Push Gateway reachable and accepting the token" in stdout
