"""The harness itself: the real replica set supports change streams."""

from __future__ import annotations

import pytest
from pymongo.asynchronous.database import AsyncDatabase

pytestmark = pytest.mark.anyio


async def test_change_stream_sees_an_insert(db: AsyncDatabase[dict[str, object]]) -> None:
    collection = db["probe"]
    async with await collection.watch([{"$match": {"operationType": "insert"}}]) as stream:
        await collection.insert_one({"_id": "x", "value": 1})
        change = await stream.next()
    assert change["operationType"] == "insert"
    assert change["fullDocument"] == {"_id": "x", "value": 1}
