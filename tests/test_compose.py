"""compose/ cannot be run here (no Docker engine in CI), so check what it must promise.

Text-level checks only, on purpose: no YAML parser is a dependency. They pin the
facts that break silently: Rocket.Chat's own queue switched off, /readyz as the
healthcheck, and stop timeouts longer than streamer's shutdown grace.
"""

from __future__ import annotations

import re
from pathlib import Path

from streamer.config import AppConfig, HttpConfig

COMPOSE = Path(__file__).parent.parent / "compose"


def _seconds(text: str, pattern: str) -> float:
    match = re.search(pattern, text, re.MULTILINE)
    assert match, pattern
    return float(match.group(1))


def test_rocketchat_runs_with_its_own_queue_disabled() -> None:
    compose = (COMPOSE / "docker-compose.yml").read_text()
    for presence in ("ONLINE", "AWAY", "OFFLINE"):
        assert f'NOTIFICATIONS_SCHEDULE_DELAY_{presence}: "-1"' in compose


def test_streamer_is_healthy_only_when_ready_and_outlives_its_grace() -> None:
    compose = (COMPOSE / "docker-compose.yml").read_text()
    assert "http://127.0.0.1:9464/readyz" in compose
    assert "STREAMER_HTTP__LISTEN: 0.0.0.0:9464" in compose
    assert '"127.0.0.1:9464:9464"' in compose  # published on the host's loopback only
    assert "../config.toml:/etc/streamer/config.toml:ro" in compose
    assert "STREAMER_APP__INSTANCE_ID: streamer-1" in compose  # a restart resumes its leases
    grace = _seconds(compose, r"^\s*stop_grace_period: (\d+)s$")
    assert grace > AppConfig().shutdown_grace


def test_mongodb_is_a_replica_set_initiated_once() -> None:
    compose = (COMPOSE / "docker-compose.yml").read_text()
    assert '"--replSet", "rs0"' in compose
    assert "rs.initiate(" in compose
    assert compose.count("condition: service_completed_successfully") == 2


def test_the_image_runs_as_a_non_root_user() -> None:
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    assert re.search(r"^USER streamer$", dockerfile, re.MULTILINE)
    assert "pip install ." in dockerfile


def test_the_systemd_unit_stops_gracefully_and_restarts_on_failure() -> None:
    unit = (COMPOSE / "streamer.service").read_text()
    assert "KillSignal=SIGTERM" in unit
    assert "Restart=on-failure" in unit
    assert _seconds(unit, r"^TimeoutStopSec=(\d+)$") > AppConfig().shutdown_grace
    assert "NoNewPrivileges=yes" in unit


def test_the_endpoint_listens_on_loopback_unless_told_otherwise() -> None:
    assert HttpConfig().listen.startswith("127.0.0.1:")
