"""Message inserts per second through the messages change stream, end to end.

Run by hand: `python -m bench.sources`. Starts its own mongod and runs `Sources`
with a handler that only counts. Two figures:
- live: realistic messages inserted as fast as a second client can (bulk inserts
  of 1,000) while the stream follows; the writer is usually the limit here.
- backlog: the same number inserted while the daemon is stopped, then drained
  after a restart from the saved token: what the reader alone sustains.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import anyio
from pymongo import AsyncMongoClient

from streamer import devmongo
from streamer.config import Config
from streamer.directory import DatabaseDirectory
from streamer.model import MESSAGES
from streamer.sources.cache import CachedDirectory
from streamer.sources.events import MessageInserted
from streamer.sources.streams import Sources
from tests import factories as f

TOTAL = 100_000
CHUNK = 1_000


async def _nothing(_: Sequence[Any]) -> None:
    return None


async def follow(db: Any, deliveries: list[int], live: bool) -> float:
    """Run Sources until TOTAL events arrived; seconds to the last one, from when every
    stream is open (live: the inserts start then) or, for a backlog, from the start:
    a stream delivers while the others are still opening, so timing a backlog from
    "ready" leaves out part of it, more so the more streams there are."""

    done = anyio.Event()

    async def count(events: Sequence[MessageInserted]) -> None:
        deliveries.append(len(events))
        if sum(deliveries) >= TOTAL:
            done.set()

    directory = CachedDirectory(db, db["streamer_state"], DatabaseDirectory(db))
    await directory.load()
    sources = Sources(db, Config(), directory, count, _nothing, _nothing)
    async with anyio.create_task_group() as tg:
        opened = time.perf_counter()
        tg.start_soon(sources.run)
        while not sources.ready:  # noqa: ASYNC110 (a property, not an event)
            await anyio.sleep(0.01)
        start = time.perf_counter() if live else opened
        if live:
            await insert(db)
        await done.wait()
        tg.cancel_scope.cancel()
    return time.perf_counter() - start


async def insert(db: Any) -> None:
    alice, room = f.user("alice"), f.room("GENERAL")
    for _ in range(TOTAL // CHUNK):
        await db[MESSAGES].insert_many(
            [f.message(room, alice, "hello @bob, see the notes") for _ in range(CHUNK)]
        )


def report(label: str, seconds: float, deliveries: list[int]) -> None:
    print(
        f"{label}: {TOTAL} messages in {seconds:.2f} s = {TOTAL / seconds:,.0f} events/s, "
        f"{len(deliveries)} handler calls ({TOTAL / len(deliveries):,.0f} events per call)"
    )


async def main(uri: str) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    db = client["bench"]
    live: list[int] = []
    report("live", await follow(db, live, live=True), live)
    await insert(db)
    backlog: list[int] = []
    report("backlog", await follow(db, backlog, live=False), backlog)
    await client.close()


if __name__ == "__main__":
    with devmongo.running() as server:
        anyio.run(main, server.uri)
