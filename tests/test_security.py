"""Security: an authenticated TLS MongoDB, and secrets that never leave the process.

The daemon reaches a `mongod` started with `--auth`, a keyFile and `requireTLS`
exactly as an operator configures it: credentials and `tlsCAFile` in the URI.
Every secret (MongoDB password, SMTP password) is looked for, by value, in what
an operator sees: `streamer config`, log lines, exceptions, configuration errors.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from urllib.parse import quote

import orjson
import pytest
from pymongo import AsyncMongoClient
from pymongo.errors import OperationFailure, ServerSelectionTimeoutError

from streamer.config import REDACTED, Config, ConfigError, load_config
from streamer.directory import DatabaseDirectory
from streamer.model import SETTINGS
from tests import factories, securemongo
from tests.securemongo import SecureMongo

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


def assert_no_secret(output: str) -> None:
    for secret in SECRETS:
        assert secret not in output


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
