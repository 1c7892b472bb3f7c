"""`streamer explain`: why did (or didn't) a user get a notification for a message?

Runs the daemon's own decision (`decide_message`) over the live database and
prints it in plain words: for each member of the room (or one), push and email
yes/no with the reason, and when the queue would send it. The decision is made
as at the message's insert (so an old message is not "too old"); preferences,
presence and devices are read as they are now.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any, TextIO

import anyio
from bson import Timestamp
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import PyMongoError

from streamer.clock import ServerClock
from streamer.config import Config, override_settings
from streamer.decisions import decide_message
from streamer.directory import DatabaseDirectory, Directory, one_message
from streamer.model import MESSAGES, Message, Room, Settings, User
from streamer.mongo import mongo_client
from streamer.queue.policy import due_at
from streamer.rules import Decision, Reason
from streamer.sources.cache import load_away_since

Doc = dict[str, Any]
#: Seconds to wait for MongoDB before giving up, unless the URI says otherwise.
MONGO_TIMEOUT_MS = 5000
#: Seconds before a message's timestamp its insert is looked for (a client clock ahead).
INSERT_SEARCH_SLACK = 300
ROOM_KINDS = {"c": "channel", "p": "private group", "d": "direct message", "l": "omnichannel"}


class ExplainError(Exception):
    """What to explain cannot be found; the message says what was looked for."""


def main(config: Config, message_id: str, user: str | None, out: TextIO, err: TextIO) -> int:
    """The `streamer explain` command: 0 when explained, 1 when it cannot be."""
    try:
        anyio.run(_explain_live, config, message_id, user, out)
    except ExplainError as exc:
        err.write(f"streamer explain: {exc} (database {config.mongo.database!r})\n")
        return 1
    except PyMongoError as exc:
        err.write(f"streamer explain: cannot read MongoDB ({config.mongo.database}): {exc}\n")
        return 1
    return 0


async def _explain_live(config: Config, message_id: str, user: str | None, out: TextIO) -> None:
    client = mongo_client(config.mongo.uri, server_selection_ms=MONGO_TIMEOUT_MS)
    try:
        db = client[config.mongo.database]
        away = await load_away_since(db[config.mongo.state_collection])
        clock = ServerClock(client)  # "away since" is MongoDB's time, as the daemon's queue
        await clock.read()
        await explain(
            DatabaseDirectory(db), message_id, config, out,
            user=user, now=clock(), away=away, oplog=client["local"]["oplog.rs"],
        )  # fmt: skip
    finally:
        await client.close()


async def explain(
    directory: Directory,
    message_id: str,
    config: Config,
    out: TextIO,
    *,
    user: str | None = None,
    now: float,
    away: Mapping[str, float] | None = None,
    oplog: AsyncCollection[Doc] | None = None,
) -> None:
    """Print the decision for every recipient of `message_id`, or only `user` (name or id).

    `away`: when each away user turned away, as the daemon recorded it; a user
    missing from it counts as away since their document last changed (SPEC §5).
    `oplog`: where to find when the message was inserted, the moment the daemon
    decided it at (an imported message's timestamp can be far older).
    Raises `ExplainError` when the message, its room or the user cannot be found.
    """
    message = await one_message(directory, message_id)
    if message is None:
        raise ExplainError(f"message {message_id!r} not found (or its document is malformed)")
    settings = override_settings(await directory.settings(), config)
    room = await directory.room(message.rid)
    inserted_at = None if oplog is None else await insert_time(oplog, message)
    seen_at = message.ts if inserted_at is None else inserted_at
    result = await decide_message(directory, message, settings, config, now=seen_at)
    out.write(_headline(message, room))
    if inserted_at is None:
        out.write("inserted: not in the oplog any more, taken as the message's timestamp\n")
    else:
        out.write(f"inserted: {_utc(inserted_at)} (from the oplog)\n")
    if result.skipped is not None:
        out.write(f"nobody is notified: {_because(result.skipped)}\n")
        return
    users = await directory.users([d.uid for d in result.decisions])
    decisions = _chosen(result.decisions, users, user, message.rid)
    out.write("decided as at the message's insert, with preferences, presence and devices as now\n")
    for decision in decisions:
        since = (away or {}).get(decision.uid)
        out.write(_recipient(decision, users.get(decision.uid), settings, config, now, since))


def _chosen(
    decisions: list[Decision], users: dict[str, User], wanted: str | None, rid: str
) -> list[Decision]:
    if wanted is None:
        return decisions
    chosen = [
        d for d in decisions if wanted in (d.uid, users[d.uid].username if d.uid in users else "")
    ]
    if not chosen:
        raise ExplainError(f"user {wanted!r} is not a member of room {rid!r}")
    return chosen


async def insert_time(oplog: AsyncCollection[Doc], message: Message) -> float | None:
    """When the message was inserted, from the oplog; None once it has rolled off.

    The search starts shortly before the message's timestamp, which an insert
    never precedes by more than a client clock's error: the oplog is read from
    there, not scanned whole.
    """
    start = Timestamp(max(0, int(message.ts) - INSERT_SEARCH_SLACK), 0)
    query = {"ts": {"$gte": start}, "ns": {"$regex": f"\\.{MESSAGES}$"}, "op": "i"}
    try:
        entry = await oplog.find_one({**query, "o._id": message.id}, {"ts": 1}, max_time_ms=10_000)
    except PyMongoError:
        return None
    at = None if entry is None else entry.get("ts")
    return float(at.time) if isinstance(at, Timestamp) else None


def _utc(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _headline(message: Message, room: Room | None) -> str:
    at = _utc(message.ts)
    where = message.rid
    if room is not None:
        label = room.fname or room.name
        where = f"{label} ({room.id}, {ROOM_KINDS[room.type]})" if label else where
    thread = f", thread {message.tmid}" if message.tmid else ""
    sender = message.sender.username or message.sender.id
    return f"message {message.id} in {where}{thread} from {sender} at {at}\n"


def _recipient(
    decision: Decision,
    user: User | None,
    settings: Settings,
    config: Config,
    now: float,
    away_since: float | None,
) -> str:
    name = f"{user.username} ({decision.uid})" if user and user.username else decision.uid
    lines = [
        f"\n{name}, {decision.status}\n",
        f"  push:  {_verdict(decision.push, decision.push_reason)}\n",
        f"  email: {_verdict(decision.email, decision.email_reason)}\n",
    ]
    if decision.push or decision.email:
        lines.append(f"  queue: {_timing(decision, user, settings, config, now, away_since)}\n")
    return "".join(lines)


def _verdict(sends: bool, reason: Reason) -> str:
    return f"{'yes' if sends else 'no'}, {_because(reason)}"


def _because(reason: Reason) -> str:
    return f"{reason.value} [{reason.code}]"


def _timing(
    decision: Decision,
    user: User | None,
    settings: Settings,
    config: Config,
    now: float,
    away_since: float | None,
) -> str:
    """When the queue would send it were the message posted now (SPEC §5)."""
    if away_since is None and user is not None:
        away_since = user.updated_at
    due = due_at(decision.status, now, config.queue, away_since, settings.always_notify_mobile)
    delay = max(0.0, due - now)
    when = "sent at once" if delay < 1 else f"sent after {delay:.0f} s unless read first"
    if settings.always_notify_mobile:
        return f"{when} (always notify mobile is on)"
    return f"{when} (the user is {decision.status})"
