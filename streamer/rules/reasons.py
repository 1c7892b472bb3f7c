"""Every reason a decision can give, defined once.

A member's value is the plain-words explanation shown in logs and by
`streamer explain`; `.code` is the stable snake_case name used as the metric
label and the `reason` log field; `.notifies` says whether the reason sends.
"""

from __future__ import annotations

import enum


class Reason(enum.Enum):
    # Why a notification is sent.
    DIRECT_MESSAGE = "it is a direct message"
    MENTIONED = "the user is mentioned by name (or through a team they belong to)"
    HIGHLIGHTED = "the message contains one of the user's highlight words"
    THREAD_PARTICIPANT = "the user takes part in the thread"
    PREFERENCE_ALL = "the user's notification preference for this room is 'All messages'"
    ALL_MENTIONED = "the message mentions @all"

    # Why the whole message notifies nobody.
    MESSAGE_HIDDEN = "the message is hidden"
    MESSAGE_EDITED = "the message is an edit, not a new message"
    SYSTEM_MESSAGE = "it is a system message (user joined, room renamed, ...)"
    MESSAGE_TOO_OLD = (
        "the message's timestamp is more than 60 s away from when it was seen (import or replay)"
    )
    OMNICHANNEL_AGENT_SENDER = "the agent wrote it in an omnichannel room"
    ROOM_NOT_FOUND = "the message's room is missing or its document is malformed"
    MALFORMED_DOCUMENT = "a document needed for the decision is malformed (see the log)"

    # Why one recipient gets nothing.
    NOTIFICATIONS_DISABLED = (
        "notifications are off for the server (Troubleshoot_Disable_Notifications)"
    )
    SENDER_IS_RECIPIENT = "the user wrote the message"
    USER_NOT_FOUND = "the user's document is missing or malformed"
    USER_INACTIVE = "the user is deactivated"
    THREAD_NOT_PARTICIPANT = "it is a thread reply and the user neither takes part nor is mentioned"
    ROOM_NOTIFICATIONS_DISABLED = "the user disabled notifications for this room"
    SENDER_IGNORED = "the user ignores the sender"
    GROUP_MENTIONS_MUTED = "the user mutes @all/@here in this room and is not mentioned by name"
    DM_PERMISSION_MISSING = "the user's roles lack the view-d-room permission for direct messages"
    PREFERENCE_NOTHING = "the user's notification preference for this room is 'Nothing'"
    LARGE_ROOM = (
        "the room has more active members than Notifications_Max_Room_Members and the user "
        "is not mentioned, highlighted, in the thread, nor set to 'All messages' for the room"
    )
    HERE_NEVER_PUSHES = "@here is not a mention: it never notifies by itself"
    NOT_MENTIONED = "the user's preference is 'Mentions' and the message does not mention them"

    # Push only.
    PUSH_DISABLED = "push is off for the server (Push_enable)"
    USER_BUSY = "the user's status is Busy"
    CALL_RINGS = (
        "it is a call in a direct message and the user's phone rings for it instead "
        "(VideoConf_Mobile_Ringing)"
    )
    NO_DEVICE = "the user has no enabled push token (not logged in on a mobile app)"

    # Email only.
    EMAIL_DISABLED = (
        "email notifications are off (Accounts_AllowEmailNotifications or [email] enabled)"
    )
    NO_EMAIL_ADDRESS = "the user has no verified email address"
    USER_ONLINE_ON_DESKTOP = "the user is connected (statusConnection online), so no email"

    # Fire-time re-check: why a queued notification is dropped.
    MESSAGE_DELETED = "the message was deleted before the notification was due"
    ALREADY_READ = "the user read the room before the notification was due"
    NOT_A_MEMBER = "the user is no longer a member of the room"

    @property
    def code(self) -> str:
        """The stable snake_case code: a metric label and the `reason` log field."""
        return self.name.lower()

    @property
    def notifies(self) -> bool:
        return self in _NOTIFYING


_NOTIFYING: frozenset[Reason] = frozenset(
    {
        Reason.DIRECT_MESSAGE,
        Reason.MENTIONED,
        Reason.HIGHLIGHTED,
        Reason.THREAD_PARTICIPANT,
        Reason.PREFERENCE_ALL,
        Reason.ALL_MENTIONED,
    }
)
