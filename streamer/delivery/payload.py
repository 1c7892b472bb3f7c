"""What a push says, as Rocket.Chat's server would say it (pure: no I/O, no clock).

The official apps parse the gateway's `options` object, so its shape follows
Rocket.Chat's own server field for field (SPEC §7): title and text as its
`getPushData`/`getNotificationConfig` build them, the `payload` object the apps
open the room from, and `notId`, which the apps use to group a room's pushes.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import Any

import emoji
import orjson

from streamer.delivery.base import Device, PushContent
from streamer.model import Mention, Message, Room, Settings, User

#: The gateway refuses longer strings; counted like JavaScript, in UTF-16 units.
TITLE_LIMIT = 65
TEXT_LIMIT = 240
ELLIPSIS = "..."
#: What a push says when it must not show the message (Rocket.Chat's English text).
GENERIC_TEXT = "You have a new message"
ENCRYPTED_TEXT = "Encrypted message"
#: Rocket.Chat's User_uploaded_image / User_uploaded_file, for an upload without text.
IMAGE_TEXT = "Uploaded an image"
FILE_TEXT = "Uploaded a file"
CATEGORY_REPLY = "MESSAGE"
CATEGORY_NO_REPLY = "MESSAGE_NOREPLY"
#: Rocket.Chat's `Assets_favicon_192`, which Android shows next to the push.
ICON_PATH = "assets/favicon_192.png"
#: Bytes of JSON APNs and FCM take at most per push; they refuse a larger one.
PROVIDER_PAYLOAD_LIMIT = 4096
#: Bytes each provider's own fields (keys, badge, sound, ids, token) add at most.
PROVIDER_OVERHEAD = 600


def not_id(unique_id: str, rid: str) -> int:
    """Rocket.Chat's `getNotificationId`: one id per (server, room), so a room's
    pushes replace each other on the phone instead of piling up.

    A Java-style 32-bit string hash over the UTF-16 code units of
    `"{uniqueID}|{rid}"`, walked from the last unit to the first, as the
    server's JavaScript does.
    """
    text = f"{unique_id}|{rid}".encode("utf-16-le")
    units = [int.from_bytes(text[i : i + 2], "little") for i in range(0, len(text), 2)]
    value = 0
    for unit in reversed(units):
        value = (value * 31 + unit) & 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def truncate(text: str, limit: int) -> str:
    """At most `limit` UTF-16 units, ending in "..." when cut; never splits a surrogate pair."""
    if _utf16_length(text) <= limit:
        return text
    budget = limit - len(ELLIPSIS)
    kept: list[str] = []
    for char in text:
        budget -= _utf16_length(char)
        if budget < 0:
            break
        kept.append(char)
    return "".join(kept) + ELLIPSIS


def _utf16_length(text: str) -> int:
    return len(text) + sum(1 for char in text if ord(char) > 0xFFFF)


def build_push_content(
    message: Message,
    room: Room | None,
    recipient: User,
    settings: Settings,
    *,
    badge: int,
    now: float,
    sender: User | None = None,
) -> PushContent:
    """The push `recipient` gets for `message`, honouring the admin's privacy settings.

    `sender` (the sender's user document) only supplies the real name when the
    message's own `u.name` is missing. In a room the recipient cannot write to
    (read-only, or muted there) iOS offers no reply button.

    A push APNs or FCM would refuse as too large (a long e2e message's ciphertext,
    or names of many kilobytes) goes in the id-only form instead, which the apps
    answer by fetching the message: Rocket.Chat sends it whole, and it is lost.
    """
    id_only = settings.push_request_content_from_server
    title, text, payload = _visible_parts(message, room, recipient, settings, sender, id_only)
    if not id_only and not _fits_providers(title, text, payload):
        id_only = True
        title, text, payload = _visible_parts(message, room, recipient, settings, sender, True)
    return PushContent(
        uid=recipient.id,
        rid=message.rid,
        mid=message.id,
        title=title,
        text=text,
        badge=badge,
        not_id=not_id(settings.unique_id, message.rid),
        created_at=now,
        payload=payload,
        category=CATEGORY_NO_REPLY
        if room and not room.can_write(recipient.username)
        else CATEGORY_REPLY,
        id_only=id_only,
        unique_id=settings.unique_id,
        image=_host(settings.site_url) + ICON_PATH,
    )


def _visible_parts(
    message: Message,
    room: Room | None,
    recipient: User,
    settings: Settings,
    sender: User | None,
    id_only: bool,
) -> tuple[str, str, dict[str, Any]]:
    """Title, text and the apps' payload object."""
    sender_label = _sender_label(message, settings, sender)
    room_label = _room_label(room, settings, recipient.username)
    body = _message_text(message, settings, id_only)
    title = "" if id_only else room_label or sender_label
    text = body if id_only or not room_label else f"{sender_label}: {body}"
    payload = _payload(message, room, settings, sender_label, _host(settings.site_url), id_only)
    return truncate(title, TITLE_LIMIT), truncate(text, TEXT_LIMIT), payload


def _fits_providers(title: str, text: str, payload: dict[str, Any]) -> bool:
    """FCM carries title and text twice (notification and data); both carry the
    payload as a JSON string inside their JSON, its quotes escaped once more."""
    ejson = orjson.dumps(orjson.dumps(payload).decode())
    shown = len(orjson.dumps(title)) + len(orjson.dumps(text))
    return 2 * shown + len(ejson) + PROVIDER_OVERHEAD <= PROVIDER_PAYLOAD_LIMIT


def _sender_label(message: Message, settings: Settings, sender: User | None) -> str:
    """Rocket.Chat's `username`: hidden unless Push_show_username_room; real name if asked."""
    if not settings.push_show_username_room:
        return ""
    real_name = message.sender.name or (sender.name if sender else None)
    username = message.sender.username or (sender.username if sender else "")
    return (settings.use_real_name and real_name) or username


def _room_label(room: Room | None, settings: Settings, recipient: str) -> str:
    """`#room` for group chats (the title); empty for DMs, whose title is the sender."""
    if room is None or not settings.push_show_username_room or not room.group_chat:
        return ""
    return f"#{room.title(recipient, settings.room_names_with_special_chars)}"


def _message_text(message: Message, settings: Settings, id_only: bool) -> str:
    if id_only or not settings.push_show_message:
        return GENERIC_TEXT
    return readable_text(message, settings)


def readable_text(message: Message, settings: Settings) -> str:
    """The message as a notification shows it (Rocket.Chat's parseMessageTextPerUser):
    never an e2e message's ciphertext, words for an upload without text, emoji codes
    as emoji, and with UI_Use_Real_Name the mentioned by their real names."""
    if message.encrypted:
        return ENCRYPTED_TEXT
    if not message.text:
        if not message.has_attachments:
            return ""
        return IMAGE_TEXT if message.image_attached else FILE_TEXT
    text = message.text
    if settings.use_real_name:
        text = _real_names(text, message.mentions)
    return emoji.emojize(text, language="alias")


def _real_names(text: str, mentions: Sequence[Mention]) -> str:
    """`@bob` → `Bob Real` for each mention that carries a name (not `@bobby`)."""
    for mention in mentions:
        if mention.username and mention.name:
            literal = mention.name.replace("\\", "\\\\")  # a replacement, not a template
            text = re.sub(rf"@{re.escape(mention.username)}(?![\w.-])", literal, text)
    return text


def _host(site_url: str) -> str:
    """Rocket.Chat's `Meteor.absoluteUrl()`: the site URL with one trailing slash."""
    return site_url.rstrip("/") + "/"


def _payload(
    message: Message,
    room: Room | None,
    settings: Settings,
    sender_label: str,
    host: str,
    id_only: bool,
) -> dict[str, Any]:
    """The object the apps open the room from; id-only pushes carry just enough to fetch."""
    base: dict[str, Any] = {
        "host": host,
        "messageId": message.id,
        "notificationType": "message-id-only" if id_only else "message",
    }
    if id_only:
        return base
    sender = message.sender
    details: dict[str, Any] = {
        "rid": message.rid,
        "sender": {"_id": sender.id, "username": sender.username, "name": sender.name},
        "senderName": sender_label,
        "type": room.type if room else None,
        "name": room.name if room and settings.push_show_username_room else "",
        "messageType": message.type,
        "tmid": message.tmid,
    }
    if message.encrypted:
        # The apps decrypt the push themselves: the ciphertext, in whichever field
        # the sending client put it.
        details["msg"] = message.text
        if message.e2e_content:
            details["content"] = message.e2e_content
    return base | details


def gateway_body(content: PushContent, device: Device) -> dict[str, Any]:
    """The exact JSON the Push Gateway expects for one device (SPEC §7)."""
    options: dict[str, Any] = {
        "createdAt": _js_date(content.created_at),
        "createdBy": "<SERVER>",
        "sent": False,
        "sending": 0,
        "from": "push",
        "title": content.title,
        "text": content.text,
        "userId": content.uid,
        "payload": content.payload,
        "badge": content.badge,
        "sound": "default",
        "notId": content.not_id,
        "uniqueId": content.unique_id,
        "apn": {"category": content.category},
        "gcm": {"image": content.image, "style": "inbox"},
    }
    if device.kind == "apn":
        options["topic"] = device.app_name
    return {"token": device.token, "options": options}


def _js_date(epoch: float) -> str:
    """A date as JavaScript's JSON.stringify writes it: ISO 8601, milliseconds, Z."""
    when = dt.datetime.fromtimestamp(epoch, dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
