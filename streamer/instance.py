"""One live process per `instance_id`, enforced with a heartbeat document.

The queue treats entries leased or queued under its own `instance_id` as its
own: that is what lets a restarted instance take its leases back at once. Two
live processes under one id would therefore both deliver every entry (emails
twice, pushes lost when the ledger's loser drops the entry). A copied compose
service or a second unit on one host gives exactly that, so it is refused, not
documented away.

The claim is one document, `_id = "instance:<id>"`, holding a per-process nonce
and the server's time of the last heartbeat (`$$NOW`: hosts' clocks never
compare). A process takes it when it is free, its own, or stale; otherwise it
waits, saying who holds it, because that holder may be a crashed predecessor
whose heartbeat has not gone stale yet. A clean stop gives it up at once.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from typing import Any

import anyio
import structlog
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError, PyMongoError

log = structlog.get_logger("streamer.instance")
Doc = dict[str, Any]

HEARTBEAT_INTERVAL = 2.0
#: A heartbeat older than this belongs to a process that is gone (or frozen).
STALE_AFTER = 10.0
#: Seconds between repeats of the "in use" line while waiting.
REPEAT_WARNING = 60.0
#: Claims quiet this long (ms) belong to processes long gone: cleared at a start.
FORGET_AFTER_MS = 24 * 3600 * 1000


class InstanceTakenOver(Exception):
    """Another process took this instance_id while this one was not heartbeating."""


class InstanceClaim:
    def __init__(
        self,
        state: AsyncCollection[Doc],
        instance_id: str,
        *,
        interval: float = HEARTBEAT_INTERVAL,
        stale_after: float = STALE_AFTER,
    ) -> None:
        self._state = state
        self._key = f"instance:{instance_id}"
        self._instance_id = instance_id
        self._nonce = uuid.uuid4().hex
        self._interval = interval
        self._stale_ms = int(stale_after * 1000)

    async def acquire(self) -> None:
        """Wait until this process holds the instance_id (through MongoDB outages too)."""
        warned_at = -REPEAT_WARNING
        while True:
            try:
                if await self._try_claim():
                    await self._forget_long_dead()
                    return
                if time.monotonic() - warned_at >= REPEAT_WARNING:
                    warned_at = time.monotonic()
                    await self._say_who_holds_it()
            except PyMongoError as exc:
                log.warning("instance_claim_failed", error=type(exc).__name__)
            await anyio.sleep(self._interval)

    async def keep(self) -> None:
        """Heartbeat for ever, from right after `acquire` (loading included: a holder
        that went quiet while it loads would look stale); raises InstanceTakenOver once
        another process holds the id.

        A MongoDB error skips a beat. A claim that vanished (its collection cleared)
        is taken again: only another process's claim means a takeover.
        """
        while True:
            try:
                result = await self._state.update_one(
                    {"_id": self._key, "nonce": self._nonce}, [{"$set": {"seen_at": "$$NOW"}}]
                )
                if result.matched_count == 0 and not await self._try_claim():
                    raise InstanceTakenOver(
                        f"instance_id {self._instance_id!r} was taken by another process while "
                        "this one was not heartbeating; give each process its own "
                        "[app] instance_id"
                    )
            except PyMongoError as exc:
                log.warning("instance_heartbeat_failed", error=type(exc).__name__)
            await anyio.sleep(self._interval)

    async def release(self) -> None:
        await self._state.delete_one({"_id": self._key, "nonce": self._nonce})

    async def _forget_long_dead(self) -> None:
        """Every crash under the default id (hostname and pid) leaves a claim nobody will
        free; a day on, it is cleared."""
        dead = {"$lt": ["$seen_at", {"$subtract": ["$$NOW", FORGET_AFTER_MS]}]}
        await self._state.delete_many({"_id": {"$regex": "^instance:"}, "$expr": dead})

    async def _try_claim(self) -> bool:
        """Free or ours: one upsert. Someone else's: taken only if its heartbeat is stale
        (two steps, as MongoDB allows no `$expr` in an upsert's filter)."""
        mine: list[Doc] = [
            {"$set": {"nonce": self._nonce, "host": socket.gethostname(), "pid": os.getpid()}},
            {"$set": {"seen_at": "$$NOW"}},
        ]
        ours = {"_id": self._key, "nonce": self._nonce}
        try:
            await self._state.update_one(ours, mine, upsert=True)
        except DuplicateKeyError:
            stale = {"$lt": ["$seen_at", {"$subtract": ["$$NOW", self._stale_ms]}]}
            taken = await self._state.update_one({"_id": self._key, "$expr": stale}, mine)
            return taken.modified_count == 1
        return True

    async def _say_who_holds_it(self) -> None:
        holder = await self._state.find_one({"_id": self._key}) or {}
        log.error(
            "instance_id_in_use",
            instance_id=self._instance_id,
            holder_host=holder.get("host"),
            holder_pid=holder.get("pid"),
            action="waiting until it stops or its heartbeat is stale",
            fix="give each process its own [app] instance_id",
        )
