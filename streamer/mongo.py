"""The MongoDB client, made the same way by the daemon and every command."""

from __future__ import annotations

from typing import Any

from pymongo import AsyncMongoClient
from pymongo.errors import InvalidURI

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
