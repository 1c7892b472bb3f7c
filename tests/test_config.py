"""config.toml loading: defaults, file, env overrides, errors that name the key, redaction."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from streamer.config import (
    Config,
    ConfigError,
    load_config,
    override_settings,
    redacted,
    secret_values,
    to_toml,
)
from streamer.model import Settings

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_need_no_file() -> None:
    config = load_config(None, env={})
    assert config == Config()
    assert config.queue.delay_online == 120.0
    assert config.mongo.database == "rocketchat"
    assert config.http.listen == "127.0.0.1:9464"


def test_example_config_matches_the_defaults() -> None:
    assert load_config(REPO / "config.toml", env={}) == Config()


def test_file_values_override_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, '[queue]\ndelay_online = 30\nclear_on_read = "room"\n')
    config = load_config(path, env={})
    assert config.queue.delay_online == 30.0
    assert isinstance(config.queue.delay_online, float)
    assert config.queue.clear_on_read == "room"


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, '[mongo]\ndatabase = "rc"\n')
    assert load_config(None, env={"STREAMER_CONFIG": str(path)}).mongo.database == "rc"


def test_env_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[mongo]\nuri = "mongodb://file/"\n')
    env = {
        "STREAMER_MONGO__URI": "mongodb://env:27017/?replicaSet=rs0",
        "STREAMER_QUEUE__DELAY_AWAY": "15",
        "STREAMER_RULES__BUSY_BLOCKS_PUSH": "false",
        "STREAMER_RULES__MAX_ROOM_MEMBERS": "500",
        "STREAMER_DELIVERY__GATEWAY_URLS": "http://a,http://b",
        "STREAMER_EMAIL__USERNAME": "12345",
    }
    config = load_config(path, env=env)
    assert config.mongo.uri == "mongodb://env:27017/?replicaSet=rs0"
    assert config.queue.delay_away == 15.0
    assert config.rules.busy_blocks_push is False
    assert config.rules.max_room_members == 500
    assert config.delivery.gateway_urls == ("http://a", "http://b")
    assert config.email.username == "12345"


def test_env_list_in_toml_syntax() -> None:
    env = {"STREAMER_DELIVERY__GATEWAY_URLS": '["http://a", "http://b"]'}
    assert load_config(None, env=env).delivery.gateway_urls == ("http://a", "http://b")


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[queue]\ndelay_onlin = 5\n")
    with pytest.raises(ConfigError, match=r"config\.toml.*'delay_onlin'.*\[queue\]"):
        load_config(path, env={})


def test_unknown_section_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown section \[gatewy\]"):
        load_config(write(tmp_path, "[gatewy]\nx = 1\n"), env={})


def test_unknown_env_key_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="STREAMER_QUEUE__NOPE"):
        load_config(None, env={"STREAMER_QUEUE__NOPE": "1"})


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[queue]\ndelay_online = "soon"\n', r"\[queue\] delay_online: expected float, got 'soon'"),
        ("[rules]\nbusy_blocks_push = 1\n", r"busy_blocks_push: expected bool, got 1"),
        ("[delivery]\nconcurrency = true\n", r"concurrency: expected int, got True"),
        ('[queue]\nclear_on_read = "all"\n', r"expected 'user' or 'room', got 'all'"),
        ("[delivery]\ngateway_urls = [1]\n", r"expected a list of strings"),
        ("[queue]\ndelay_online = nan\n", r"delay_online: expected a finite number, got nan"),
        ("[email]\nport = 70000\n", r"\[email\] port: expected 1 to 65535, got 70000"),
        ("[delivery]\nconcurrency = 0\n", r"concurrency: expected at least 1, got 0"),
        ("[queue]\ndelay_away = -5\n", r"delay_away: expected at least 0, got -5"),
        ("[app]\nshutdown_grace = inf\n", r"shutdown_grace: expected a finite number, got inf"),
        # Every push would time out at once; failures would be retried in a hot loop.
        ("[delivery]\ntimeout = 0\n", r"\[delivery\] timeout: expected at least 0.001, got 0"),
        ("[delivery]\nretry_initial = 0\n", r"retry_initial: expected at least 0.001, got 0"),
        ("[delivery]\nretry_max = 0\n", r"retry_max: expected at least 0.001, got 0"),
        (
            "[delivery]\nretry_initial = 60\nretry_max = 1\n",
            r"retry_max \(1.0\) is below \[delivery\] retry_initial \(60.0\)",
        ),
        # Every delayed entry would be dropped as too old before it was due.
        (
            "[queue]\ndelay_away = 600\nmax_age = 300\n",
            r"max_age \(300.0\) must exceed every delay, but delay_away is 600.0",
        ),
        ("[app]\nshutdown_grace = 1e10\n", r"shutdown_grace: expected 0 to 86400"),
        # The ledger keeps its marks as long as an entry lives: MongoDB's TTL index
        # takes no more than about 68 years, and a month-old push is noise anyway.
        ("[queue]\nmax_age = 1e12\n", r"max_age: expected 0 to 2592000"),
        # Names MongoDB refuses, found now rather than as a crash at start.
        ('[mongo]\ndatabase = "rocket.chat"\n', r"\[mongo\] database: .*cannot contain '\.'"),
        ('[mongo]\ndatabase = ""\n', r"\[mongo\] database: .*empty"),
        ('[mongo]\nqueue_collection = "q$"\n', r"queue_collection: .*cannot contain '\$'"),
    ],
)
def test_wrong_type_says_what_was_expected(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, toml), env={})


def test_bad_toml_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[queue\n"), env={})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml", env={})


def test_redaction_hides_passwords_keeps_the_rest() -> None:
    env = {
        "STREAMER_MONGO__URI": "mongodb://admin:s3cr3t@db:27017/?replicaSet=rs0",
        "STREAMER_EMAIL__PASSWORD": "mailpass",
    }
    config = load_config(None, env=env)
    shown = redacted(config)
    assert shown["mongo"]["uri"] == "mongodb://admin:***@db:27017/?replicaSet=rs0"
    assert shown["email"]["password"] == "***"
    assert sorted(secret_values(config)) == ["mailpass", "s3cr3t"]
    assert "s3cr3t" not in to_toml(shown)


@pytest.mark.parametrize(
    ("uri", "shown", "secrets"),
    [
        # pymongo takes everything up to the last '@' before the first '/' as userinfo.
        ("mongodb://u:pa#ss?x@db/?replicaSet=rs0", "mongodb://u:***@db/?replicaSet=rs0",
         ["pa#ss?x"]),
        ("mongodb://u:p%40ss@db/app?tls=true&tlsCertificateKeyFilePassword=k3y",
         "mongodb://u:***@db/app?tls=true&tlsCertificateKeyFilePassword=***",
         ["p%40ss", "p@ss", "k3y"]),
        ("mongodb://db/?authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:t0k",
         "mongodb://db/?authMechanism=MONGODB-AWS&authMechanismProperties=***",
         ["AWS_SESSION_TOKEN:t0k"]),
        ("mongodb://u@db:27017/", "mongodb://u@db:27017/", []),
        # An '@' in an option (an X.509 key file) is not the end of a userinfo.
        ("mongodb://db:27017/?tls=true&tlsCertificateKeyFile=/etc/c@prod.pem"
         "&tlsCertificateKeyFilePassword=k3y",
         "mongodb://db:27017/?tls=true&tlsCertificateKeyFile=/etc/c@prod.pem"
         "&tlsCertificateKeyFilePassword=***", ["k3y"]),
        # Unescaped '/' (and '@') in a password: pymongo refuses it, and it stays hidden.
        ("mongodb://u:p@ss/w0rd@db/app?x=1", "mongodb://u:***@db/app?x=1", ["p@ss/w0rd"]),
        # ... also when a '?' follows the '/', which otherwise starts the options.
        ("mongodb://admin:Xy/9?Qz@db.example/?replicaSet=rs0",
         "mongodb://admin:***@db.example/?replicaSet=rs0", ["Xy/9?Qz"]),
        ("mongodb://u:2024/r?et@h1/db", "mongodb://u:***@h1/db", ["2024/r?et"]),
        ("mongodb://[::1]:27017,h2/?replicaSet=rs0", "mongodb://[::1]:27017,h2/?replicaSet=rs0",
         []),
    ],
)  # fmt: skip
def test_uri_redaction_reads_the_uri_as_the_driver_does(
    uri: str, shown: str, secrets: list[str]
) -> None:
    config = load_config(None, env={"STREAMER_MONGO__URI": uri})
    assert redacted(config)["mongo"]["uri"] == shown
    assert secret_values(config) == secrets


def test_printed_config_is_valid_toml_and_round_trips(tmp_path: Path) -> None:
    config = load_config(None, env={"STREAMER_DELIVERY__GATEWAY_URLS": "http://a"})
    path = write(tmp_path, to_toml(redacted(config)))
    assert tomllib.loads(path.read_text())["delivery"]["gateway_urls"] == ["http://a"]
    assert load_config(path, env={}) == config


def test_config_overrides_database_settings() -> None:
    env = {
        "STREAMER_RULES__MAX_ROOM_MEMBERS": "0",
        "STREAMER_QUEUE__ALWAYS_NOTIFY_MOBILE": "true",
        "STREAMER_DELIVERY__GATEWAY_URLS": "http://gw/",
    }
    settings = override_settings(Settings(max_room_members=100), load_config(None, env=env))
    assert settings.max_room_members == 0
    assert settings.always_notify_mobile is True
    assert settings.push_gateways == ("http://gw",)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamer", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        timeout=60,
        check=False,
    )


def test_cli_config_prints_redacted_override() -> None:
    uri = "mongodb://u:topsecret@elsewhere:27017/?replicaSet=rs0"
    result = run_cli("config", env={"STREAMER_MONGO__URI": uri})
    assert result.returncode == 0
    assert 'uri = "mongodb://u:***@elsewhere:27017/?replicaSet=rs0"' in result.stdout
    assert "topsecret" not in result.stdout + result.stderr


def test_cli_unknown_key_exits_2_naming_it(tmp_path: Path) -> None:
    path = write(tmp_path, "[log]\ncolour = true\n")
    result = run_cli("config", "--config", str(path))
    assert result.returncode == 2
    assert "'colour'" in result.stderr
    assert str(path) in result.stderr


def test_cli_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("streamer ")


def test_a_config_file_not_in_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[mongo]\ndatabase = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path, env={})


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    """Windows Notepad starts UTF-8 files with one."""
    path = tmp_path / "bom.toml"
    path.write_bytes(b'\xef\xbb\xbf[mongo]\ndatabase = "chat"\n')
    assert load_config(path, env={}).mongo.database == "chat"


def test_an_empty_config_path_is_an_error_not_the_defaults() -> None:
    """`--config "$CONF"` with CONF unset must not run on the defaults without a word."""
    with pytest.raises(ConfigError, match="empty"):
        load_config("", env={})


def test_printed_config_escapes_every_control_character() -> None:
    config = load_config(None, env={"STREAMER_APP__INSTANCE_ID": "a\x7fb\x01c"})
    assert tomllib.loads(to_toml(redacted(config)))["app"]["instance_id"] == "a\x7fb\x01c"
