"""Security: an authenticated TLS MongoDB, and secrets that never leave the process.

The daemon reaches a `mongod` started with `--auth`, a keyFile and `requireTLS`
exactly as an operator configures it: credentials and `tlsCAFile` in the URI.
Every secret (MongoDB password, SMTP password) is looked for, by value, in what
an operator sees: `streamer config`, log lines, exceptions, configuration errors.
"""

from __future__ import annotations

import dataclasses
import secrets
import ssl
import subprocess
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Mapping
from pathlib import Path
from urllib.parse import parse_qs, quote

import anyio
import httpx
import orjson
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure, ServerSelectionTimeoutError
from structlog.testing import capture_logs

from streamer.config import (
    REDACTED,
    ApnsConfig,
    Config,
    ConfigError,
    DeliveryConfig,
    EmailConfig,
    FcmConfig,
    load_config,
)
from streamer.delivery.apns import ApnsPushkin
from streamer.delivery.base import Device
from streamer.delivery.direct import FAILED_MINT_HOLD
from streamer.delivery.email import EmailContent, Mailer, SmtpServer
from streamer.delivery.errors import Outcome
from streamer.delivery.fcm import FcmPushkin
from streamer.delivery.gateway import GatewayPushkin, WorkspaceToken
from streamer.delivery.http import make_http_client
from streamer.devmongo import free_port
from streamer.directory import DatabaseDirectory
from streamer.model import SETTINGS, WORKSPACE_CREDENTIALS, Settings
from tests import factories, securemongo
from tests.credentials import ManualClock, write_apns_key, write_service_account
from tests.securemongo import SecureMongo
from tests.servers import Reply, StubApp, serve_http, serve_http2

REPO = Path(__file__).resolve().parent.parent
Doc = dict[str, object]


@pytest.fixture(scope="module")
def secure() -> Iterator[SecureMongo]:
    with securemongo.running() as server:
        yield server


def secure_config(secure: SecureMongo) -> Config:
    return load_config(
        None,
        env={"STREAMER_MONGO__URI": secure.uri(), "STREAMER_MONGO__DATABASE": secure.database},
    )


@pytest.fixture
async def client(secure: SecureMongo) -> AsyncIterator[AsyncMongoClient[Doc]]:
    """Connected exactly as the daemon connects: from the loaded config's URI."""
    connected: AsyncMongoClient[Doc] = AsyncMongoClient(secure_config(secure).mongo.uri)
    try:
        yield connected
    finally:
        await connected.close()


def run_streamer(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamer", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **env},
        timeout=90,
        check=False,
    )


def mongo_uri_with(password: str) -> str:
    return f"mongodb://rc:{quote(password, safe='')}@db.example:27017/?replicaSet=rs0"


# --- the authenticated TLS connection ---------------------------------------------------


@pytest.mark.anyio
async def test_directory_reads_settings_over_auth_and_tls(
    secure: SecureMongo, client: AsyncMongoClient[Doc]
) -> None:
    db = client[secure_config(secure).mongo.database]
    await db[SETTINGS].replace_one(
        {"_id": "Push_enable"}, factories.setting("Push_enable", False), upsert=True
    )
    settings = await DatabaseDirectory(db).settings()
    assert settings.push_enable is False


@pytest.mark.anyio
async def test_change_stream_sees_an_insert_over_auth_and_tls(
    secure: SecureMongo, client: AsyncMongoClient[Doc]
) -> None:
    collection = client[secure.database]["probe"]
    async with await collection.watch([{"$match": {"operationType": "insert"}}]) as stream:
        await collection.insert_one({"_id": "secured", "value": 1})
        change = await stream.next()
    assert change["fullDocument"] == {"_id": "secured", "value": 1}


@pytest.mark.anyio
async def test_wrong_password_is_an_authentication_error(secure: SecureMongo) -> None:
    wrong = "wrong-" + secrets.token_hex(8)
    client: AsyncMongoClient[Doc] = AsyncMongoClient(secure.uri(password=wrong))
    try:
        with pytest.raises(OperationFailure) as failure:
            await client.admin.command("ping")
    finally:
        await client.close()
    assert failure.value.code == 18  # AuthenticationFailed
    assert wrong not in str(failure.value)


@pytest.mark.anyio
async def test_certificate_from_another_ca_is_refused(secure: SecureMongo) -> None:
    uri = secure.uri(ca_file=secure.wrong_ca_file, serverSelectionTimeoutMS="2000")
    client: AsyncMongoClient[Doc] = AsyncMongoClient(uri)
    try:
        with pytest.raises(ServerSelectionTimeoutError, match="CERTIFICATE_VERIFY_FAILED") as err:
            await client.admin.command("ping")
    finally:
        await client.close()
    assert secure.password not in str(err.value)


# --- `streamer run` against a MongoDB that refuses it -------------------------------------


def assert_one_clear_error(result: subprocess.CompletedProcess[str], secret: str) -> None:
    """Exit 1, only JSON log lines, one `mongo_unreachable` error, the secret nowhere."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert secret not in output
    assert "Traceback" not in output
    lines = [orjson.loads(line) for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line["level"] == "error"]
    assert [line["event"] for line in errors] == ["mongo_unreachable"]
    assert f":{REDACTED}@" in errors[0]["uri"]


def test_run_with_wrong_password_exits_with_one_clear_line(secure: SecureMongo) -> None:
    wrong = "wrong-" + secrets.token_hex(8)
    result = run_streamer("run", env={"STREAMER_MONGO__URI": secure.uri(password=wrong)})
    assert_one_clear_error(result, wrong)
    assert "Authentication failed" in result.stdout


def test_run_with_wrong_ca_exits_with_one_clear_line(secure: SecureMongo) -> None:
    uri = secure.uri(ca_file=secure.wrong_ca_file, serverSelectionTimeoutMS="2000")
    result = run_streamer("run", env={"STREAMER_MONGO__URI": uri})
    assert_one_clear_error(result, secure.password)
    assert "CERTIFICATE_VERIFY_FAILED" in result.stdout


# --- secrets in `streamer config`, logs and configuration errors --------------------------

MONGO_PASSWORD = "p@ss/w0rd-mongo-" + secrets.token_hex(6)
SMTP_PASSWORD = "smtp-" + secrets.token_hex(6)
SECRETS = (MONGO_PASSWORD, quote(MONGO_PASSWORD, safe=""), SMTP_PASSWORD)


def assert_absent(secret_values: Iterable[str], output: str) -> None:
    leaked = [value for value in secret_values if value in output]
    assert not leaked


def assert_no_secret(output: str) -> None:
    assert_absent(SECRETS, output)


def test_config_command_redacts_secrets_from_the_environment() -> None:
    env = {
        "STREAMER_MONGO__URI": mongo_uri_with(MONGO_PASSWORD),
        "STREAMER_EMAIL__PASSWORD": SMTP_PASSWORD,
    }
    result = run_streamer("config", env=env)
    assert result.returncode == 0, result.stderr
    assert_no_secret(result.stdout + result.stderr)
    assert f'password = "{REDACTED}"' in result.stdout
    assert f"rc:{REDACTED}@db.example" in result.stdout


def test_config_command_redacts_secrets_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[mongo]\nuri = "{mongo_uri_with(MONGO_PASSWORD)}"\n'
        f'[email]\npassword = "{SMTP_PASSWORD}"\n'
    )
    result = run_streamer("config", "--config", str(path), env={})
    assert result.returncode == 0, result.stderr
    assert_no_secret(result.stdout + result.stderr)
    assert result.stdout.count(REDACTED) == 2


UNESCAPED_SLASH_URI = "mongodb://app:S3cr/etPw-{tail}@db1:27017/?replicaSet=rs0"


@pytest.mark.parametrize("command", ["config", "run", "doctor"])
def test_a_password_with_an_unescaped_slash_is_hidden_and_is_a_config_error(
    command: str,
) -> None:
    """pymongo refuses such a URI ("Bad database name"); until the operator escapes
    the password, no command may show it, and `run` must not crash-loop on it."""
    tail = secrets.token_hex(4)
    uri = UNESCAPED_SLASH_URI.format(tail=tail)
    result = run_streamer(command, env={"STREAMER_MONGO__URI": uri})
    assert_absent([f"S3cr/etPw-{tail}", f"etPw-{tail}"], result.stdout + result.stderr)
    if command == "run":
        assert result.returncode == 2, result.stdout + result.stderr
        (line,) = [orjson.loads(text) for text in result.stdout.splitlines()]
        assert line["event"] == "configuration_error" and "escape" in line["error"]
    elif command == "doctor":
        assert result.returncode == 2 and "configuration error" in result.stderr


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("mongodb://app:{secret}@db1:99999/?replicaSet=rs0", "Port must be"),
        ("mongodb://app:{secret}@/?replicaSet=rs0", "Empty host"),
        ("mongodb://app:{secret}@db1/?tls=true&tlsCAFile=/nonexistent/ca.pem", "tlscafile"),
    ],
)
@pytest.mark.parametrize("command", ["run", "doctor"])
def test_every_uri_pymongo_refuses_is_a_config_error(command: str, uri: str, says: str) -> None:
    """Not only the unescaped password: any URI pymongo cannot build a client from
    would otherwise crash `run` with exit 1, which systemd restarts for ever."""
    secret = "pw-" + secrets.token_hex(4)
    result = run_streamer(command, env={"STREAMER_MONGO__URI": uri.format(secret=secret)})
    output = result.stdout + result.stderr
    assert_absent([secret], output)
    assert result.returncode == 2 and says in output, output


LOG_SECRETS = """
import structlog
from urllib.parse import unquote, urlsplit
from streamer.config import load_config, secret_values
from streamer.observability import configure_logging

config = load_config()
configure_logging(config.log, secret_values(config))
log = structlog.get_logger("probe")
sent = unquote(urlsplit(config.mongo.uri).password)
log.info("connecting", uri=config.mongo.uri, note=f"smtp {config.email.password}, mongo {sent}")
try:
    raise RuntimeError(f"login to {config.mongo.uri} as {sent} failed")
except RuntimeError:
    log.exception("login_failed")
"""


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_log_lines_and_tracebacks_are_scrubbed(log_format: str) -> None:
    env = {
        "STREAMER_MONGO__URI": mongo_uri_with(MONGO_PASSWORD),
        "STREAMER_EMAIL__PASSWORD": SMTP_PASSWORD,
        "STREAMER_LOG__FORMAT": log_format,
    }
    result = subprocess.run(
        [sys.executable, "-c", LOG_SECRETS],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **env},
        timeout=60,
        check=True,
    )
    assert "connecting" in result.stdout and "RuntimeError" in result.stdout
    assert_no_secret(result.stdout + result.stderr)
    assert result.stdout.count(REDACTED) >= 4


LIBRARY_LOGS = """
import datetime, logging, warnings
import structlog
from streamer.config import load_config, secret_values
from streamer.observability import configure_logging

config = load_config()
configure_logging(config.log, secret_values(config))
secret = config.email.password
try:
    raise ValueError(f"bad request carrying {secret}")
except ValueError:
    logging.getLogger("aiohttp.server").exception("Error handling request")
logging.getLogger("httpx").info("HTTP Request: POST https://api.push.apple.com/3/device/x")
warnings.warn(f"an option was ignored: {secret}", UserWarning)
when = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
structlog.get_logger("probe").warning("quoted", error=f"failed with {secret}", at=when)
"""


def test_library_logs_and_warnings_are_json_lines_and_scrubbed() -> None:
    """aiohttp's server, pymongo's background tasks and Python warnings log through the
    standard library: they must come out as JSON too, scrubbed, not as stderr text;
    and library chatter below WARNING (httpx logs request URLs, device tokens in
    APNs paths) stays out."""
    quoted = 'pa"ss\\word-' + secrets.token_hex(4)
    result = subprocess.run(
        [sys.executable, "-c", LIBRARY_LOGS],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "STREAMER_EMAIL__PASSWORD": quoted},
        timeout=60,
        check=True,
    )
    assert result.stderr == ""
    lines = [orjson.loads(line) for line in result.stdout.splitlines()]
    library, warning, ours = lines
    assert (library["event"], library["logger"]) == ("Error handling request", "aiohttp.server")
    assert "ValueError" in library["exception"] and library["level"] == "error"
    assert warning["logger"] == "py.warnings" and "UserWarning" in warning["event"]
    assert ours["event"] == "quoted" and ours["error"] == f"failed with {REDACTED}"
    assert ours["at"] == "2026-01-01T00:00:00+00:00"  # as orjson writes it without secrets
    assert_absent([quoted, quoted.replace("\\", "\\\\")], result.stdout)


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        (f'[email]\npassword = ["{SMTP_PASSWORD}"]\n', r"\[email\] password"),
        (f"[email]\npassword = {{ value = '{SMTP_PASSWORD}' }}\n", r"\[email\] password"),
        (f'[mongo]\nuri = ["{mongo_uri_with(MONGO_PASSWORD)}"]\n', r"\[mongo\] uri"),
    ],
    ids=["password-as-list", "password-as-table", "uri-as-list"],
)
def test_wrong_type_for_a_secret_does_not_echo_it(tmp_path: Path, toml: str, key: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=rf"{key}: expected str, got \*\*\* \(a ") as error:
        load_config(path, env={})
    assert_no_secret(str(error.value))


def test_bad_key_next_to_secrets_does_not_echo_them(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'[email]\npassword = "{SMTP_PASSWORD}"\nport = "submission"\n')
    env = {"STREAMER_MONGO__URI": mongo_uri_with(MONGO_PASSWORD)}
    result = run_streamer("run", "--config", str(path), env=env)
    assert result.returncode == 2
    assert "port: expected int, got 'submission'" in result.stderr
    assert_no_secret(result.stdout + result.stderr)


@pytest.mark.parametrize("password", ["true", "1e5", "0x1F", "2024-01-01", '"quoted"', "[1]"])
def test_password_from_the_environment_is_taken_as_typed(password: str) -> None:
    """An env value is parsed as TOML for typed keys, never for text: a password stays itself."""
    config = load_config(None, env={"STREAMER_EMAIL__PASSWORD": password})
    assert config.email.password == password


# --- exposure -----------------------------------------------------------------------------


def test_http_endpoint_binds_to_loopback_by_default() -> None:
    host, _, _ = load_config(None, env={}).http.listen.rpartition(":")
    assert host == "127.0.0.1"


# --- secrets read from Rocket.Chat's database ---------------------------------------------
# The workspace token and SMTP_Password come from MongoDB, not the config, so the log
# scrubber does not know them: only the code paths themselves keep them out.

WORKSPACE_TOKEN = "workspace-" + secrets.token_hex(8)
SMTP_SECRET = "smtp-setting-" + secrets.token_hex(8)
DEVICE = Device(token_id="t-android", kind="gcm", token="gcm-token-1", app_name="chat.rocket")
PUSH = factories.push_content()


async def attempt(delivery: Awaitable[object]) -> str:
    """The outcome, or the whole traceback an operator would see if it escaped."""
    try:
        return repr(await delivery)
    except Exception as exc:
        return "".join(traceback.format_exception(exc))


def test_secret_settings_stay_out_of_repr_and_problems() -> None:
    settings = Settings.from_values(
        {"SMTP_Password": SMTP_SECRET, "Cloud_Workspace_Access_Token": WORKSPACE_TOKEN}
    )
    assert settings.smtp_password == SMTP_SECRET
    assert SMTP_SECRET not in repr(settings) and WORKSPACE_TOKEN not in repr(settings)
    wrong_type = Settings.from_values({"SMTP_Password": [SMTP_SECRET]})
    assert wrong_type.problems == ("setting SMTP_Password=*** has the wrong type; default used",)


@pytest.mark.anyio
async def test_workspace_token_never_in_gateway_logs_or_errors(db: AsyncDatabase[Doc]) -> None:
    await db[SETTINGS].insert_one(factories.setting("Cloud_Workspace_Access_Token", "old"))
    await db[WORKSPACE_CREDENTIALS].insert_one(
        {"_id": "c", "scope": "", "accessToken": WORKSPACE_TOKEN, "expirationDate": None}
    )
    gateway = StubApp()
    gateway.script(
        "/push/gcm/send",
        *[Reply(401), Reply(401), Reply(500, b"oops"), Reply(429, headers={"retry-after": "5"})],
        *[Reply(422, {"error": "bad payload"}), Reply(406), Reply(delay=1.0)],
    )
    with serve_http(gateway) as url, capture_logs() as logs:
        async with make_http_client(DeliveryConfig(timeout=0.5)) as http:
            urls = [f"http://127.0.0.1:{free_port()}", url]  # the first one refuses connections
            pushkin = GatewayPushkin(http, lambda: urls, WorkspaceToken(db))
            seen = [await attempt(pushkin.dispatch(PUSH, DEVICE)) for _ in range(6)]
    assert "CredentialsError" in seen[0] and "TemporaryDeliveryError" in seen[-1]
    assert gateway.received()[0].headers["authorization"] == f"Bearer {WORKSPACE_TOKEN}"
    assert WORKSPACE_TOKEN not in repr(logs) + "".join(seen)


@pytest.mark.anyio
async def test_smtp_password_never_in_logs_or_errors_when_the_login_is_refused() -> None:
    def refuse(*_: object) -> AuthResult:
        return AuthResult(success=False, handled=False)  # let aiosmtpd answer 535

    port = free_port()
    controller = Controller(
        Sink(), hostname="127.0.0.1", port=port, authenticator=refuse, auth_require_tls=False
    )
    settings = Settings.from_values(
        {
            "SMTP_Host": "127.0.0.1",
            "SMTP_Port": port,
            "SMTP_Username": "rocket",
            "SMTP_Password": SMTP_SECRET,
            "From_Email": "rocket@example.org",
        }
    )
    server = SmtpServer.resolve(EmailConfig(), settings)
    assert server is not None
    mail = EmailContent(
        uid="u-bob",
        mid="m1",
        to="bob@example.org",
        room_name="general",
        direct=False,
        sender_name="alice",
        text="hello",
        site_name="Chat",
        site_url="https://chat.example.org",
        room_url="https://chat.example.org/channel/general",
    )
    controller.start()
    try:
        with capture_logs() as logs:
            seen = await attempt(Mailer(server).send(mail))
    finally:
        controller.stop()
    assert "CredentialsError" in seen
    assert SMTP_SECRET not in repr(logs) + seen + repr(server)


class Sink:
    """An SMTP handler that accepts whatever it is given; the login is what is tested."""

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        return "250 OK"


# --- provider keys and the bearer tokens minted from them ---------------------------------


def key_lines(pem: str) -> list[str]:
    """The base64 body of a PEM private key, line by line: any one of them is a leak."""
    return [line for line in pem.splitlines() if line and not line.startswith("-----")]


@pytest.mark.anyio
async def test_fcm_key_and_tokens_never_in_logs_or_errors(tmp_path: Path) -> None:
    access = "fcm-access-" + secrets.token_hex(8)
    oauth = StubApp(default=Reply(body={"access_token": access, "expires_in": 3600}))
    oauth.script("/token", Reply(400, {"error": "invalid_grant"}))
    fcm = StubApp()
    fcm.script(
        "/v1/projects/demo-project/messages:send",
        *[Reply(401), Reply(401), Reply(500, b"oops"), Reply(429, headers={"retry-after": "5"})],
        Reply(400, {"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "bad"}}),
    )
    with serve_http(oauth) as oauth_url, serve_http(fcm) as fcm_url, capture_logs() as logs:
        path, _ = write_service_account(tmp_path, token_uri=f"{oauth_url}/token")
        config = FcmConfig(service_account_file=str(path), base_url=fcm_url)
        async with make_http_client(DeliveryConfig()) as http:
            clock = ManualClock()
            pushkin = FcmPushkin(config, client=http, clock=clock)
            seen = [await attempt(pushkin.dispatch(PUSH, DEVICE))]
            clock.advance(FAILED_MINT_HOLD)  # the refused mint is tried again from then on
            seen += [await attempt(pushkin.dispatch(PUSH, DEVICE)) for _ in range(5)]
            await pushkin.aclose()
    assert "CredentialsError" in seen[0] and seen[-1] == repr(Outcome.SENT)
    assertions = [parse_qs(r.body.decode())["assertion"][0] for r in oauth.received("/token")]
    private_key = orjson.loads(path.read_bytes())["private_key"]
    assert_absent([access, *assertions, *key_lines(private_key)], repr(logs) + "".join(seen))


@pytest.mark.anyio
async def test_apns_key_and_provider_tokens_never_in_logs_or_errors(tmp_path: Path) -> None:
    device = Device(token_id="t-ios", kind="apn", token="a1b2c3d4", app_name="chat.rocket.ios")
    apple = StubApp()
    invalid = Reply(403, {"reason": "InvalidProviderToken"})
    apple.script(
        "/3/device/a1b2c3d4",
        *[invalid, invalid, Reply(500, {"reason": "InternalServerError"})],
        *[Reply(429, {"reason": "TooManyRequests"}), Reply(400, {"reason": "BadDeviceToken"})],
    )
    path, _ = write_apns_key(tmp_path, "ABC123DEFG")
    config = ApnsConfig(key_file=str(path), key_id="ABC123DEFG", team_id="TEAM123456")
    with serve_http2(apple) as (url, ca), capture_logs() as logs:
        verify = ssl.create_default_context(cafile=ca)
        async with httpx.AsyncClient(http2=True, verify=verify) as http:
            config = dataclasses.replace(config, base_url=url)
            pushkin = ApnsPushkin(config, production=True, client=http)
            seen = [await attempt(pushkin.dispatch(PUSH, device)) for _ in range(5)]
            await pushkin.aclose()
    assert "CredentialsError" in seen[0] and seen[-1] == repr(Outcome.SENT)
    provider_tokens = [r.headers["authorization"].split()[1] for r in apple.received()]
    assert_absent([*provider_tokens, *key_lines(path.read_text())], repr(logs) + "".join(seen))


# --- `streamer doctor` over the secured connection ----------------------------------------


@pytest.mark.anyio
async def test_doctor_checks_the_secured_mongo_without_showing_secrets(
    secure: SecureMongo, client: AsyncMongoClient[Doc]
) -> None:
    token = "workspace-" + secrets.token_hex(8)
    await client[secure.database][WORKSPACE_CREDENTIALS].replace_one(
        {"_id": "doctor"}, {"scope": "", "accessToken": token, "expirationDate": None}, upsert=True
    )
    gateway = StubApp(default=Reply(401, b"unauthorized"))
    with serve_http(gateway) as url:
        env = {
            "STREAMER_MONGO__URI": secure.uri(serverSelectionTimeoutMS="2000"),
            "STREAMER_MONGO__DATABASE": secure.database,
            "STREAMER_DELIVERY__GATEWAY_URLS": url,
            "STREAMER_EMAIL__PASSWORD": SMTP_PASSWORD,
        }
        result = await anyio.to_thread.run_sync(lambda: run_streamer("doctor", env=env))
    output = result.stdout + result.stderr
    assert "PASS  MongoDB replica set" in output
    assert gateway.received()[0].headers["authorization"] == f"Bearer {token}"
    assert_absent([secure.password, quote(secure.password, safe=""), token, SMTP_PASSWORD], output)


def test_doctor_names_a_refused_login_without_the_password(secure: SecureMongo) -> None:
    wrong = "wrong-" + secrets.token_hex(8)
    env = {
        "STREAMER_MONGO__URI": secure.uri(password=wrong, serverSelectionTimeoutMS="2000"),
        "STREAMER_MONGO__DATABASE": secure.database,
        "STREAMER_DELIVERY__GATEWAY_URLS": f"http://127.0.0.1:{free_port()}",
    }
    result = run_streamer("doctor", env=env)
    assert result.returncode == 1
    assert "FAIL  MongoDB replica set" in result.stdout
    assert "Authentication failed" in result.stdout
    assert wrong not in result.stdout + result.stderr
