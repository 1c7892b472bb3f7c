"""Change streams read a server batch at a time.

Shared by the sources and the queue's follower: both hand on, or apply, what
one getMore returned, and then let more gather before asking again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pymongo.asynchronous.change_stream import AsyncChangeStream

Doc = dict[str, Any]
Change = Mapping[str, Any]


async def next_batch(changes: AsyncChangeStream[Doc]) -> list[Change]:
    """The changes of one server batch: the unit of handling and of token saves.

    pymongo hands changes out one by one; whether the current batch has more is
    only known to its cursor (`_has_next`), which pymongo's own resume-token
    bookkeeping relies on too.
    """
    first = await changes.try_next()
    if first is None:
        return []
    batch: list[Change] = [first]
    while changes._cursor._has_next():
        change = await changes.try_next()
        if change is None:
            break
        batch.append(change)
    return batch
