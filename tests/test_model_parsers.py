"""The tolerant document parsers: accept what Rocket.Chat writes, reject with a reason."""

from __future__ import annotations

import datetime as dt
import math

import pytest

from streamer.model import (
    MalformedDocument,
    Message,
    PushToken,
    Room,
    Settings,
    Subscription,
    User,
)
from tests import factories as f

ALICE = f.user("alice")
GENERAL = f.room("GENERAL")


def test_message_keeps_the_fields_the_rules_need() -> None:
    doc = f.message(GENERAL, ALICE, "hi @bob", mentions=[{"_id": "u-bob", "username": "bob"}])
    message = Message.from_doc(doc)
    assert (message.rid, message.sender.id, message.text) == ("GENERAL", "u-alice", "hi @bob")
    assert message.mentions[0].id == "u-bob"
    assert message.ts == pytest.approx(doc["ts"].timestamp())


def test_naive_bson_dates_are_utc() -> None:
    naive = dt.datetime(2026, 1, 1, 12, 0, 0)
    message = Message.from_doc(f.message(GENERAL, ALICE, ts=naive))
    assert message.ts == dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC).timestamp()


@pytest.mark.parametrize(
    ("override", "why"),
    [
        ({"_id": 7}, "_id"),
        ({"rid": None}, "rid"),
        ({"ts": "yesterday"}, "ts is not a date"),
        ({"u": "alice"}, "u is not a sub-document"),
        ({"mentions": "all"}, "mentions is not a list"),
    ],
)
def test_malformed_message_names_id_and_field(override: dict[str, object], why: str) -> None:
    doc = {**f.message(GENERAL, ALICE), **override}
    with pytest.raises(MalformedDocument, match=why) as raised:
        Message.from_doc(doc)
    assert raised.value.collection == "rocketchat_message"


def test_subscription_preference_and_unknown_value() -> None:
    sub = Subscription.from_doc(f.subscription(ALICE, GENERAL, mobilePushNotifications="nothing"))
    assert sub.mobile_push == "nothing"
    with pytest.raises(MalformedDocument, match="mobilePushNotifications"):
        Subscription.from_doc(f.subscription(ALICE, GENERAL, mobilePushNotifications="loud"))


def test_user_first_verified_email_and_preferences() -> None:
    doc = f.user(
        "bob",
        emails=[
            {"address": "old@x.org", "verified": False},
            {"address": "b@x.org", "verified": True},
        ],
        settings={
            "preferences": {"pushNotifications": "mentions", "emailNotificationMode": "bogus"}
        },
    )
    user = User.from_doc(doc)
    assert user.email == "b@x.org"
    assert user.push_preference == "mentions"
    assert user.email_preference is None


def test_push_token_kind() -> None:
    token = PushToken.from_doc(f.push_token(ALICE, "apn"))
    assert (token.kind, token.token, token.uid) == ("apn", "apn-device-alice", "u-alice")
    with pytest.raises(MalformedDocument, match="neither an apn nor a gcm"):
        PushToken.from_doc({**f.push_token(ALICE), "token": {}})


def test_settings_bad_values_fall_back_with_a_problem() -> None:
    settings = Settings.from_values(
        {
            "Notifications_Max_Room_Members": "abc",
            "Push_enable": "false",
            "Push_gateway": "https://a.example/\nhttps://b.example",
        }
    )
    assert settings.max_room_members == 100
    assert settings.push_enable is False
    assert settings.push_gateways == ("https://a.example", "https://b.example")
    assert settings.problems == (
        "setting Notifications_Max_Room_Members='abc' has the wrong type; default used",
    )


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "--5", "²", 1e400])
def test_a_number_no_int_can_hold_is_a_bad_setting_not_a_crash(value: object) -> None:
    settings = Settings.from_values({"Notifications_Max_Room_Members": value, "SMTP_Port": value})
    assert (settings.max_room_members, settings.smtp_port) == (
        Settings().max_room_members,
        Settings().smtp_port,
    )
    assert len(settings.problems) == 2


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_count_or_date_is_a_malformed_document(value: float) -> None:
    with pytest.raises(MalformedDocument, match="unread is not a number"):
        Subscription.from_doc(f.subscription(ALICE, GENERAL, unread=value))
    with pytest.raises(MalformedDocument, match="ts is not a date"):
        Message.from_doc({**f.message(GENERAL, ALICE), "ts": value})


def test_the_disabled_status_is_offline_and_an_unknown_one_malformed() -> None:
    assert User.from_doc(f.user("dora", status="disabled")).status == "offline"
    assert User.from_doc({**f.user("dora"), "status": ""}).status == "offline"
    with pytest.raises(MalformedDocument, match="status='sleepy'"):
        User.from_doc(f.user("dora", status="sleepy"))


def test_also_sent_to_the_room_and_preferences_copied_from_the_account() -> None:
    reply = Message.from_doc({**f.message(GENERAL, ALICE), "tmid": "p1", "tshow": True})
    assert reply.shown_in_room
    sub = Subscription.from_doc(
        f.subscription(
            ALICE, GENERAL, mobilePushNotifications="all", mobilePrefOrigin="user",
            emailNotifications="all", emailPrefOrigin="subscription",
        )
    )  # fmt: skip
    assert (sub.mobile_push, sub.mobile_push_inherited) == ("all", True)
    assert (sub.email_notifications, sub.email_inherited) == ("all", False)


def test_what_notification_texts_need_of_a_message_and_its_room() -> None:
    doc = {
        **f.message(GENERAL, ALICE, "@bob"),
        "mentions": [{"_id": "u-bob", "username": "bob", "name": "Bob Real"}],
        "attachments": [{"image_type": "image/png"}, {"title": "notes.txt"}],
        "content": {"algorithm": "rc.v2.aes-sha2", "ciphertext": "Zm9v", "kid": 7},
    }
    message = Message.from_doc(doc)
    assert message.mentions[0].name == "Bob Real"
    assert message.image_attached
    assert message.e2e_content == {"algorithm": "rc.v2.aes-sha2", "ciphertext": "Zm9v"}
    group = Room.from_doc({"_id": "RGRP", "t": "d", "usernames": ["alice", "bob", 3]})
    assert group.usernames == ("alice", "bob")


@pytest.mark.parametrize("port", [0, 65536, -25, "99999"])
def test_a_port_no_socket_can_use_is_a_bad_setting(port: object) -> None:
    settings = Settings.from_values({"SMTP_Port": port})
    assert settings.smtp_port is None
    assert len(settings.problems) == 1
