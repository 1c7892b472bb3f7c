"""The MongoDB client, made the same way by the daemon and every command."""

from __future__ import annotations

from typing import Any

from pymongo import AsyncMongoClient

Doc = dict[str, Any]


def mongo_client(uri: str, *, server_selection_ms: int) -> AsyncMongoClient[Doc]:
    """A client for `uri` that gives up finding a server after `server_selection_ms`,
    unless the URI sets its own `serverSelectionTimeoutMS`: the operator's word wins."""
    if "serverselectiontimeoutms" in uri.lower():
        return AsyncMongoClient(uri)
    return AsyncMongoClient(uri, serverSelectionTimeoutMS=server_selection_ms)
