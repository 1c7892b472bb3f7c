"""MongoDB's own `failCommand` fail point: the real server stalls or fails commands.

A server that does not allow test commands (`enableTestCommands`) skips the
test rather than failing it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.errors import OperationFailure

Doc = dict[str, Any]
#: A plain command error: neither transient nor retryable.
BAD_VALUE = 2


async def fail_commands(
    mongo: AsyncMongoClient[Doc], mode: str | dict[str, int] = "alwaysOn", **data: Any
) -> None:
    """Arm the fail point: `mode={"times": n}` for the next n matching commands."""
    try:
        await mongo.admin.command("configureFailPoint", "failCommand", mode=mode, data=data)
    except OperationFailure:
        pytest.skip("this server does not allow test commands (enableTestCommands)")


@asynccontextmanager
async def failing_commands(mongo: AsyncMongoClient[Doc], **data: Any) -> AsyncIterator[None]:
    """Every matching command fails (or stalls) until the block ends."""
    await fail_commands(mongo, **data)
    try:
        yield
    finally:
        await mongo.admin.command("configureFailPoint", "failCommand", mode="off")
