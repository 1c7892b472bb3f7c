"""Logging (structlog JSON lines on stdout) and, later, metrics and health endpoints."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import orjson
import structlog

from streamer.config import REDACTED, LogConfig


def configure_logging(config: LogConfig, secrets: Iterable[str] = ()) -> None:
    """Configure structlog once for the process: JSON (orjson) or console, on stdout.

    `secrets` are scrubbed from every rendered line as a last line of defence:
    no code path should log them, and this makes sure none ever does.
    """
    level = logging.getLevelNamesMapping()[config.level.upper()]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if config.format == "console"
        else structlog.processors.JSONRenderer(serializer=_dumps)
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        renderer,
    ]
    scrub = [s for s in secrets if s]
    if scrub:
        processors.append(_Scrubber(scrub))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(sys.stdout)
        if config.format == "console"
        else structlog.BytesLoggerFactory(sys.stdout.buffer),
        cache_logger_on_first_use=False,
    )


def _dumps(event: MutableMapping[str, Any], **_: Any) -> bytes:
    return orjson.dumps(event, default=str)


class _Scrubber:
    def __init__(self, secrets: list[str]) -> None:
        self._secrets = secrets

    def __call__(self, _logger: Any, _method: str, line: Any) -> Any:
        if isinstance(line, bytes):
            for secret in self._secrets:
                line = line.replace(secret.encode(), REDACTED.encode())
        elif isinstance(line, str):
            for secret in self._secrets:
                line = line.replace(secret, REDACTED)
        return line
