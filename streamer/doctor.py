"""`streamer doctor`: the answer to "Server notifications are misconfigured!".

Each check looks at one thing the push path depends on (SPEC §8) and says, in
plain words, whether it is right and what to do when it is not. Checks are
independent async functions over a shared `Context`, so a new one is a function
and a line in `_CHECKS`; they read what the daemon reads (the same settings,
with config.toml overriding them) so the doctor and the daemon never disagree.
"""

from __future__ import annotations

import datetime as dt
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TextIO

import anyio
import httpx
import orjson
from bson import Timestamp
from pymongo import DESCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from streamer.clock import ServerClock
from streamer.config import Config, ConfigError, override_settings
from streamer.delivery.apns import load_signing_key
from streamer.delivery.errors import is_temporary
from streamer.delivery.fcm import load_service_account
from streamer.delivery.gateway import StoredToken, no_gateway_answers, stored_workspace_token
from streamer.delivery.http import HttpClient, make_http_client
from streamer.directory import DatabaseDirectory
from streamer.model import (
    MESSAGES,
    PUSH_TOKENS,
    SETTINGS,
    STATISTICS,
    WORKSPACE_CREDENTIALS,
    Settings,
)
from streamer.mongo import mongo_client

Doc = dict[str, Any]

#: Rocket.Chat's own notification queue; with the sidecar it must stay empty.
NOTIFICATION_QUEUE = "rocketchat_notification_queue"
#: The oldest Rocket.Chat that the Push Gateway accepts (the documented FAQ).
MIN_ROCKETCHAT_VERSION = (0, 74, 3)
#: How far back "Rocket.Chat is still queueing notifications" is looked for.
QUEUE_WINDOW = 600.0
#: Seconds the host clock may differ from MongoDB's before the doctor warns.
CLOCK_TOLERANCE = 60.0
#: Seconds to wait for MongoDB before declaring it unreachable.
MONGO_TIMEOUT_MS = 5000
#: A device token no phone has: the gateway probe can never notify anyone.
PROBE_DEVICE_TOKEN = "streamer-doctor-probe"
QUEUE_VARIABLES = (
    "NOTIFICATIONS_SCHEDULE_DELAY_ONLINE=-1, NOTIFICATIONS_SCHEDULE_DELAY_AWAY=-1 and "
    "NOTIFICATIONS_SCHEDULE_DELAY_OFFLINE=-1"
)


class Status(enum.Enum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str
    #: What the operator should do; empty when there is nothing to do.
    fix: str = ""


@dataclass(frozen=True, slots=True)
class Context:
    config: Config
    db: AsyncDatabase[Doc]
    #: The daemon's own client: the probe takes the route (proxy or not) pushes take.
    http: HttpClient
    settings: Settings
    workspace_token: StoredToken | None
    now: float
    #: This host's clock, as `now` was read from.
    wall: Callable[[], float]


def _pass(name: str, detail: str) -> Check:
    return Check(name, Status.PASS, detail)


async def run_checks(
    config: Config,
    db: AsyncDatabase[Doc],
    client: HttpClient,
    wall: Callable[[], float] = time.time,
) -> list[Check]:
    """Every check of SPEC §8 for this deployment; MongoDB first, as the rest need it,
    then that the database is Rocket.Chat's, or the rest would judge built-in defaults."""
    mongo = await check_mongo(db)
    if mongo.status is Status.FAIL:
        return [mongo]
    rocketchat = await check_rocketchat_database(db)
    if rocketchat.status is Status.FAIL:
        return [mongo, rocketchat]
    settings = override_settings(await DatabaseDirectory(db).settings(), config)
    ctx = Context(
        config=config,
        db=db,
        http=client,
        settings=settings,
        workspace_token=await stored_workspace_token(db),
        now=wall(),
        wall=wall,
    )
    checks = [mongo, rocketchat]
    for check in _CHECKS[config.delivery.mode]:
        checks.append(await check(ctx))
    return checks


async def check_mongo(db: AsyncDatabase[Doc]) -> Check:
    name = "MongoDB replica set and change streams"
    try:
        hello = await db.client.admin.command("hello")
        if not hello.get("setName"):
            return Check(
                name,
                Status.FAIL,
                "MongoDB is reachable but is not a replica set, so change streams cannot work",
                "Run mongod with --replSet rs0 and initiate it once (rs.initiate()); put "
                "replicaSet=rs0 in [mongo] uri. A single-node replica set is fine.",
            )
        async with await db[MESSAGES].watch():
            pass
        async with await db.watch():  # the daemon's other stream is database-wide
            pass
    except PyMongoError as exc:
        return Check(
            name,
            Status.FAIL,
            f"database {db.name!r}: {exc.__class__.__name__}: {str(exc)[:300]}",
            "Check [mongo] uri (or STREAMER_MONGO__URI): host, port, credentials, TLS; the "
            "user needs read access to the Rocket.Chat database and the changeStream action "
            "on the whole database (the built-in read role has both).",
        )
    return _pass(
        name,
        f"replica set {hello['setName']!r}; change streams on {MESSAGES} and on the "
        "whole database open",
    )


async def check_rocketchat_database(db: AsyncDatabase[Doc]) -> Check:
    name = "Rocket.Chat database"
    if await db[SETTINGS].find_one({}, {"_id": 1}) is None:
        return Check(
            name,
            Status.FAIL,
            f"database {db.name!r} holds no Rocket.Chat settings ({SETTINGS} is empty): "
            "it is not the database Rocket.Chat uses",
            "Set [mongo] database (or STREAMER_MONGO__DATABASE) to Rocket.Chat's database, "
            "the one named in Rocket.Chat's MONGO_URL.",
        )
    return _pass(name, f"database {db.name!r} holds Rocket.Chat's settings")


async def check_rocketchat_version(ctx: Context) -> Check:
    name = "Rocket.Chat version"
    minimum = ".".join(map(str, MIN_ROCKETCHAT_VERSION))
    latest = await ctx.db[STATISTICS].find_one(
        {"version": {"$type": "string"}}, {"version": 1}, sort=[("createdAt", DESCENDING)]
    )
    if latest is None:
        return Check(
            name,
            Status.WARN,
            f"unknown: {STATISTICS} holds no statistics yet",
            "Rocket.Chat records its version in its statistics once a day and at start-up; "
            f"check it is at least {minimum} under Administration > Workspace.",
        )
    version = str(latest["version"])
    if _version_tuple(version) < MIN_ROCKETCHAT_VERSION:
        return Check(
            name,
            Status.FAIL,
            f"{version} is older than {minimum}; the Push Gateway refuses it",
            f"Upgrade Rocket.Chat to {minimum} or later.",
        )
    return _pass(name, f"{version} (≥ {minimum})")


def _version_tuple(version: str) -> tuple[int, ...]:
    """'6.10.2' → (6, 10, 2); '0.74.3-rc.1' → (0, 74, 3); junk parts count as 0."""
    parts = []
    for part in version.split(".")[:3]:
        digits = ""
        for char in part:
            if not char.isdecimal():
                break
            digits += char
        parts.append(int(digits or 0))
    return tuple(parts)


async def check_push_enabled(ctx: Context) -> Check:
    name = "Push enabled"
    if not ctx.settings.push_enable:
        return Check(
            name,
            Status.FAIL,
            "setting Push_enable is false: no push is sent to anyone",
            "Turn on Administration > Settings > Push > Enable.",
        )
    if ctx.settings.troubleshoot_disable_notifications:
        return Check(
            name,
            Status.FAIL,
            "setting Troubleshoot_Disable_Notifications is true: all notifications are off",
            "Turn off Administration > Settings > Troubleshoot > Disable Notifications.",
        )
    return _pass(name, "Push_enable is true and notifications are not disabled for troubleshooting")


async def check_push_tokens(ctx: Context) -> Check:
    name = "Device tokens"
    counts = await _device_counts(ctx.db)
    if not any(counts.values()):
        return Check(
            name,
            Status.FAIL,
            f"no enabled device token in {PUSH_TOKENS}: no phone has registered for push",
            "Log in with the mobile app and allow notifications on the phone; the app "
            "registers its token with Rocket.Chat on login.",
        )
    return _pass(name, f"{counts['apn']} iOS and {counts['gcm']} Android devices registered")


async def _device_counts(db: AsyncDatabase[Doc]) -> dict[str, int]:
    enabled: Doc = {"enabled": {"$ne": False}}
    return {
        kind: await db[PUSH_TOKENS].count_documents(
            {**enabled, f"token.{kind}": {"$type": "string"}}
        )
        for kind in ("apn", "gcm")
    }


async def check_rocketchat_queue_disabled(ctx: Context) -> Check:
    name = "Rocket.Chat's own queue disabled"
    since = ctx.now - QUEUE_WINDOW
    found, source = await _recent_queue_insert(ctx.db, since)
    minutes = int(QUEUE_WINDOW // 60)
    if found:
        return Check(
            name,
            Status.FAIL,
            f"Rocket.Chat queued notifications in the last {minutes} minutes ({source}): "
            "users get every push twice, once from Rocket.Chat and once from streamer",
            f"Restart Rocket.Chat with {QUEUE_VARIABLES} in its environment; it then enqueues "
            "nothing, while its Push settings stay in force and are read by streamer.",
        )
    return _pass(name, f"nothing added to {NOTIFICATION_QUEUE} in the last {minutes} minutes")


async def _recent_queue_insert(db: AsyncDatabase[Doc], since: float) -> tuple[bool, str]:
    """Look in the oplog (sees entries already sent and removed), else in the collection."""
    try:
        oplog = db.client["local"]["oplog.rs"]
        query = {"ts": {"$gte": Timestamp(int(since), 0)}, "ns": f"{db.name}.{NOTIFICATION_QUEUE}"}
        entry = await oplog.find_one({**query, "op": "i"}, {"_id": 1}, max_time_ms=10_000)
        return entry is not None, "seen in the oplog"
    except PyMongoError:
        cutoff = dt.datetime.fromtimestamp(since, dt.UTC)
        doc = await db[NOTIFICATION_QUEUE].find_one({"ts": {"$gte": cutoff}}, {"_id": 1})
        return doc is not None, f"entries in {NOTIFICATION_QUEUE}"


async def check_email(ctx: Context) -> Check:
    name = "Email (SMTP)"
    if not (ctx.config.email.enabled and ctx.settings.allow_email_notifications):
        return _pass(name, "email notifications are off")
    missing = []
    if not (ctx.config.email.host or ctx.settings.smtp_host):
        missing.append("SMTP host ([email] host or setting SMTP_Host)")
    if not (ctx.config.email.from_address or ctx.settings.from_email):
        missing.append("sender address ([email] from_address or setting From_Email)")
    if missing:
        return Check(
            name,
            Status.WARN,
            "email notifications are on but not configured: no " + ", no ".join(missing),
            "Configure Administration > Settings > Email > SMTP, or set the [email] keys; "
            "or set [email] enabled = false.",
        )
    return _pass(name, "an SMTP host and a sender address are configured")


async def check_settings_types(ctx: Context) -> Check:
    name = "Rocket.Chat settings"
    if ctx.settings.problems:
        return Check(
            name,
            Status.WARN,
            "; ".join(ctx.settings.problems),
            "Fix these settings under Administration > Settings; until then their defaults apply.",
        )
    return _pass(name, "every setting streamer reads has a usable value")


# Gateway mode ---------------------------------------------------------------


async def check_registration(ctx: Context) -> Check:
    name = "Workspace registered"
    missing = [
        what
        for what, ok in (
            ("Register_Server is not true", ctx.settings.register_server),
            ("Cloud_Workspace_Id is empty", bool(ctx.settings.cloud_workspace_id)),
            (
                "the Cloud Service Privacy Terms are not accepted",
                ctx.settings.cloud_agree_privacy_terms,
            ),
        )
        if not ok
    ]
    if missing:
        return Check(
            name,
            Status.FAIL,
            "; ".join(missing) + ": the Push Gateway only serves registered workspaces",
            "Register the workspace under Administration > Workspace > Registration and accept "
            "the Cloud Service Privacy Terms; or, for your own white-labelled app, use "
            '[delivery] mode = "direct".',
        )
    return _pass(name, f"workspace {ctx.settings.cloud_workspace_id} is registered")


async def check_gateway_setting(ctx: Context) -> Check:
    name = "Push Gateway enabled in Rocket.Chat"
    if not ctx.settings.push_enable_gateway:
        return Check(
            name,
            Status.WARN,
            "setting Push_enable_gateway is false, but streamer sends through the gateway "
            '([delivery] mode = "gateway"); the gateway only accepts the official apps\' tokens',
            "With the official apps, turn on Administration > Settings > Push > Enable Gateway; "
            'with your own white-labelled app, use [delivery] mode = "direct" and its FCM and '
            "APNs credentials.",
        )
    return _pass(name, "Push_enable_gateway is true")


async def check_workspace_token(ctx: Context) -> Check:
    name = "Workspace access token"
    token = ctx.workspace_token
    renew = (
        "Rocket.Chat renews the token when it syncs with the cloud: run Administration > "
        "Workspace > Registration > Sync (and check the server can reach cloud.rocket.chat)."
    )
    if token is None:
        return Check(
            name,
            Status.FAIL,
            f"no access token in {WORKSPACE_CREDENTIALS} or setting Cloud_Workspace_Access_Token",
            renew,
        )
    if token.expires_at is not None and token.expires_at <= ctx.now:
        ago = _duration(ctx.now - token.expires_at)
        return Check(name, Status.FAIL, f"the token in {token.source} expired {ago} ago", renew)
    expiry = (
        "no expiry date"
        if token.expires_at is None
        else f"expires in {_duration(token.expires_at - ctx.now)}"
    )
    return _pass(name, f"found in {token.source}, {expiry}")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{round(seconds)} s"
    if seconds < 7200:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


async def check_gateways(ctx: Context) -> Check:
    name = "Push Gateway reachable and accepting the token"
    results = [await _probe_gateway(ctx, url) for url in ctx.settings.push_gateways]
    working = [detail for ok, detail in results if ok]
    detail = "; ".join(detail for _, detail in results)
    if len(working) == len(results):
        return _pass(name, detail)
    fix = (
        "A 401/403 means the workspace token is not accepted: sync the registration "
        "(Administration > Workspace > Registration > Sync). Unreachable: allow outbound "
        "HTTPS to the gateway (firewall, proxy) and check Push_gateway / [delivery] gateway_urls."
    )
    return Check(name, Status.WARN if working else Status.FAIL, detail, fix)


async def _probe_gateway(ctx: Context, url: str) -> tuple[bool, str]:
    """POST a push for a device token no phone has: the gateway checks the token first
    (401 without a valid one), then refuses the device; nobody is notified."""
    token = ctx.workspace_token
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token.access_token}"
    body = {
        "token": PROBE_DEVICE_TOKEN,
        "options": {
            "createdAt": dt.datetime.fromtimestamp(ctx.now, dt.UTC).isoformat(),
            "createdBy": "<SERVER>",
            "sent": False,
            "sending": 0,
            "from": "push",
            "title": "streamer doctor",
            "text": "connectivity probe",
            "userId": "streamer-doctor",
            "uniqueId": ctx.settings.unique_id,
        },
    }
    try:
        probe = orjson.dumps(body)
        response = await ctx.http.post(f"{url}/push/gcm/send", content=probe, headers=headers)
    except httpx.HTTPError as exc:
        return False, f"{url} unreachable ({exc.__class__.__name__}: {exc})"
    status = response.status_code
    if status in (401, 403):
        return False, f"{url} rejected the workspace token ({status})"
    if no_gateway_answers(status):
        return False, f"{url} answered {status}: no Push Gateway at that address"
    if is_temporary(status):
        return False, f"{url} answered {status}; it is failing or rate-limiting"
    return True, f"{url} accepted the workspace token (answered {status} to a probe)"


# Direct mode ----------------------------------------------------------------


async def check_fcm(ctx: Context) -> Check:
    name = "FCM credentials (Android)"
    path = ctx.config.fcm.service_account_file
    if not path:
        return await _not_configured(ctx, name, "gcm", "[fcm] service_account_file")
    try:
        account = load_service_account(path)
    except ConfigError as exc:
        problem = str(exc)
    else:
        project = ctx.config.fcm.project_id or account.project_id
        problem = "" if project else f"{path} has no project_id and [fcm] project_id is not set"
    if problem:
        return Check(
            name,
            Status.FAIL,
            problem,
            "Download a service-account JSON key (Firebase console > Project settings > "
            "Service accounts), store it readable by streamer only (chmod 600) and point "
            "[fcm] service_account_file at it.",
        )
    return _pass(name, f"{path} is a readable, private service-account key")


async def check_apns(ctx: Context) -> Check:
    name = "APNs credentials (iOS)"
    apns = ctx.config.apns
    if not apns.key_file:
        return await _not_configured(ctx, name, "apn", "[apns] key_file")
    problems = [
        f"[apns] {key} is not set" for key in ("key_id", "team_id") if not getattr(apns, key)
    ]
    try:
        load_signing_key(apns.key_file)
    except ConfigError as exc:
        problems.insert(0, str(exc))
    if problems:
        return Check(
            name,
            Status.FAIL,
            "; ".join(problems),
            "Create an APNs auth key (.p8) in the Apple developer account, store it readable "
            "by streamer only (chmod 600), and set [apns] key_file, key_id and team_id.",
        )
    return _pass(name, f"{apns.key_file} is a readable, private .p8 key")


async def _not_configured(ctx: Context, name: str, kind: str, key: str) -> Check:
    devices = (await _device_counts(ctx.db))[kind]
    consequence = (
        f"{devices} registered devices of this kind get no push"
        if devices
        else "no device of this kind is registered yet"
    )
    return Check(
        name,
        Status.FAIL if devices else Status.WARN,
        f"{key} is not set: {consequence}",
        f"Set {key} (direct mode sends straight to the provider), or use "
        '[delivery] mode = "gateway" with the official apps.',
    )


async def check_host_clock(ctx: Context) -> Check:
    name = "Host clock"
    clock = ServerClock(ctx.db.client, wall=ctx.wall)
    try:
        await clock.read()
    except PyMongoError as exc:
        return Check(name, Status.WARN, f"MongoDB's time could not be read: {exc}")
    skew = clock.skew
    if skew is None:
        return Check(name, Status.WARN, "MongoDB's hello answer carries no localTime")
    if abs(skew) <= CLOCK_TOLERANCE:
        return _pass(name, f"within {CLOCK_TOLERANCE:.0f} s of MongoDB's")
    return Check(
        name,
        Status.WARN,
        f"this host's clock is {_duration(abs(skew))} {'ahead of' if skew > 0 else 'behind'} "
        "MongoDB's: the queue keeps MongoDB's time, but APNs and FCM tokens, the workspace "
        "token's expiry and mail dates go by this host's (APNs and FCM refuse tokens dated "
        "far off)",
        "Run NTP (chrony, systemd-timesyncd) on this host and on MongoDB's.",
    )


CheckFunction = Callable[[Context], Awaitable[Check]]
_COMMON: list[CheckFunction] = [
    check_rocketchat_version,
    check_push_enabled,
    check_push_tokens,
    check_rocketchat_queue_disabled,
    check_settings_types,
    check_email,
    check_host_clock,
]
_CHECKS: dict[str, list[CheckFunction]] = {
    "gateway": [
        *_COMMON[:2],
        check_gateway_setting,
        check_registration,
        check_workspace_token,
        check_gateways,
        *_COMMON[2:],
    ],
    "direct": [*_COMMON[:2], check_fcm, check_apns, *_COMMON[2:]],
}


# Entry point ----------------------------------------------------------------


def main(config: Config, out: TextIO) -> int:
    """Run every check, print one line each (with the fix), and return 1 if any failed."""
    checks = anyio.run(_run, config)
    write_report(checks, out)
    return 1 if any(check.status is Status.FAIL for check in checks) else 0


async def _run(config: Config) -> list[Check]:
    mongo = mongo_client(config.mongo.uri, server_selection_ms=MONGO_TIMEOUT_MS)
    try:
        async with make_http_client(config.delivery) as http:
            return await run_checks(config, mongo[config.mongo.database], http)
    finally:
        await mongo.close()


def write_report(checks: list[Check], out: TextIO) -> None:
    for check in checks:
        out.write(f"{check.status.value}  {check.name}: {check.detail}\n")
        if check.fix and check.status is not Status.PASS:
            out.write(f"      fix: {check.fix}\n")
    failed = sum(check.status is Status.FAIL for check in checks)
    warned = sum(check.status is Status.WARN for check in checks)
    verdict = "all checks passed" if not failed else f"{failed} check(s) failed"
    out.write(f"\nstreamer doctor: {verdict}, {warned} warning(s).\n")
