"""Per-recipient decision (SPEC §4): push yes/no and email yes/no, each with its reason.

Everything that depends only on the message is computed once in `plan_message`;
`decide` then does a handful of attribute reads and set look-ups per recipient,
so a 10,000-member @all room is decided in a few tens of milliseconds.

The rules implement Rocket.Chat's intended behaviour, not its 7.x defects: the
room preference is `mobilePushNotifications` (not the nonexistent `mobilePush`),
and a large room still notifies explicit mentions, highlights, thread
participants, direct messages and an explicit room preference 'All messages'.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamer.config import Config
from streamer.model import (
    GROUP_MENTIONS,
    Message,
    Presence,
    PushPreference,
    Room,
    Settings,
    Subscription,
    User,
)
from streamer.rules.highlights import highlight_text, is_highlighted
from streamer.rules.reasons import Reason


@dataclass(frozen=True, slots=True)
class Decision:
    """What one recipient gets for one message, and why; `status` lets the queue schedule."""

    uid: str
    rid: str
    mid: str
    push: bool
    push_reason: Reason
    email: bool
    email_reason: Reason
    status: Presence


@dataclass(frozen=True, slots=True)
class MessagePlan:
    """The per-message half of every decision, precomputed once."""

    rid: str
    mid: str
    sender_id: str
    is_dm: bool
    is_thread: bool
    #: A DM's members take part in a thread of it until its first reply is counted;
    #: Rocket.Chat then writes them into the parent's `replies`, which rule after that
    #: (a member who unfollowed the thread is left out).
    dm_members_in_thread: bool
    #: Active members above Notifications_Max_Room_Members (never for a DM).
    large: bool
    #: Thread participants: the parent's `replies` and its author.
    participants: frozenset[str]
    #: Users mentioned by name, directly or through a mentioned team.
    mentioned: frozenset[str]
    mentions_all: bool
    mentions_here: bool
    #: The text highlights are matched against (see `highlights.highlight_text`).
    highlight_text: str
    #: Troubleshoot_Disable_Notifications: Rocket.Chat then sends nothing at all.
    notifications_off: bool
    push_enabled: bool
    email_enabled: bool
    busy_blocks_push: bool
    default_push: PushPreference
    default_email: PushPreference
    #: Roles holding view-d-room; None when the permission is not configured.
    dm_roles: frozenset[str] | None
    #: A call in a 1:1 DM with ringing on: whether each callee's phone rings depends
    #: on their preference, else `default_ringing`.
    call_rings: bool = False
    default_ringing: bool = False


def plan_message(
    message: Message,
    room: Room,
    settings: Settings,
    config: Config,
    *,
    parent: Message | None = None,
    team_members: frozenset[str] = frozenset(),
    active_members: int = 0,
    dm_roles: frozenset[str] | None = None,
) -> MessagePlan:
    """Precompute the message's side of the rules.

    `settings` must already carry the config overrides (`override_settings`);
    `team_members` is the union of the members of every team the message
    mentions; `active_members` counts the room's active members (0 = unknown,
    never large).
    """
    mention_ids = {m.id for m in message.mentions if m.type != "team"}
    is_dm = room.type == "d"
    limit = settings.max_room_members
    participants: frozenset[str] = frozenset()
    if message.tmid is not None and parent is not None:
        participants = frozenset((*parent.replies, parent.sender.id))
    return MessagePlan(
        rid=message.rid,
        mid=message.id,
        sender_id=message.sender.id,
        is_dm=is_dm,
        # A reply also sent to the room is a room message too (Rocket.Chat's `tshow`).
        is_thread=message.tmid is not None and not message.shown_in_room,
        dm_members_in_thread=is_dm and (parent is None or parent.thread_count == 0),
        large=not is_dm and limit > 0 and active_members > limit,
        participants=participants,
        mentioned=frozenset(mention_ids - GROUP_MENTIONS) | team_members,
        mentions_all="all" in mention_ids,
        mentions_here="here" in mention_ids,
        # An e2e message's text is its ciphertext: a short highlight would match its
        # base64 at random, as '+' and '/' count as word boundaries.
        highlight_text="" if message.encrypted else highlight_text(message.text),
        notifications_off=settings.troubleshoot_disable_notifications,
        push_enabled=settings.push_enable,
        email_enabled=settings.allow_email_notifications and config.email.enabled,
        busy_blocks_push=config.rules.busy_blocks_push,
        default_push=settings.default_push_preference,
        default_email=settings.default_email_preference,
        dm_roles=dm_roles,
        call_rings=(
            message.type == "videoconf"
            and is_dm
            and room.users_count == 2
            and settings.videoconf_mobile_ringing
        ),
        default_ringing=settings.default_mobile_ringing,
    )


def decide(plan: MessagePlan, sub: Subscription, user: User | None, has_device: bool) -> Decision:
    """The decision for the holder of `sub`; never raises on any parsed documents."""
    uid = sub.uid
    if user is None:
        return _nothing(plan, uid, Reason.USER_NOT_FOUND, "offline")
    mentioned = uid in plan.mentioned
    participant = uid in plan.participants
    blocked = _blocked(plan, sub, user, mentioned or participant)
    if blocked is not None:
        return _nothing(plan, uid, blocked, user.status)
    highlighted = bool(sub.user_highlights) and is_highlighted(
        plan.highlight_text, sub.user_highlights
    )
    push = _push_reason(plan, sub, user, has_device, mentioned, highlighted, participant)
    email = _email_reason(plan, sub, user, mentioned, highlighted, participant)
    return Decision(
        uid, plan.rid, plan.mid, push.notifies, push, email.notifies, email, user.status
    )


def _nothing(plan: MessagePlan, uid: str, reason: Reason, status: Presence) -> Decision:
    return Decision(uid, plan.rid, plan.mid, False, reason, False, reason, status)


def _blocked(plan: MessagePlan, sub: Subscription, user: User, named: bool) -> Reason | None:
    """The rules that stop push and email alike; `named`: mentioned or thread participant."""
    if plan.notifications_off:
        return Reason.NOTIFICATIONS_DISABLED
    if sub.uid == plan.sender_id:
        return Reason.SENDER_IS_RECIPIENT
    if not user.active:
        return Reason.USER_INACTIVE
    if plan.is_thread and not named and not plan.dm_members_in_thread:
        return Reason.THREAD_NOT_PARTICIPANT
    if sub.disable_notifications:
        return Reason.ROOM_NOTIFICATIONS_DISABLED
    if plan.sender_id in sub.ignored:
        return Reason.SENDER_IGNORED
    if sub.mute_group_mentions and not named and (plan.mentions_all or plan.mentions_here):
        return Reason.GROUP_MENTIONS_MUTED
    if plan.is_dm and plan.dm_roles is not None and plan.dm_roles.isdisjoint(user.roles):
        return Reason.DM_PERMISSION_MISSING
    return None


def _push_reason(
    plan: MessagePlan,
    sub: Subscription,
    user: User,
    has_device: bool,
    mentioned: bool,
    highlighted: bool,
    participant: bool,
) -> Reason:
    if not plan.push_enabled:
        return Reason.PUSH_DISABLED
    preference = _effective(sub.mobile_push, user.push_preference, plan.default_push)
    if preference == "nothing":
        return Reason.PREFERENCE_NOTHING
    if plan.call_rings and _rings(user.mobile_ringing, plan.default_ringing):
        return Reason.CALL_RINGS
    chosen = "default" if sub.mobile_push_inherited else sub.mobile_push
    reason = _relevance(plan, chosen, preference, mentioned, highlighted, participant)
    if not reason.notifies:
        return reason
    if plan.busy_blocks_push and user.status == "busy":
        return Reason.USER_BUSY
    if not has_device:
        return Reason.NO_DEVICE
    return reason


def _email_reason(
    plan: MessagePlan,
    sub: Subscription,
    user: User,
    mentioned: bool,
    highlighted: bool,
    participant: bool,
) -> Reason:
    if not plan.email_enabled:
        return Reason.EMAIL_DISABLED
    if user.email is None:
        return Reason.NO_EMAIL_ADDRESS
    preference = _effective(sub.email_notifications, user.email_preference, plan.default_email)
    if preference == "nothing":
        return Reason.PREFERENCE_NOTHING
    chosen = "default" if sub.email_inherited else sub.email_notifications
    reason = _relevance(plan, chosen, preference, mentioned, highlighted, participant)
    if reason.notifies and user.status_connection == "online":
        return Reason.USER_ONLINE_ON_DESKTOP
    return reason


def _rings(preference: bool | None, default: bool) -> bool:
    return default if preference is None else preference


def _effective(
    room: PushPreference, account: PushPreference | None, server: PushPreference
) -> PushPreference:
    """Room preference, else the user's account preference, else the server default."""
    if room != "default":
        return room
    if account is not None and account != "default":
        return account
    return server


def _relevance(
    plan: MessagePlan,
    room_preference: PushPreference,
    preference: PushPreference,
    mentioned: bool,
    highlighted: bool,
    participant: bool,
) -> Reason:
    """Whether the message concerns the user enough, given their preference and room size."""
    if plan.is_dm:
        return Reason.DIRECT_MESSAGE
    if mentioned:
        return Reason.MENTIONED
    if highlighted:
        return Reason.HIGHLIGHTED
    if participant:
        return Reason.THREAD_PARTICIPANT
    if plan.large:
        return Reason.PREFERENCE_ALL if room_preference == "all" else Reason.LARGE_ROOM
    if preference == "all":
        return Reason.PREFERENCE_ALL
    if plan.mentions_all:
        return Reason.ALL_MENTIONED
    if plan.mentions_here:
        return Reason.HERE_NEVER_PUSHES
    return Reason.NOT_MENTIONED
