"""The MongoDB client, made the same way by the daemon and every command."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import anyio
import pymongo
from pymongo import AsyncMongoClient
from pymongo.errors import InvalidURI, PyMongoError

from streamer.config import ConfigError

Doc = dict[str, Any]


def mongo_client(uri: str, *, server_selection_ms: int) -> AsyncMongoClient[Doc]:
    """A client for `uri` that gives up finding a server after `server_selection_ms`,
    unless the URI sets its own `serverSelectionTimeoutMS`: the operator's word wins.

    A URI pymongo cannot parse is a configuration error (exit 2, no restart loop);
    the usual cause is a password with an unescaped `/`, `@` or `:`.
    """
    try:
        if "serverselectiontimeoutms" in uri.lower():
            return AsyncMongoClient(uri)
        return AsyncMongoClient(uri, serverSelectionTimeoutMS=server_selection_ms)
    except InvalidURI as exc:
        raise ConfigError(
            f"[mongo] uri is not a valid MongoDB URI ({exc}): escape special characters "
            "in the user name and password (urllib.parse.quote_plus), e.g. / as %2F"
        ) from None


@contextmanager
def cleanup_within(seconds: float) -> Iterator[None]:
    """For clean-up that must run even while being cancelled (a shutdown): shielded,
    bounded by pymongo's own deadline rather than a cancel scope (cancelling pymongo
    while it waits for a server breaks its topology lock, PYTHON-5167), and quiet
    when MongoDB is gone."""
    with anyio.CancelScope(shield=True), pymongo.timeout(seconds), suppress(PyMongoError):
        yield
