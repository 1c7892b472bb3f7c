"""Logging: structlog lines on stdout, JSON (orjson) or console, for everything.

The standard library's records (aiohttp's server, pymongo's background tasks,
asyncio) and Python warnings go through the same processors, so an operator's
log pipeline gets JSON lines only, never a bare traceback on stderr. Libraries
speak at WARNING and above: below that they chatter per request, and httpx's
INFO lines carry request URLs, where APNs puts the device token.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import sys
import uuid
from collections.abc import Iterable, MutableMapping
from typing import Any

import orjson
import structlog

from streamer.config import REDACTED, LogConfig

#: Least level of the standard library's records that are written.
LIBRARY_LEVEL = logging.WARNING
#: Values orjson renders itself, holding no free text a secret could hide in.
NATIVE = (bool, int, float, dt.date, dt.time, uuid.UUID, enum.Enum)


def configure_logging(config: LogConfig, secrets: Iterable[str] = ()) -> None:
    """Configure structlog and the standard library's logging once for the process.

    `secrets` are scrubbed from every line as a last line of defence: no code path
    should log them, and this makes sure none ever does.
    """
    level = logging.getLevelNamesMapping()[config.level.upper()]
    shared: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _Scrubber([s for s in secrets if s]),
    ]
    console = config.format == "console"
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.dev.ConsoleRenderer(colors=False)
            if console
            else structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(sys.stdout)
        if console
        else structlog.BytesLoggerFactory(sys.stdout.buffer),
        cache_logger_on_first_use=False,
    )
    _route_the_standard_library(shared, console)


def _route_the_standard_library(shared: list[Any], console: bool) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *shared,
                structlog.dev.ConsoleRenderer(colors=False)
                if console
                else structlog.processors.JSONRenderer(serializer=_dumps_text),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(LIBRARY_LEVEL)
    logging.captureWarnings(True)


def _dumps(event: MutableMapping[str, Any], **_: Any) -> bytes:
    return orjson.dumps(event, default=str)


def _dumps_text(event: MutableMapping[str, Any], **_: Any) -> str:
    return _dumps(event).decode()


class _Scrubber:
    """Replaces secrets in every string of the event, before it is rendered: once
    rendered, a secret holding a quote or a backslash is escaped beyond recognition."""

    def __init__(self, secrets: list[str]) -> None:
        self._secrets = secrets

    def __call__(self, _logger: Any, _method: str, event: Any) -> Any:
        return self._scrub(event) if self._secrets else event

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._secrets:
                value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {key: self._scrub(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self._scrub(item) for item in value]
        if value is None or isinstance(value, NATIVE):
            return value  # orjson writes these itself, the same with or without secrets
        return self._scrub(str(value))  # as the renderer would write it
