"""Decisions for a message: gather the documents through a `Directory`, let the rules decide.

The I/O half of the rules. `decide_message` runs when a message is inserted;
`recheck` runs when a queued notification is due, so a user who read the room,
disabled notifications or lost their device meanwhile is not notified anyway.
Both take `settings` already overridden by the config (`override_settings`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import structlog

from streamer import metrics
from streamer.config import Config
from streamer.directory import VIEW_DIRECT_MESSAGES, Directory, one_message
from streamer.model import MalformedDocument, Message, Room, Settings, Subscription, User
from streamer.rules import (
    Decision,
    MessagePlan,
    Reason,
    decide,
    message_skip_reason,
    plan_message,
    standing_skip_reason,
)

log = structlog.get_logger("streamer.decisions")

#: Errors that mean "the data has a shape nobody expected", as opposed to I/O
#: failures (which propagate so the caller retries).
_DATA_ERRORS = (MalformedDocument, LookupError, TypeError, ValueError, AttributeError)


@dataclass
class MessageDecisions:
    """`skipped` says why nobody is notified; else one decision per room member."""

    skipped: Reason | None
    decisions: list[Decision] = field(default_factory=list)


async def decide_message(
    directory: Directory, message: Message, settings: Settings, config: Config, now: float
) -> MessageDecisions:
    """Decide push and email for every member of the message's room; never raises on bad data.

    Not counted in the metrics here: the caller counts (`decision_counts`) once what
    it decided is queued, so a batch handed on again is not counted twice.
    """
    try:
        result = await _decide_message(directory, message, settings, config, now)
    except _DATA_ERRORS as exc:
        log.error("decision_failed", mid=message.id, rid=message.rid, error=repr(exc))
        result = MessageDecisions(Reason.MALFORMED_DOCUMENT)
    _log(message, result)
    return result


def _log(message: Message, result: MessageDecisions) -> None:
    """One info line per message with every reason counted, so "why no push?" is in the
    logs without a line per member of a 10,000-member room; per-recipient lines are debug."""
    not_pushed: Counter[str] = Counter()
    for decision in result.decisions:
        if not decision.push:
            not_pushed[decision.push_reason.code] += 1
        log.debug(
            "decision",
            uid=decision.uid,
            rid=decision.rid,
            mid=decision.mid,
            push=decision.push,
            reason=decision.push_reason.code,
            email=decision.email,
            email_reason=decision.email_reason.code,
        )
    log.info(
        "message_decided",
        mid=message.id,
        rid=message.rid,
        reason=None if result.skipped is None else result.skipped.code,
        pushes=sum(d.push for d in result.decisions),
        emails=sum(d.email for d in result.decisions),
        not_pushed=dict(not_pushed),
    )


async def _decide_message(
    directory: Directory, message: Message, settings: Settings, config: Config, now: float
) -> MessageDecisions:
    room = await directory.room(message.rid)
    if room is None:
        return MessageDecisions(Reason.ROOM_NOT_FOUND)
    agent = await _sender_is_agent(directory, message, room)
    skipped = message_skip_reason(message, room, now, sender_is_agent=agent)
    if skipped is not None:
        return MessageDecisions(skipped)
    subscriptions = _one_per_user(await directory.subscriptions(message.rid))
    users = await directory.users(subscriptions)
    active = sum(1 for user in users.values() if user.active)
    plan = await _plan(directory, message, room, settings, config, active)
    decisions = [decide(plan, sub, users.get(uid), True) for uid, sub in subscriptions.items()]
    decisions = await _check_devices(directory, plan, decisions, subscriptions, users)
    return MessageDecisions(None, decisions)


async def _check_devices(
    directory: Directory,
    plan: MessagePlan,
    decisions: list[Decision],
    subscriptions: dict[str, Subscription],
    users: dict[str, User],
) -> list[Decision]:
    """Look up push tokens only for the recipients a push is for, then decide those again."""
    wanted = [d.uid for d in decisions if d.push]
    if not wanted:
        return decisions
    devices = await directory.devices(wanted)
    with_device = {uid for uid, tokens in devices.items() if any(t.enabled for t in tokens)}
    return [
        decide(plan, subscriptions[d.uid], users.get(d.uid), False)
        if d.push and d.uid not in with_device
        else d
        for d in decisions
    ]


async def recheck(
    directory: Directory,
    uid: str,
    message: Message,
    kind: Literal["push", "email"],
    settings: Settings,
    config: Config,
    now: float,
) -> Reason | None:
    """At fire time: None if the notification should still go out, else why to drop it.

    `message` is the message as read now: the caller reads it, once for a whole
    batch of due entries, and sends that same copy (a deleted one is its to drop).

    The message-age check and presence delays are not applied (the entry was
    due, and the message is older by now); neither is the room-size limit,
    which belongs to the moment the message was sent. So no rule applied here
    depends on `now`; it is taken so callers pass time the same way everywhere.
    """
    try:
        return await _recheck(directory, uid, message, kind, settings, config)
    except _DATA_ERRORS as exc:
        log.error("recheck_failed", uid=uid, mid=message.id, error=repr(exc))
        return Reason.MALFORMED_DOCUMENT


async def _recheck(
    directory: Directory,
    uid: str,
    message: Message,
    kind: Literal["push", "email"],
    settings: Settings,
    config: Config,
) -> Reason | None:
    room = await directory.room(message.rid)
    if room is None:
        return Reason.ROOM_NOT_FOUND
    sub = await directory.subscription(uid, message.rid)
    if sub is None:
        return Reason.NOT_A_MEMBER
    if sub.ls is not None and sub.ls >= message.ts:
        return Reason.ALREADY_READ
    agent = await _sender_is_agent(directory, message, room)
    skipped = standing_skip_reason(message, room, sender_is_agent=agent)
    if skipped is not None:
        return skipped
    user = (await directory.users([uid])).get(uid)
    plan = await _plan(directory, message, room, settings, config, active_members=0)
    has_device = kind == "push" and await _has_device(directory, uid)
    decision = decide(plan, sub, user, has_device)
    if kind == "push":
        return None if decision.push else decision.push_reason
    return None if decision.email else decision.email_reason


async def _plan(
    directory: Directory,
    message: Message,
    room: Room,
    settings: Settings,
    config: Config,
    active_members: int,
) -> MessagePlan:
    """Fetch what the message's side of the rules needs: thread parent, teams, DM roles."""
    parent = None if message.tmid is None else await one_message(directory, message.tmid)
    team_members: frozenset[str] = frozenset()
    for mention in message.mentions:
        if mention.type == "team":
            team_members |= await directory.team_members(mention.id)
    dm_roles = None
    if room.type == "d":
        dm_roles = await directory.roles_with_permission(VIEW_DIRECT_MESSAGES)
    return plan_message(
        message,
        room,
        settings,
        config,
        parent=parent,
        team_members=team_members,
        active_members=active_members,
        dm_roles=dm_roles,
    )


async def _has_device(directory: Directory, uid: str) -> bool:
    return any(t.enabled for t in (await directory.devices([uid])).get(uid, []))


def _one_per_user(subscriptions: list[Subscription]) -> dict[str, Subscription]:
    """Subscriptions by user; a duplicate subscription (it happens) does not double-notify."""
    by_user: dict[str, Subscription] = {}
    for sub in subscriptions:
        by_user.setdefault(sub.uid, sub)
    return by_user


async def _sender_is_agent(directory: Directory, message: Message, room: Room) -> bool:
    """In an omnichannel room, agents hold a subscription; the visitor does not."""
    if room.type != "l":
        return False
    return await directory.subscription(message.sender.id, message.rid) is not None


def decision_counts(result: MessageDecisions) -> Counter[tuple[str, str]]:
    """(channel, reason code) → decisions: what `count_decisions` adds to the metric."""
    if result.skipped is not None:
        return Counter({("message", result.skipped.code): 1})
    counts: Counter[tuple[str, str]] = Counter()
    for decision in result.decisions:
        counts["push", decision.push_reason.code] += 1
        counts["email", decision.email_reason.code] += 1
    return counts


def count_decisions(counts: Counter[tuple[str, str]]) -> None:
    """One metric update per distinct (channel, reason), however many recipients."""
    for (channel, reason), n in counts.items():
        metrics.DECISIONS.labels(channel, reason).inc(n)
