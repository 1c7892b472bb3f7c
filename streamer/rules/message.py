"""Message-level rules (SPEC §3): messages that notify nobody, whoever the recipient."""

from __future__ import annotations

from streamer.model import NOTIFYING_MESSAGE_TYPES, Message, Room
from streamer.rules.reasons import Reason

#: A main-room message whose `ts` is further than this from when it is seen is
#: an import or a replay, not a live message.
MAX_CLOCK_DISTANCE = 60.0


def message_skip_reason(
    message: Message, room: Room, now: float, *, sender_is_agent: bool = False
) -> Reason | None:
    """Why nobody is notified of this newly inserted message, or None.

    `sender_is_agent`: in an omnichannel room, whether the sender is the agent
    (the caller knows: agents hold a subscription to the room, visitors do not).
    """
    if message.edited:
        return Reason.MESSAGE_EDITED
    if message.tmid is None and abs(message.ts - now) > MAX_CLOCK_DISTANCE:
        return Reason.MESSAGE_TOO_OLD
    return standing_skip_reason(message, room, sender_is_agent=sender_is_agent)


def standing_skip_reason(
    message: Message, room: Room, *, sender_is_agent: bool = False
) -> Reason | None:
    """The message-level rules that still hold when a queued notification is due.

    Age and edits are left out: by then the message is older, and an edit made
    meanwhile does not make it any less unread.
    """
    if message.hidden:
        return Reason.MESSAGE_HIDDEN
    if message.type not in NOTIFYING_MESSAGE_TYPES:
        return Reason.SYSTEM_MESSAGE
    if room.type == "l" and sender_is_agent:
        return Reason.OMNICHANNEL_AGENT_SENDER
    return None
