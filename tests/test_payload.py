"""The push Rocket.Chat's apps receive: title, text, payload and the gateway body (SPEC §7)."""

from __future__ import annotations

import dataclasses
import operator

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamer.delivery.apns import apns_payload
from streamer.delivery.base import Device, PushContent
from streamer.delivery.fcm import fcm_message
from streamer.delivery.payload import (
    ENCRYPTED_TEXT,
    GENERIC_TEXT,
    PROVIDER_PAYLOAD_LIMIT,
    TEXT_LIMIT,
    TITLE_LIMIT,
    build_push_content,
    gateway_body,
    not_id,
    truncate,
)
from streamer.model import Mention, Message, Room, Settings, User, UserRef

NOW = 1_700_000_000.25
SETTINGS = Settings(unique_id="abc123", site_url="https://chat.example.org")
ALICE = UserRef(id="u-alice", username="alice", name="Alice Liddell")
BOB = User(id="u-bob", username="bob", name="Bob")
GENERAL = Room(id="GENERAL", type="c", name="general", fname="general", users_count=5)
DM = Room(id="u-aliceu-bob", type="d", users_count=2)


def message(text: str = "hello", **fields: object) -> Message:
    values: dict[str, object] = {"id": "m1", "rid": "GENERAL", "text": text, "ts": NOW}
    values.update(fields)
    return Message(sender=ALICE, **values)  # type: ignore[arg-type]


def test_not_id_is_rocket_chats_hash_of_unique_id_and_room() -> None:
    assert not_id("abc123", "GENERAL") == 1666299236


def test_not_id_is_a_signed_32_bit_integer() -> None:
    value = not_id("a-long-server-unique-id-" * 4, "room-with-a-long-id")
    assert -(2**31) <= value < 2**31


def test_not_id_counts_utf16_units_like_javascript() -> None:
    # "😀" is two UTF-16 units: 0xD83D 0xDE00; hash over reversed units.
    expected = 0
    for unit in reversed([ord(c) for c in "x|"] + [0xD83D, 0xDE00]):
        expected = (expected * 31 + unit) & 0xFFFFFFFF
    assert not_id("x", "😀") == expected - 2**32 * (expected >= 2**31)


def test_channel_push_has_room_title_and_sender_prefixed_text() -> None:
    content = build_push_content(message(), GENERAL, BOB, SETTINGS, badge=3, now=NOW)
    assert (content.title, content.text) == ("#general", "alice: hello")
    assert (content.uid, content.rid, content.mid, content.badge) == ("u-bob", "GENERAL", "m1", 3)
    assert content.not_id == 1666299236


def test_direct_message_push_has_sender_title_and_bare_text() -> None:
    content = build_push_content(message(rid=DM.id), DM, BOB, SETTINGS, badge=1, now=NOW)
    assert (content.title, content.text) == ("alice", "hello")


def test_real_names_are_used_when_the_server_shows_them() -> None:
    settings = dataclasses.replace(SETTINGS, use_real_name=True)
    content = build_push_content(message(), GENERAL, BOB, settings, badge=0, now=NOW)
    assert content.text == "Alice Liddell: hello"
    assert content.payload["senderName"] == "Alice Liddell"


def test_hiding_username_and_room_leaves_only_the_message() -> None:
    settings = dataclasses.replace(SETTINGS, push_show_username_room=False)
    content = build_push_content(message(), GENERAL, BOB, settings, badge=0, now=NOW)
    assert (content.title, content.text) == ("", "hello")
    assert (content.payload["senderName"], content.payload["name"]) == ("", "")


def test_hiding_the_message_sends_generic_text() -> None:
    settings = dataclasses.replace(SETTINGS, push_show_message=False)
    content = build_push_content(message("secret"), GENERAL, BOB, settings, badge=0, now=NOW)
    assert content.text == f"alice: {GENERIC_TEXT}"


def test_encrypted_message_sends_generic_text_and_the_ciphertext_for_the_app() -> None:
    content = build_push_content(
        message("c1ph3r", type="e2e"), GENERAL, BOB, SETTINGS, badge=0, now=NOW
    )
    assert content.text == f"alice: {ENCRYPTED_TEXT}"
    assert content.payload["msg"] == "c1ph3r"


def test_id_only_mode_sends_no_content_at_all() -> None:
    settings = dataclasses.replace(SETTINGS, push_request_content_from_server=True)
    content = build_push_content(message("secret"), GENERAL, BOB, settings, badge=2, now=NOW)
    assert content.id_only
    assert (content.title, content.text) == ("", GENERIC_TEXT)
    assert content.payload == {
        "host": "https://chat.example.org/",
        "messageId": "m1",
        "notificationType": "message-id-only",
    }


def test_long_title_and_text_are_cut_to_the_gateway_limits() -> None:
    room = dataclasses.replace(GENERAL, name="r" * 100)
    content = build_push_content(message("x" * 500), room, BOB, SETTINGS, badge=0, now=NOW)
    assert len(content.title) == TITLE_LIMIT and content.title.endswith("...")
    assert len(content.text) == TEXT_LIMIT and content.text.endswith("...")


@given(st.text(max_size=400), st.integers(min_value=3, max_value=300))
def test_truncation_never_exceeds_the_limit_in_utf16_units(text: str, limit: int) -> None:
    cut = truncate(text, limit)
    assert len(cut.encode("utf-16-le")) // 2 <= limit
    assert cut == text or cut.endswith("...")


@pytest.mark.parametrize(
    ("room", "category"),
    [
        (GENERAL, "MESSAGE"),
        (dataclasses.replace(GENERAL, read_only=True), "MESSAGE_NOREPLY"),
        (dataclasses.replace(GENERAL, muted=frozenset({"bob"})), "MESSAGE_NOREPLY"),
        (dataclasses.replace(GENERAL, muted=frozenset({"carol"})), "MESSAGE"),
    ],
)
def test_room_the_recipient_cannot_write_to_has_no_reply_category(
    room: Room, category: str
) -> None:
    content = build_push_content(message(), room, BOB, SETTINGS, badge=0, now=NOW)
    assert content.category == category


def test_read_only_and_muted_come_from_the_room_document() -> None:
    room = Room.from_doc({"_id": "R", "t": "c", "ro": True, "muted": ["bob", 7]})
    assert (room.read_only, room.muted) == (True, frozenset({"bob"}))


@pytest.mark.parametrize(
    ("image", "said"), [(True, "Uploaded an image"), (False, "Uploaded a file")]
)
def test_an_upload_without_text_says_what_it_is(image: bool, said: str) -> None:
    upload = message("", has_attachments=True, image_attached=image)
    content = build_push_content(upload, GENERAL, BOB, SETTINGS, badge=0, now=NOW)
    assert content.text == f"alice: {said}"


def test_emoji_codes_become_emoji_and_real_names_replace_mentions() -> None:
    mentions = (Mention("u-bob", "bob", name="Bob Real"), Mention("u-x", "bo", name="Bo"))
    text = message("@bob :thumbsup: @bobby, ask @bo", mentions=mentions)
    plain = build_push_content(text, GENERAL, BOB, SETTINGS, badge=0, now=NOW)
    assert plain.text == "alice: @bob 👍 @bobby, ask @bo"
    real = dataclasses.replace(SETTINGS, use_real_name=True)
    named = build_push_content(text, GENERAL, BOB, real, badge=0, now=NOW)
    assert named.text == "Alice Liddell: Bob Real 👍 @bobby, ask Bo"


def test_a_group_dm_without_a_name_is_named_by_its_other_members() -> None:
    group = Room(id="RGRP", type="d", users_count=3, usernames=("alice", "bob", "carol"))
    content = build_push_content(message(), group, BOB, SETTINGS, badge=0, now=NOW)
    assert content.title == "#alice, carol"


@pytest.mark.parametrize(
    ("room", "special_chars", "title"),
    [
        (dataclasses.replace(GENERAL, fname="General Chat"), False, "#general"),
        (dataclasses.replace(GENERAL, fname="General Chat"), True, "#General Chat"),
        (Room(id="D1", type="p", name="x1", fname="Lunch plans", discussion=True), False,
         "#Lunch plans"),
    ],
    ids=["name", "special-chars-allowed", "discussion"],
)  # fmt: skip
def test_a_room_is_titled_by_its_name_as_rocket_chat_titles_it(
    room: Room, special_chars: bool, title: str
) -> None:
    """A display name with special characters shows only where the server allows them
    (UI_Allow_room_names_with_special_chars); a discussion always goes by its own."""
    settings = dataclasses.replace(SETTINGS, room_names_with_special_chars=special_chars)
    assert build_push_content(message(), room, BOB, settings, badge=0, now=NOW).title == title


def test_an_e2e_messages_encrypted_content_is_passed_on() -> None:
    secret = {"algorithm": "rc.v2.aes-sha2", "ciphertext": "Zm9v"}
    e2e = message("", type="e2e", e2e_content=secret)
    content = build_push_content(e2e, DM, BOB, SETTINGS, badge=0, now=NOW)
    assert content.payload["content"] == secret
    assert content.text == ENCRYPTED_TEXT  # a DM: the sender is the title


@pytest.mark.parametrize("kind", ["apn", "gcm"])
def test_gateway_body_is_exactly_rocket_chats(kind: str) -> None:
    thread_reply = message(tmid="m0")
    content = build_push_content(thread_reply, GENERAL, BOB, SETTINGS, badge=4, now=NOW)
    device = Device(token_id="t1", kind=kind, token="dev-token", app_name="chat.rocket.ios")  # type: ignore[arg-type]
    expected_options = {
        "createdAt": "2023-11-14T22:13:20.250Z",
        "createdBy": "<SERVER>",
        "sent": False,
        "sending": 0,
        "from": "push",
        "title": "#general",
        "text": "alice: hello",
        "userId": "u-bob",
        "payload": {
            "host": "https://chat.example.org/",
            "messageId": "m1",
            "notificationType": "message",
            "rid": "GENERAL",
            "sender": {"_id": "u-alice", "username": "alice", "name": "Alice Liddell"},
            "senderName": "alice",
            "type": "c",
            "name": "general",
            "messageType": None,
            "tmid": "m0",
        },
        "badge": 4,
        "sound": "default",
        "notId": 1666299236,
        "uniqueId": "abc123",
        "apn": {"category": "MESSAGE"},
        "gcm": {"image": "https://chat.example.org/assets/favicon_192.png", "style": "inbox"},
    }
    if kind == "apn":
        expected_options["topic"] = "chat.rocket.ios"
    assert gateway_body(content, device) == {"token": "dev-token", "options": expected_options}


def provider_bodies(content: PushContent) -> list[bytes]:
    """What APNs and FCM would receive: each refuses more than 4096 bytes."""
    device = Device(token_id="t", kind="gcm", token="x" * 160, app_name="chat.rocket.ios")
    return [orjson.dumps(apns_payload(content)), orjson.dumps(fcm_message(content, device))]


def test_a_long_encrypted_message_goes_as_id_only_for_the_app_to_fetch() -> None:
    """Its ciphertext would make the push too large for APNs and FCM, who would refuse
    it: the push carries the message id instead, and the app fetches the message."""
    ciphertext = "A" * 6000
    e2e = message(ciphertext, type="e2e", e2e_content={"algorithm": "x", "ciphertext": ciphertext})
    content = build_push_content(e2e, DM, BOB, SETTINGS, badge=0, now=NOW)
    assert content.id_only
    assert content.payload == {
        "host": "https://chat.example.org/",
        "messageId": "m1",
        "notificationType": "message-id-only",
    }
    assert all(len(body) <= PROVIDER_PAYLOAD_LIMIT for body in provider_bodies(content))
    short = build_push_content(message("c1ph3r", type="e2e"), DM, BOB, SETTINGS, badge=0, now=NOW)
    assert not short.id_only


#: Short random texts, or one character (a quote, a control character, an emoji...)
#: repeated up to thousands of times: what makes a push large.
long_text = st.one_of(
    st.text(max_size=50),
    st.builds(operator.mul, st.characters(codec="utf-8"), st.integers(0, 3000)),
)


@given(text=long_text, name=long_text, room_name=long_text, encrypted=st.booleans())
def test_no_push_is_too_large_for_apns_or_fcm(
    text: str, name: str, room_name: str, encrypted: bool
) -> None:
    sender = UserRef(id="u-alice", username=name[:100], name=name)
    room = dataclasses.replace(GENERAL, name=room_name, fname=room_name)
    msg = dataclasses.replace(message(text, type="e2e" if encrypted else None), sender=sender)
    content = build_push_content(msg, room, BOB, SETTINGS, badge=99999, now=NOW)
    assert all(len(body) <= PROVIDER_PAYLOAD_LIMIT for body in provider_bodies(content))
