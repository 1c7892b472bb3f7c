"""`streamer run` refuses to start on what it cannot fix: one clear line, the right exit code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from streamer.mongo import mongo_client
from tests.credentials import write_apns_key


def run_streamer(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamer", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def direct_mode_config(tmp_path: Path, mongo_uri: str, db_name: str, key: Path) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[mongo]
uri = "{mongo_uri}"
database = "{db_name}"
[delivery]
mode = "direct"
[apns]
key_file = "{key}"
key_id = "ABC123DEFG"
team_id = "TEAM123456"
[http]
listen = "127.0.0.1:0"
"""
    )
    return config


def test_a_world_readable_apns_key_refuses_to_start(
    tmp_path: Path, mongo_uri: str, db_name: str
) -> None:
    key, _ = write_apns_key(tmp_path)
    key.chmod(0o644)
    result = run_streamer(direct_mode_config(tmp_path, mongo_uri, db_name, key))

    assert result.returncode == 2, result.stdout + result.stderr
    lines = [orjson.loads(line) for line in result.stdout.splitlines()]
    (error,) = [line for line in lines if line["level"] == "error"]
    assert error["event"] == "configuration_error"
    assert str(key) in error["error"] and "chmod 600" in error["error"]
    assert "BEGIN PRIVATE KEY" not in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_direct_mode_without_any_provider_key_refuses_to_start(
    tmp_path: Path, mongo_uri: str, db_name: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[mongo]\nuri = "{mongo_uri}"\ndatabase = "{db_name}"\n'
        '[delivery]\nmode = "direct"\n[http]\nlisten = "127.0.0.1:0"\n'
    )
    result = run_streamer(config)

    assert result.returncode == 2, result.stdout + result.stderr
    assert "[fcm] service_account_file or [apns] key_file" in result.stdout


@pytest.mark.anyio
async def test_the_uris_own_server_selection_timeout_wins() -> None:
    """Every command gives up on MongoDB after its own default, unless the URI says."""
    told = mongo_client(
        "mongodb://db.example/?serverSelectionTimeoutMS=2000", server_selection_ms=9000
    )
    default = mongo_client("mongodb://db.example/", server_selection_ms=9000)
    try:
        assert told.options.server_selection_timeout == 2.0
        assert default.options.server_selection_timeout == 9.0
    finally:
        await told.close()
        await default.close()


def test_a_fatal_error_is_one_json_line_with_its_traceback_not_bare_stderr() -> None:
    """Say MongoDB refuses the database-wide change stream (a user without the
    changeStream action there): the daemon stops, and says why where logs are read."""
    code = (
        "from streamer.app import _startup_failed\n"
        "from streamer.config import LogConfig\n"
        "from streamer.observability import configure_logging\n"
        "configure_logging(LogConfig())\n"
        "try:\n"
        "    raise PermissionError('not authorized on rocketchat to execute aggregate')\n"
        "except PermissionError as exc:\n"
        "    raise SystemExit(_startup_failed(ExceptionGroup('stopped', [exc])))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (1, "")
    (line,) = [orjson.loads(text) for text in result.stdout.splitlines()]
    assert line["event"] == "daemon_failed"
    assert line["error"] == "PermissionError: not authorized on rocketchat to execute aggregate"
    assert "Traceback" in line["exception"]
