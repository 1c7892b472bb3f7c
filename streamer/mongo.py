"""The MongoDB client, made the same way by the daemon and every command."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import anyio
import pymongo
from pymongo import AsyncMongoClient
from pymongo.errors import ConfigurationError, InvalidURI, PyMongoError

from streamer.config import REDACTED, ConfigError, uri_secrets

Doc = dict[str, Any]


def mongo_client(uri: str, *, server_selection_ms: int) -> AsyncMongoClient[Doc]:
    """A client for `uri` that gives up finding a server after `server_selection_ms`,
    unless the URI sets its own `serverSelectionTimeoutMS`: the operator's word wins.

    A URI pymongo cannot build a client from is a configuration error (exit 2, no
    restart loop): most often a password with an unescaped `/`, `@` or `:`, else a
    bad port, an empty host or a TLS file that is not there.
    """
    # Dates Python cannot hold (JavaScript's reach year 275760) come as `DatetimeMS`,
    # which the parsers reject as one malformed document; as datetimes they would fail
    # the whole batch they are in, and the restarted daemon would meet them again.
    options: dict[str, Any] = {"datetime_conversion": "DATETIME_AUTO"}
    if "serverselectiontimeoutms" not in uri.lower():
        options["serverSelectionTimeoutMS"] = server_selection_ms
    try:
        return AsyncMongoClient(uri, **options)
    except InvalidURI as exc:
        raise ConfigError(
            f"[mongo] uri is not a valid MongoDB URI ({_hidden(exc, uri)}): escape special "
            "characters in the user name and password (urllib.parse.quote_plus), e.g. / as %2F"
        ) from None
    except (ConfigurationError, ValueError, OSError) as exc:
        raise ConfigError(f"[mongo] uri cannot be used: {_hidden(exc, uri)}") from None


def _hidden(exc: Exception, uri: str) -> str:
    """The error's text without the URI's secrets, should pymongo ever quote them."""
    text = str(exc)
    for secret in uri_secrets(uri):
        text = text.replace(secret, REDACTED)
    return text


@contextmanager
def cleanup_within(seconds: float) -> Iterator[None]:
    """For clean-up that must run even while being cancelled (a shutdown): shielded,
    bounded by pymongo's own deadline rather than a cancel scope (cancelling pymongo
    while it waits for a server breaks its topology lock, PYTHON-5167), and quiet
    when MongoDB is gone."""
    with anyio.CancelScope(shield=True), pymongo.timeout(seconds), suppress(PyMongoError):
        yield
