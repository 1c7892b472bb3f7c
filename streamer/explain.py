"""`streamer explain`: why did (or didn't) a user get a notification for a message?

Runs the daemon's own decision (`decide_message`) over the live database and
prints it in plain words: for each member of the room (or one), push and email
yes/no with the reason, and when the queue would send it. The decision is made
as at the message's insert (so an old message is not "too old"); preferences,
presence and devices are read as they are now.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Mapping
from typing import Any, TextIO

import anyio
from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from streamer.config import Config, override_settings
from streamer.decisions import decide_message
from streamer.directory import DatabaseDirectory, Directory, one_message
from streamer.model import Message, Room, Settings, User
from streamer.queue.policy import due_at
from streamer.rules import Decision, Reason
from streamer.sources.cache import load_away_since

Doc = dict[str, Any]
#: Seconds to wait for MongoDB before giving up, unless the URI says otherwise.
MONGO_TIMEOUT_MS = 5000
ROOM_KINDS = {"c": "channel", "p": "private group", "d": "direct message", "l": "omnichannel"}


class ExplainError(Exception):
    """What to explain cannot be found; the message says what was looked for."""


def main(config: Config, message_id: str, user: str | None, out: TextIO, err: TextIO) -> int:
    """The `streamer explain` command: 0 when explained, 1 when it cannot be."""
    try:
        anyio.run(_explain_live, config, message_id, user, out)
    except ExplainError as exc:
        err.write(f"streamer explain: {exc}\n")
        return 1
    except PyMongoError as exc:
        err.write(f"streamer explain: cannot read MongoDB ({config.mongo.database}): {exc}\n")
        return 1
    return 0


async def _explain_live(config: Config, message_id: str, user: str | None, out: TextIO) -> None:
    uri_sets_timeout = "serverselectiontimeoutms" in config.mongo.uri.lower()
    options: Doc = {} if uri_sets_timeout else {"serverSelectionTimeoutMS": MONGO_TIMEOUT_MS}
    client: AsyncMongoClient[Doc] = AsyncMongoClient(config.mongo.uri, **options)
    try:
        db = client[config.mongo.database]
        away = await load_away_since(db[config.mongo.state_collection])
        await explain(
            DatabaseDirectory(db), message_id, config, out, user=user, now=time.time(), away=away
        )
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
) -> None:
    """Print the decision for every recipient of `message_id`, or only `user` (name or id).

    `away`: when each away user turned away, as the daemon recorded it; a user
    missing from it counts as away since their document last changed (SPEC §5).
    Raises `ExplainError` when the message, its room or the user cannot be found.
    """
    message = await one_message(directory, message_id)
    if message is None:
        raise ExplainError(f"message {message_id!r} not found (or its document is malformed)")
    settings = override_settings(await directory.settings(), config)
    room = await directory.room(message.rid)
    result = await decide_message(directory, message, settings, config, now=message.ts)
    out.write(_headline(message, room))
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


def _headline(message: Message, room: Room | None) -> str:
    at = dt.datetime.fromtimestamp(message.ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
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
