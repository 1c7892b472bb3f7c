"""Typed views of Rocket.Chat documents, built by tolerant parsers.

Rocket.Chat's field names appear here and nowhere else. Parsers accept what
Rocket.Chat really writes (missing optional fields, `null`s, naive datetimes)
and reject a document only when it cannot be acted on, raising
`MalformedDocument` with the collection, the `_id` and why — so the caller can
log one clear line and move on instead of crashing the stream.

Times are float seconds since the epoch (UTC) throughout the pure core: cheap to
compare, heap-friendly, and free of timezone mistakes.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

RoomType = Literal["c", "p", "d", "l"]
PushPreference = Literal["default", "all", "mentions", "nothing"]
Presence = Literal["online", "away", "busy", "offline"]
TokenKind = Literal["apn", "gcm"]

ROOM_TYPES: frozenset[str] = frozenset({"c", "p", "d", "l"})
PUSH_PREFERENCES: frozenset[str] = frozenset({"default", "all", "mentions", "nothing"})
PRESENCES: frozenset[str] = frozenset({"online", "away", "busy", "offline"})
#: Rocket.Chat's UserStatus also has "disabled" (presence turned off, a deactivated
#: user): for the queue's delays that user is offline.
_STATUS_ALIASES = {"disabled": "offline"}
#: Message types that are ordinary messages; any other `t` is a system message.
NOTIFYING_MESSAGE_TYPES: frozenset[str | None] = frozenset({None, "e2e", "videoconf"})
#: The special mention targets; they are not user ids.
GROUP_MENTIONS: frozenset[str] = frozenset({"all", "here"})

# Collection names (Rocket.Chat's), in one place.
MESSAGES = "rocketchat_message"
SUBSCRIPTIONS = "rocketchat_subscription"
ROOMS = "rocketchat_room"
USERS = "users"
SETTINGS = "rocketchat_settings"
PUSH_TOKENS = "_raix_push_app_tokens"
WORKSPACE_CREDENTIALS = "rocketchat_workspace_credentials"
TEAM_MEMBERS = "rocketchat_team_member"
PERMISSIONS = "rocketchat_permissions"
STATISTICS = "rocketchat_statistics"


class MalformedDocument(ValueError):
    """A document that cannot be acted on; the message names the collection and `_id`."""

    def __init__(self, collection: str, doc_id: object, why: str) -> None:
        why = shortened(why)
        super().__init__(f"{collection} document {doc_id!r} skipped: {why}")
        self.collection = collection
        self.doc_id = doc_id
        self.why = why


#: Longest explanation of a bad value kept: a why quotes the value, which may be megabytes.
WHY_LIMIT = 300


def shortened(text: str) -> str:
    """`text` cut to `WHY_LIMIT` characters, saying how long it was: log lines stay small."""
    if len(text) <= WHY_LIMIT:
        return text
    return f"{text[:WHY_LIMIT]}… ({len(text)} characters)"


def presence_of(status: object) -> Presence | None:
    """A user's `status` as a presence (none set: offline); None if Rocket.Chat
    writes no such status."""
    if status is None or status == "":
        return "offline"
    if isinstance(status, str):
        status = _STATUS_ALIASES.get(status, status)
        if status in PRESENCES:
            return cast(Presence, status)
    return None


def finite_number(value: object) -> float | None:
    """An int or a float other than NaN and ±Infinity (a BSON double may hold them;
    they break `int()`, dates and every comparison), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def to_epoch(value: object) -> float | None:
    """A BSON date (naive = UTC, as pymongo returns it), an epoch number, or None."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.timestamp()
    return finite_number(value)


class _Reader:
    """Reads typed fields out of one document, raising `MalformedDocument` on bad ones."""

    __slots__ = ("collection", "doc", "doc_id")
    doc_id: str

    def __init__(self, collection: str, doc: object) -> None:
        if not isinstance(doc, Mapping):
            raise MalformedDocument(collection, None, f"not a document: {type(doc).__name__}")
        self.collection = collection
        self.doc: Mapping[str, Any] = doc
        doc_id = doc.get("_id")
        if not isinstance(doc_id, str) or not doc_id:
            raise MalformedDocument(collection, doc_id, "_id is not a non-empty string")
        self.doc_id = doc_id

    def fail(self, why: str) -> MalformedDocument:
        return MalformedDocument(self.collection, self.doc_id, why)

    def required_str(self, key: str, source: Mapping[str, Any] | None = None) -> str:
        value = (self.doc if source is None else source).get(key)
        if not isinstance(value, str) or not value:
            raise self.fail(f"{key} is missing or not a string")
        return value

    def optional_str(self, key: str, source: Mapping[str, Any] | None = None) -> str | None:
        value = (self.doc if source is None else source).get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail(f"{key} is not a string")
        return value

    def flag(self, key: str) -> bool:
        """Rocket.Chat stores flags loosely; only an explicit true counts."""
        return self.doc.get(key) is True

    def time(self, key: str) -> float | None:
        value = self.doc.get(key)
        if value is None:
            return None
        epoch = to_epoch(value)
        if epoch is None:
            raise self.fail(f"{key} is not a date")
        return epoch

    def count(self, key: str) -> int:
        value = self.doc.get(key)
        if value is None:
            return 0
        number = finite_number(value)
        if number is None:
            raise self.fail(f"{key} is not a number")
        return int(number)

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.doc.get(key)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(f"{key} is not a list")
        return tuple(v for v in value if isinstance(v, str))

    def sub(self, key: str) -> Mapping[str, Any]:
        value = self.doc.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(f"{key} is not a sub-document")
        return value

    def choice(self, key: str, allowed: frozenset[str], default: str) -> str:
        value = self.doc.get(key)
        if value is None or value == "":
            return default
        if not isinstance(value, str) or value not in allowed:
            raise self.fail(f"{key}={value!r} is not one of {sorted(allowed)}")
        return str(value)


@dataclass(frozen=True, slots=True)
class UserRef:
    id: str
    username: str
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Mention:
    """`id` is a user id, a team id (`type == 'team'`), or 'all'/'here'."""

    id: str
    username: str | None = None
    type: str | None = None
    #: The mentioned user's real name, as Rocket.Chat stores it with the mention.
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    rid: str
    text: str
    ts: float
    sender: UserRef
    type: str | None = None
    tmid: str | None = None
    mentions: tuple[Mention, ...] = ()
    #: Thread participants, on a thread's parent message.
    replies: tuple[str, ...] = ()
    #: Replies counted on a thread's parent (0 until Rocket.Chat counted the first).
    thread_count: int = 0
    hidden: bool = False
    edited: bool = False
    has_attachments: bool = False
    #: The first attachment is an image (an upload without text is "an image").
    image_attached: bool = False
    #: A thread reply also sent to the room ("Also send to channel").
    shown_in_room: bool = False
    #: An e2e message's encrypted `content` ({algorithm, ciphertext}), for the apps.
    e2e_content: dict[str, str] | None = None

    @property
    def encrypted(self) -> bool:
        return self.type == "e2e"

    @classmethod
    def from_doc(cls, doc: object) -> Message:
        r = _Reader(MESSAGES, doc)
        u = r.sub("u")
        ts = r.time("ts")
        if ts is None:
            raise r.fail("ts is missing")
        return cls(
            id=r.doc_id,
            rid=r.required_str("rid"),
            text=r.optional_str("msg") or "",
            ts=ts,
            sender=UserRef(
                id=r.required_str("_id", u),
                username=r.optional_str("username", u) or "",
                name=r.optional_str("name", u),
            ),
            type=r.optional_str("t"),
            tmid=r.optional_str("tmid"),
            mentions=_mentions(r),
            replies=r.strings("replies"),
            thread_count=r.count("tcount"),
            hidden=r.flag("_hidden"),
            edited=r.doc.get("editedAt") is not None,
            has_attachments=bool(r.doc.get("attachments")),
            image_attached=_first_attachment_is_image(r.doc.get("attachments")),
            shown_in_room=r.flag("tshow"),
            e2e_content=_strings_only(r.doc.get("content")),
        )


def _first_attachment_is_image(attachments: object) -> bool:
    if not isinstance(attachments, list) or not attachments:
        return False
    first = attachments[0]
    return isinstance(first, Mapping) and bool(first.get("image_type") or first.get("image_url"))


def _strings_only(value: object) -> dict[str, str] | None:
    """A sub-document's string fields (safe to pass on as JSON); None if it has none."""
    if not isinstance(value, Mapping):
        return None
    found = {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}
    return found or None


def _mentions(r: _Reader) -> tuple[Mention, ...]:
    value = r.doc.get("mentions")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise r.fail("mentions is not a list")
    found = []
    for item in value:
        if isinstance(item, Mapping) and isinstance(item.get("_id"), str):
            username, kind, name = item.get("username"), item.get("type"), item.get("name")
            found.append(
                Mention(
                    id=item["_id"],
                    username=username if isinstance(username, str) else None,
                    type=kind if isinstance(kind, str) else None,
                    name=name if isinstance(name, str) and name else None,
                )
            )
    return tuple(found)


@dataclass(frozen=True, slots=True)
class Subscription:
    id: str
    rid: str
    uid: str
    room_type: RoomType
    name: str | None = None
    fname: str | None = None
    open: bool = True
    archived: bool = False
    alert: bool = False
    unread: int = 0
    #: Last seen: when the user last read the room.
    ls: float | None = None
    disable_notifications: bool = False
    ignored: frozenset[str] = frozenset()
    mute_group_mentions: bool = False
    mobile_push: PushPreference = "default"
    email_notifications: PushPreference = "default"
    #: The preference was copied from the account (`*PrefOrigin: 'user'`), not chosen
    #: for this room: it is no "explicit room preference" for the large-room rule.
    mobile_push_inherited: bool = False
    email_inherited: bool = False
    user_highlights: tuple[str, ...] = ()
    #: Thread ids with unread replies for this user.
    tunread: tuple[str, ...] = ()

    @classmethod
    def from_doc(cls, doc: object) -> Subscription:
        r = _Reader(SUBSCRIPTIONS, doc)
        return cls(
            id=r.doc_id,
            rid=r.required_str("rid"),
            uid=r.required_str("_id", r.sub("u")),
            room_type=r.choice("t", ROOM_TYPES, "c"),  # type: ignore[arg-type]
            name=r.optional_str("name"),
            fname=r.optional_str("fname"),
            open=r.doc.get("open") is not False,
            archived=r.flag("archived"),
            alert=r.flag("alert"),
            unread=r.count("unread"),
            ls=r.time("ls"),
            disable_notifications=r.flag("disableNotifications"),
            ignored=frozenset(r.strings("ignored")),
            mute_group_mentions=r.flag("muteGroupMentions"),
            mobile_push=r.choice(  # type: ignore[arg-type]
                "mobilePushNotifications", PUSH_PREFERENCES, "default"
            ),
            email_notifications=r.choice(  # type: ignore[arg-type]
                "emailNotifications", PUSH_PREFERENCES, "default"
            ),
            mobile_push_inherited=r.doc.get("mobilePrefOrigin") == "user",
            email_inherited=r.doc.get("emailPrefOrigin") == "user",
            user_highlights=r.strings("userHighlights"),
            tunread=r.strings("tunread"),
        )


@dataclass(frozen=True, slots=True)
class Room:
    id: str
    type: RoomType
    name: str | None = None
    fname: str | None = None
    users_count: int = 0
    team_id: str | None = None
    team_main: bool = False
    #: Read-only (`ro`) and the usernames muted in it: who may not answer a push.
    read_only: bool = False
    muted: frozenset[str] = frozenset()
    #: A direct message's members by username (what names a group DM with no name).
    usernames: tuple[str, ...] = ()
    #: A discussion (`prid` set): it goes by its display name.
    discussion: bool = False

    @property
    def group_chat(self) -> bool:
        """Rocket.Chat's `isGroupChat`: channels, groups and DMs of more than two."""
        return self.type in ("c", "p") or (self.type == "d" and self.users_count > 2)

    def title(self, recipient: str, special_chars: bool) -> str:
        """What Rocket.Chat calls the room (`roomName`) for `recipient`: a channel or
        group by its name, unless names may hold special characters
        (UI_Allow_room_names_with_special_chars), which only the display name keeps; a
        discussion or a DM by its display name; a DM without one by its other members."""
        if self.type == "d" or self.discussion or special_chars:
            named = self.fname or self.name
        else:
            named = self.name or self.fname
        return named or ", ".join(u for u in self.usernames if u != recipient) or self.id

    @classmethod
    def from_doc(cls, doc: object) -> Room:
        r = _Reader(ROOMS, doc)
        return cls(
            id=r.doc_id,
            type=r.choice("t", ROOM_TYPES, "c"),  # type: ignore[arg-type]
            name=r.optional_str("name"),
            fname=r.optional_str("fname"),
            users_count=r.count("usersCount"),
            team_id=r.optional_str("teamId"),
            team_main=r.flag("teamMain"),
            read_only=r.flag("ro"),
            muted=frozenset(r.strings("muted")),
            usernames=r.strings("usernames") if r.doc.get("t") == "d" else (),
            discussion=r.optional_str("prid") is not None,
        )

    def can_write(self, username: str) -> bool:
        """Rocket.Chat's rule for the push's reply button (some roles may write to a
        read-only room: a missing button is the accepted false negative)."""
        return not self.read_only and username not in self.muted


#: The user fields `User` reads: the projection of every users query, so the rest
#: (login tokens and password hashes in `services`, `__rooms`) stays in MongoDB.
USER_FIELDS: tuple[str, ...] = (
    "username",
    "name",
    "active",
    "status",
    "statusConnection",
    "emails",
    "settings.preferences",
    "roles",
    "_updatedAt",
)


@dataclass(frozen=True, slots=True)
class User:
    id: str
    username: str
    name: str | None = None
    active: bool = True
    status: Presence = "offline"
    status_connection: str | None = None
    #: The first verified email address, the only one mail goes to.
    email: str | None = None
    push_preference: PushPreference | None = None
    email_preference: PushPreference | None = None
    #: The account's "mobile ringing" preference for calls; None when not set.
    mobile_ringing: bool | None = None
    roles: tuple[str, ...] = ()
    updated_at: float | None = None

    @classmethod
    def from_doc(cls, doc: object) -> User:
        r = _Reader(USERS, doc)
        preferences = r.sub("settings").get("preferences")
        preferences = preferences if isinstance(preferences, Mapping) else {}
        return cls(
            id=r.doc_id,
            username=r.optional_str("username") or "",
            name=r.optional_str("name"),
            active=r.doc.get("active") is not False,
            status=_presence(r),
            status_connection=r.optional_str("statusConnection"),
            email=_first_verified_email(r.doc.get("emails")),
            push_preference=_preference(preferences.get("pushNotifications")),
            email_preference=_preference(preferences.get("emailNotificationMode")),
            mobile_ringing=_flag_or_unset(preferences.get("enableMobileRinging")),
            roles=r.strings("roles"),
            updated_at=r.time("_updatedAt"),
        )


def _flag_or_unset(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def _presence(r: _Reader) -> Presence:
    status = presence_of(r.doc.get("status"))
    if status is None:
        raise r.fail(f"status={r.doc.get('status')!r} is not one of {sorted(PRESENCES)}")
    return status


def _first_verified_email(emails: object) -> str | None:
    if not isinstance(emails, list):
        return None
    for entry in emails:
        if isinstance(entry, Mapping) and entry.get("verified") is True:
            address = entry.get("address")
            if isinstance(address, str) and "@" in address:
                return address
    return None


def _preference(value: object) -> PushPreference | None:
    """User preferences are advisory: an unknown value means 'not set', not a bad user."""
    if isinstance(value, str) and value in PUSH_PREFERENCES:
        return value  # type: ignore[return-value]
    return None


@dataclass(frozen=True, slots=True)
class PushToken:
    id: str
    uid: str
    kind: TokenKind
    token: str
    app_name: str | None = None
    enabled: bool = True

    @classmethod
    def from_doc(cls, doc: object) -> PushToken:
        r = _Reader(PUSH_TOKENS, doc)
        token = r.sub("token")
        kinds = [k for k in ("apn", "gcm") if isinstance(token.get(k), str) and token[k]]
        if not kinds:
            raise r.fail("token has neither an apn nor a gcm string")
        kind: TokenKind = "apn" if kinds[0] == "apn" else "gcm"
        return cls(
            id=r.doc_id,
            uid=r.required_str("userId"),
            kind=kind,
            token=token[kind],
            app_name=r.optional_str("appName"),
            enabled=r.doc.get("enabled") is not False,
        )


@dataclass(frozen=True, slots=True)
class Settings:
    """Rocket.Chat's admin settings the sidecar reads, with Rocket.Chat's defaults.

    Built by `Settings.from_values` from `{_id: value}`; a value of the wrong
    type is reported in `problems` and the default is used instead.
    """

    push_enable: bool = True
    push_enable_gateway: bool = True
    push_gateways: tuple[str, ...] = ("https://gateway.rocket.chat",)
    push_production: bool = True
    push_show_username_room: bool = True
    push_show_message: bool = True
    push_request_content_from_server: bool = False
    register_server: bool = False
    cloud_agree_privacy_terms: bool = False
    cloud_workspace_id: str | None = None
    unique_id: str = ""
    site_url: str = ""
    site_name: str = "Rocket.Chat"
    use_real_name: bool = False
    room_names_with_special_chars: bool = False
    max_room_members: int = 100
    always_notify_mobile: bool = False
    allow_email_notifications: bool = True
    default_push_preference: PushPreference = "all"
    default_email_preference: PushPreference = "mentions"
    troubleshoot_disable_notifications: bool = False
    from_email: str | None = None
    smtp_host: str | None = None
    smtp_port: int | None = None
    smtp_username: str | None = None
    #: Secrets: kept out of repr() so no log line or traceback can carry them.
    smtp_password: str | None = field(default=None, repr=False)
    smtp_protocol: str | None = None
    #: Rocket.Chat's mailer skips STARTTLS unless this is turned off (its default: on).
    smtp_ignore_tls: bool = True
    #: Rocket.Chat's privacy switch for mail: off, a mail says who wrote where, not what.
    email_show_message: bool = True
    #: A call in a 1:1 direct message rings the callee's phone (Rocket.Chat sends that
    #: push itself); then the call's message pushes nothing. Off unless turned on.
    videoconf_mobile_ringing: bool = False
    default_mobile_ringing: bool = False
    workspace_access_token: str | None = field(default=None, repr=False)
    workspace_access_token_expires_at: float | None = None
    problems: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_values(cls, values: Mapping[str, object]) -> Settings:
        problems: list[str] = []
        kwargs: dict[str, Any] = {}
        for setting_id, (attr, parse) in _SETTING_PARSERS.items():
            if values.get(setting_id) in (None, ""):  # Rocket.Chat's "not set"
                continue
            raw = values[setting_id]
            parsed = parse(raw)
            if parsed is _INVALID:
                shown = REDACTED if setting_id in SECRET_SETTINGS else shortened(repr(raw))
                problems.append(f"setting {setting_id}={shown} has the wrong type; default used")
            else:
                kwargs[attr] = parsed
        return cls(**kwargs, problems=tuple(problems))


_INVALID: Any = object()


def _as_bool(value: object) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return _INVALID


def _as_int(value: object) -> Any:
    number = finite_number(value)
    if number is not None:
        return int(number)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return _INVALID
    return _INVALID


def _as_port(value: object) -> Any:
    port = _as_int(value)
    return port if port is _INVALID or 0 < port < 65536 else _INVALID


def _as_str(value: object) -> Any:
    return value if isinstance(value, str) else _INVALID


def _as_preference(value: object) -> Any:
    valid = isinstance(value, str) and value in PUSH_PREFERENCES and value != "default"
    return value if valid else _INVALID


def _as_lines(value: object) -> Any:
    if not isinstance(value, str):
        return _INVALID
    lines = tuple(line.strip().rstrip("/") for line in value.splitlines() if line.strip())
    return lines or _INVALID


def _as_time(value: object) -> Any:
    epoch = to_epoch(value)
    if epoch is None and isinstance(value, str):
        try:
            epoch = dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return _INVALID
    return _INVALID if epoch is None else epoch


_SETTING_PARSERS: dict[str, tuple[str, Any]] = {
    "Push_enable": ("push_enable", _as_bool),
    "Push_enable_gateway": ("push_enable_gateway", _as_bool),
    "Push_gateway": ("push_gateways", _as_lines),
    "Push_production": ("push_production", _as_bool),
    "Push_show_username_room": ("push_show_username_room", _as_bool),
    "Push_show_message": ("push_show_message", _as_bool),
    "Push_request_content_from_server": ("push_request_content_from_server", _as_bool),
    "Register_Server": ("register_server", _as_bool),
    "Cloud_Service_Agree_PrivacyTerms": ("cloud_agree_privacy_terms", _as_bool),
    "Cloud_Workspace_Id": ("cloud_workspace_id", _as_str),
    "uniqueID": ("unique_id", _as_str),
    "Site_Url": ("site_url", _as_str),
    "Site_Name": ("site_name", _as_str),
    "UI_Use_Real_Name": ("use_real_name", _as_bool),
    "UI_Allow_room_names_with_special_chars": ("room_names_with_special_chars", _as_bool),
    "Notifications_Max_Room_Members": ("max_room_members", _as_int),
    "Notifications_Always_Notify_Mobile": ("always_notify_mobile", _as_bool),
    "Accounts_AllowEmailNotifications": ("allow_email_notifications", _as_bool),
    "Accounts_Default_User_Preferences_pushNotifications": (
        "default_push_preference",
        _as_preference,
    ),
    "Accounts_Default_User_Preferences_emailNotificationMode": (
        "default_email_preference",
        _as_preference,
    ),
    "Troubleshoot_Disable_Notifications": ("troubleshoot_disable_notifications", _as_bool),
    "From_Email": ("from_email", _as_str),
    "SMTP_Host": ("smtp_host", _as_str),
    "SMTP_Port": ("smtp_port", _as_port),
    "SMTP_IgnoreTLS": ("smtp_ignore_tls", _as_bool),
    "SMTP_Username": ("smtp_username", _as_str),
    "SMTP_Password": ("smtp_password", _as_str),
    "SMTP_Protocol": ("smtp_protocol", _as_str),
    "Email_notification_show_message": ("email_show_message", _as_bool),
    "VideoConf_Mobile_Ringing": ("videoconf_mobile_ringing", _as_bool),
    "Accounts_Default_User_Preferences_enableMobileRinging": (
        "default_mobile_ringing",
        _as_bool,
    ),
    "Cloud_Workspace_Access_Token": ("workspace_access_token", _as_str),
    "Cloud_Workspace_Access_Token_Expires_At": ("workspace_access_token_expires_at", _as_time),
}

#: What stands in for a secret wherever one would be shown.
REDACTED = "***"

#: Settings whose values are credentials: never logged, never in a problem text.
SECRET_SETTINGS: frozenset[str] = frozenset({"SMTP_Password", "Cloud_Workspace_Access_Token"})

#: The `_id`s of every setting the sidecar reads, for the settings change stream's filter.
SETTING_IDS: frozenset[str] = frozenset(_SETTING_PARSERS)
