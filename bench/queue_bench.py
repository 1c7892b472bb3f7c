"""The queue's heap and reload, at 1,000,000 entries.

Run by hand, not in CI:  PYTHONPATH=$PWD python -m bench.queue_bench [--entries N]

Prints, with the issue's targets:
- heap push/pop rate: fill the schedule with N entries, then drain it (2N ops);
  target ≥ 500,000 ops/s;
- the same with the schedule held at N entries (one push and one pop per step);
- memory per entry held by the schedule (tracemalloc, ids included); ≤ 300 B;
- time to reload N entries from the side collection into a new `Queue`, with a
  real mongod from `streamer.devmongo`; target ≤ 15 s.

On the 2-core development box: 614,000 ops/s fill then drain, 612,000 ops/s
held, 272 B per entry, reload 6.8 s (under other jobs' load: 420,000 ops/s
and 12-23 s — the machine, not the code, varies).

Entries look like production's: created in order, due at once (offline), in
120 s (online) or somewhere in between (away), spread over 20,000 users and
2,000 rooms with Rocket.Chat-shaped 17-character ids.
"""

from __future__ import annotations

import argparse
import gc
import random
import string
import time
import tracemalloc

import anyio
import bson
from pymongo import AsyncMongoClient

from streamer import devmongo
from streamer.config import QueueConfig
from streamer.queue import Queue
from streamer.queue.entry import entry_id
from streamer.queue.heap import Schedule, Slot, make_slot
from streamer.queue.store import Doc, parse_slot

T0 = 1_700_000_000.0
USERS = 20_000
ROOMS = 2_000
INSERT_BATCH = 10_000


def _ids(rng: random.Random, count: int) -> list[str]:
    alphabet = string.ascii_letters + string.digits
    return ["".join(rng.choices(alphabet, k=17)) for _ in range(count)]


def _documents(count: int, seed: int = 1) -> list[Doc]:
    """Queue documents as `Queue.add` writes them."""
    rng = random.Random(seed)
    users, rooms = _ids(rng, USERS), _ids(rng, ROOMS)
    docs = []
    for i, mid in enumerate(_ids(rng, count)):
        uid, created = rng.choice(users), T0 + i * 0.001
        delay = rng.choice((0.0, 120.0, rng.uniform(0.0, 120.0)))
        docs.append(
            {
                "_id": entry_id(uid, mid, "push"),
                "uid": uid, "rid": rng.choice(rooms), "mid": mid, "kind": "push",
                "due_at": created + delay, "created_at": created,
                "attempts": 0, "first_failure_at": None, "last_error": None,
                "owner": None, "lease_until": 0.0,
            }
        )  # fmt: skip
    return docs


def _slots(docs: list[Doc]) -> list[Slot]:
    return [make_slot(d["due_at"], d["created_at"], d["_id"], d["uid"], d["rid"]) for d in docs]


def heap_rates(slots: list[Slot]) -> tuple[float, float]:
    """(fill-then-drain ops/s, held-at-size ops/s)."""
    half = len(slots) // 2
    schedule = Schedule()
    started = time.perf_counter()
    for slot in slots:
        schedule.put(slot)
    while schedule.pop_due(float("inf")) is not None:
        pass
    fill_drain = 2 * len(slots) / (time.perf_counter() - started)
    schedule = Schedule(slots[:half])
    started = time.perf_counter()
    for slot in slots[half:]:
        schedule.put(slot)
        schedule.pop_due(float("inf"))
    held = 2 * (len(slots) - half) / (time.perf_counter() - started)
    return fill_drain, held


def bytes_per_entry(docs: list[Doc]) -> float:
    """What the schedule keeps per entry (slot, times, id string, indexes), built the
    way `Queue.load` builds it: from freshly decoded BSON, so nothing is pre-shared."""
    encoded = [bson.encode(doc) for doc in docs]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    schedule = Schedule(parse_slot(bson.decode(raw), "bench") for raw in encoded)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(schedule) == len(docs)
    return held / len(docs)


async def reload_seconds(uri: str, docs: list[Doc]) -> float:
    client: AsyncMongoClient[Doc] = AsyncMongoClient(uri)
    try:
        collection = client["bench"]["streamer_queue"]
        for start in range(0, len(docs), INSERT_BATCH):
            await collection.insert_many(docs[start : start + INSERT_BATCH], ordered=False)
        await Queue(collection, QueueConfig(), instance_id="bench").load()  # indexes
        queue = Queue(collection, QueueConfig(), instance_id="bench")
        started = time.perf_counter()
        await queue.load()
        elapsed = time.perf_counter() - started
        assert len(queue) == len(docs)
        return elapsed
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    count = parser.parse_args().entries
    docs = _documents(count)
    fill_drain, held = heap_rates(_slots(docs))
    print(f"heap fill then drain, {count:,} entries: {fill_drain:,.0f} ops/s (target ≥ 500,000)")
    print(f"heap held at {count // 2:,} entries, push+pop: {held:,.0f} ops/s")
    print(f"memory per entry: {bytes_per_entry(docs):,.0f} B (target ≤ 300)")
    with devmongo.running() as server:
        seconds = anyio.run(reload_seconds, server.uri, docs)
    print(f"reload {count:,} entries from the collection: {seconds:.1f} s (target ≤ 15)")


if __name__ == "__main__":
    main()
