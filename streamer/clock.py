"""MongoDB's clock, read without a round trip: the time every queue write is in.

Instances compare each other's times: one leases an entry until T and another
takes it over after T, one records a first failure and another gives up an
hour after it, and mongod's TTL monitor expires the ledger's marks by its own
clock. In each host's wall clock, a few seconds of skew between hosts let an
instance take a lease that was still live (an email twice, a push lost under
`skip`), and a host clock stepped back held every queued entry back by the step.

So each instance reads the primary's clock (`hello`'s `localTime`, taken as
halfway through the round trip) and keeps the offset from its own monotonic
clock. Between readings time runs on the monotonic clock, which no step moves;
every instance is then within a round trip and a millisecond of the others, as
long as the replica set's members agree among themselves (a fail-over moves
everyone to the new primary's clock within a reading interval).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio
import pymongo
import structlog
from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from streamer.metrics import HOST_CLOCK_SKEW
from streamer.model import to_epoch

log = structlog.get_logger("streamer.clock")


def _since_boot() -> float:
    """Monotonic, and counting while the host is suspended (CLOCK_MONOTONIC stops): a
    clock that fell behind by a suspension would write leases already expired."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


#: Seconds between readings: drift between two readings stays far below a millisecond.
READ_INTERVAL = 60.0
#: A reading whose round trip took longer is too imprecise to replace a good one.
SLOW_READING = 0.5
#: `localTime` is in whole milliseconds, cut down: on average half of one is missing.
HALF_A_MILLISECOND = 0.0005
#: The host clock differing from MongoDB's by more is worth a log line: the queue does
#: not mind, but APNs and FCM tokens are dated by the host clock, and rejected if it is
#: far off.
SKEW_WORTH_SAYING = 1.0


class ServerClock:
    """A `clock()` callable for the queue, ingest and delivery: epoch seconds on MongoDB's
    clock. Until the first reading it is the host's clock."""

    def __init__(
        self,
        client: AsyncMongoClient[dict[str, Any]],
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = _since_boot,
    ) -> None:
        self._client = client
        self._wall = wall
        self._monotonic = monotonic
        self._offset = wall() - monotonic()
        #: The host's clock minus MongoDB's at the last reading; None before one.
        self.skew: float | None = None
        self._skew_said = 0.0

    def __call__(self) -> float:
        return self._monotonic() + self._offset

    async def read(self) -> None:
        """Take the server's time once; raises PyMongoError if MongoDB cannot be asked."""
        sent = self._monotonic()
        reply = await self._client.admin.command("hello")
        answered = self._monotonic()
        server_time = to_epoch(reply.get("localTime"))
        if server_time is None:
            log.warning("server_clock_unreadable", reply_field="localTime")
            return
        if self.skew is not None and answered - sent > SLOW_READING:
            return
        self._offset = server_time + HALF_A_MILLISECOND - (sent + answered) / 2
        self.skew = self._wall() - self()
        self._say_skew(self.skew)

    async def keep_reading(self, interval: float = READ_INTERVAL) -> None:
        """Read the server's time every `interval`, for ever; a failed reading keeps the
        last offset (MongoDB away is an outage the queue is waiting out anyway)."""
        while True:
            await anyio.sleep(interval)
            try:
                with pymongo.timeout(interval):
                    await self.read()
            except PyMongoError as exc:
                log.warning("server_clock_read_failed", error=type(exc).__name__)

    def _say_skew(self, skew: float) -> None:
        HOST_CLOCK_SKEW.set(skew)
        if abs(skew - self._skew_said) < SKEW_WORTH_SAYING:
            return
        self._skew_said = skew
        if abs(skew) < SKEW_WORTH_SAYING:
            log.info("host_clock_in_step", seconds=round(skew, 3))
            return
        log.warning(
            "host_clock_skew",
            seconds=round(skew, 3),
            effect="none on the queue, which keeps MongoDB's time; APNs and FCM "
            "tokens and mail dates carry the host's",
            fix="run NTP (chrony, systemd-timesyncd) on this host and MongoDB's",
        )
