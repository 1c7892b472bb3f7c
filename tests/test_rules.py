"""The notification rules of SPEC §3 and §4, one table per rule, both outcomes in each.

Bob (`u-bob`) is the recipient unless a row says otherwise; Alice (`u-alice`)
writes the message. Every row states only what differs from a plain channel
message to an active, offline Bob with a device, a verified address and
default preferences (server defaults: push 'all', email 'mentions').
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pytest

from streamer.config import Config, EmailConfig, RulesConfig
from streamer.model import Mention, Message, Room, Settings, Subscription, User, UserRef
from streamer.rules import (
    Decision,
    Reason,
    decide,
    highlight_text,
    is_highlighted,
    message_skip_reason,
    plan_message,
    standing_skip_reason,
)

NOW = 1_700_000_000.0
ALICE, BOB, CAROL = "u-alice", "u-bob", "u-carol"
R = Reason


def mention(uid: str, kind: str | None = "user") -> Mention:
    return Mention(id=uid, username=uid.removeprefix("u-"), type=kind)


ALL, HERE = Mention("all", "all"), Mention("here", "here")


def make_message(**fields: Any) -> Message:
    values: dict[str, Any] = {
        "id": "m1",
        "rid": "R1",
        "text": "hello there",
        "ts": NOW,
        "sender": UserRef(ALICE, "alice", "Alice"),
    }
    return Message(**{**values, **fields})


@dataclass
class Scene:
    """One message and one recipient; `decision()` runs the rules over it."""

    message: dict[str, Any] = field(default_factory=dict)
    room: dict[str, Any] = field(default_factory=dict)
    sub: dict[str, Any] = field(default_factory=dict)
    user: dict[str, Any] | None = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    config: Config = field(default_factory=Config)
    has_device: bool = True
    parent: dict[str, Any] | None = None
    team_members: frozenset[str] = frozenset()
    active_members: int = 2
    dm_roles: frozenset[str] | None = None

    def decision(self) -> Decision:
        room = Room(**{"id": "R1", "type": "c", **self.room})
        sub = Subscription(
            **{"id": "s1", "rid": "R1", "uid": BOB, "room_type": room.type, **self.sub}
        )
        user = None
        if self.user is not None:
            defaults = {"username": "bob", "email": "bob@example.org", "roles": ("user",)}
            user = User(**{"id": sub.uid, **defaults, **self.user})
        parent = None if self.parent is None else make_message(id="p1", **self.parent)
        plan = plan_message(
            make_message(**self.message),
            room,
            Settings(**self.settings),
            self.config,
            parent=parent,
            team_members=self.team_members,
            active_members=self.active_members,
            dm_roles=self.dm_roles,
        )
        return decide(plan, sub, user, self.has_device)


Row = tuple[str, Scene, Reason, Reason]


def table(*rows: Row) -> pytest.MarkDecorator:
    """Parametrize a test over (scene, push reason, email reason) rows named by their id."""
    return pytest.mark.parametrize(
        ("scene", "push", "email"), [r[1:] for r in rows], ids=[r[0] for r in rows]
    )


def check(scene: Scene, push: Reason, email: Reason) -> None:
    decision = scene.decision()
    assert (decision.push_reason, decision.email_reason) == (push, email)
    assert (decision.push, decision.email) == (push.notifies, email.notifies)


MENTIONS_BOB = {"mentions": (mention(BOB),)}


# -- SPEC §3: messages that notify nobody -------------------------------------------------


@pytest.mark.parametrize(
    ("message", "room_type", "agent", "expected"),
    [
        ({}, "c", False, None),
        ({"hidden": True}, "c", False, R.MESSAGE_HIDDEN),
        ({"edited": True}, "c", False, R.MESSAGE_EDITED),
        ({"type": "uj"}, "c", False, R.SYSTEM_MESSAGE),
        ({"type": "room_changed_topic"}, "c", False, R.SYSTEM_MESSAGE),
        ({"type": "e2e"}, "c", False, None),
        ({"type": "videoconf"}, "c", False, None),
        ({"ts": NOW - 61}, "c", False, R.MESSAGE_TOO_OLD),
        ({"ts": NOW - 59}, "c", False, None),
        ({"ts": NOW + 61}, "c", False, R.MESSAGE_TOO_OLD),
        ({"ts": NOW - 3600, "tmid": "p1"}, "c", False, None),
        ({}, "l", True, R.OMNICHANNEL_AGENT_SENDER),
        ({}, "l", False, None),
        ({}, "c", True, None),
    ],
)
def test_message_level_skips(
    message: dict[str, Any], room_type: str, agent: bool, expected: Reason | None
) -> None:
    room = Room(id="R1", type=room_type)  # type: ignore[arg-type]
    assert message_skip_reason(make_message(**message), room, NOW, sender_is_agent=agent) == (
        expected
    )


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"ts": NOW - 3600}, None),
        ({"edited": True}, None),
        ({"hidden": True}, R.MESSAGE_HIDDEN),
        ({"type": "uj"}, R.SYSTEM_MESSAGE),
    ],
)
def test_fire_time_message_checks_ignore_age_and_edits(
    message: dict[str, Any], expected: Reason | None
) -> None:
    assert standing_skip_reason(make_message(**message), Room(id="R1", type="c")) == expected


# -- who is a candidate -------------------------------------------------------------------


@table(
    ("sender-own-message", Scene(sub={"uid": ALICE}), R.SENDER_IS_RECIPIENT, R.SENDER_IS_RECIPIENT),
    ("sender-mentions-self", Scene(sub={"uid": ALICE}, message={"mentions": (mention(ALICE),)}),
     R.SENDER_IS_RECIPIENT, R.SENDER_IS_RECIPIENT),
    ("other-member", Scene(), R.PREFERENCE_ALL, R.NOT_MENTIONED),
    ("user-document-missing", Scene(user=None), R.USER_NOT_FOUND, R.USER_NOT_FOUND),
)  # fmt: skip
def test_sender_and_missing_user(scene: Scene, push: Reason, email: Reason) -> None:
    check(scene, push, email)


# -- the eight documented causes ----------------------------------------------------------


@table(
    ("disabled", Scene(sub={"disable_notifications": True}),
     R.ROOM_NOTIFICATIONS_DISABLED, R.ROOM_NOTIFICATIONS_DISABLED),
    ("disabled-even-when-mentioned",
     Scene(sub={"disable_notifications": True}, message=MENTIONS_BOB),
     R.ROOM_NOTIFICATIONS_DISABLED, R.ROOM_NOTIFICATIONS_DISABLED),
    ("enabled", Scene(sub={"disable_notifications": False}), R.PREFERENCE_ALL, R.NOT_MENTIONED),
)  # fmt: skip
def test_cause_1_room_notifications_disabled(scene: Scene, push: Reason, email: Reason) -> None:
    check(scene, push, email)


@table(
    ("sender-ignored", Scene(sub={"ignored": frozenset({ALICE})}),
     R.SENDER_IGNORED, R.SENDER_IGNORED),
    ("ignored-even-in-dm", Scene(room={"type": "d"}, sub={"ignored": frozenset({ALICE})}),
     R.SENDER_IGNORED, R.SENDER_IGNORED),
    ("someone-else-ignored", Scene(sub={"ignored": frozenset({CAROL})}),
     R.PREFERENCE_ALL, R.NOT_MENTIONED),
)  # fmt: skip
def test_cause_2_sender_ignored(scene: Scene, push: Reason, email: Reason) -> None:
    check(scene, push, email)


MUTED = {"mute_group_mentions": True}


@table(
    ("muted-all", Scene(sub=MUTED, message={"mentions": (ALL,)}),
     R.GROUP_MENTIONS_MUTED, R.GROUP_MENTIONS_MUTED),
    ("muted-here", Scene(sub=MUTED, message={"mentions": (HERE,)}),
     R.GROUP_MENTIONS_MUTED, R.GROUP_MENTIONS_MUTED),
    ("muted-but-named-too", Scene(sub=MUTED, message={"mentions": (ALL, mention(BOB))}),
     R.MENTIONED, R.MENTIONED),
    ("muted-but-thread-participant",
     Scene(sub=MUTED, message={"mentions": (ALL,), "tmid": "p1"}, parent={"replies": (BOB,)}),
     R.THREAD_PARTICIPANT, R.THREAD_PARTICIPANT),
    ("not-muted-all", Scene(message={"mentions": (ALL,)}), R.PREFERENCE_ALL, R.ALL_MENTIONED),
    ("muted-plain-message", Scene(sub=MUTED), R.PREFERENCE_ALL, R.NOT_MENTIONED),
)  # fmt: skip
def test_cause_3_group_mentions_muted(scene: Scene, push: Reason, email: Reason) -> None:
    check(scene, push, email)


NO_BUSY_BLOCK = Config(rules=RulesConfig(busy_blocks_push=False))


@table(
    ("inactive", Scene(user={"active": False}), R.USER_INACTIVE, R.USER_INACTIVE),
    ("inactive-dm", Scene(room={"type": "d"}, user={"active": False}),
     R.USER_INACTIVE, R.USER_INACTIVE),
    ("busy", Scene(user={"status": "busy"}), R.USER_BUSY, R.NOT_MENTIONED),
    ("busy-dm", Scene(room={"type": "d"}, user={"status": "busy"}), R.USER_BUSY, R.DIRECT_MESSAGE),
    ("busy-not-blocking", Scene(user={"status": "busy"}, config=NO_BUSY_BLOCK),
     R.PREFERENCE_ALL, R.NOT_MENTIONED),
    ("active-offline", Scene(user={"status": "offline"}), R.PREFERENCE_ALL, R.NOT_MENTIONED),
)  # fmt: skip
def test_cause_4_inactive_or_busy(scene: Scene, push: Reason, email: Reason) -> None:
    check(scene, push, email)


@table(
    ("no-push-token", Scene(has_device=False), R.NO_DEVICE, R.NOT_MENTIONED),
    ("no-push-token-dm", Scene(room={"type": "d"}, has_device=False),
     R.NO_DEVICE, R.DIRECT_MESSAGE),
    ("no-verified-address", Scene(room={"type": "d"}, user={"email": None}),
     R.DIRECT_MESSAGE, R.NO_EMAIL_ADDRESS),
    ("both", Scene(room={"type": "d"}), R.DIRECT_MESSAGE, R.DIRECT_MESSAGE),
)  # fmt: skip
def test_cause_5_not_connected_on_a_device(scene: Scene, push: Reason, email: Reason) -> None:
    check(scene, push, email)


@pytest.mark.parametrize("status", ["online", "away", "offline"])
def test_cause_6_presence_delays_a_push_but_never_drops_it(status: str) -> None:
    """Online/away only delay (the queue's job, SPEC §5); the decision carries the status."""
    decision = Scene(room={"type": "d"}, user={"status": status}).decision()
    assert decision.push and decision.push_reason is R.DIRECT_MESSAGE
    assert decision.status == status


@table(
    ("room-nothing", Scene(sub={"mobile_push": "nothing"}), R.PREFERENCE_NOTHING, R.NOT_MENTIONED),
    ("room-nothing-dm", Scene(room={"type": "d"}, sub={"mobile_push": "nothing"}),
     R.PREFERENCE_NOTHING, R.DIRECT_MESSAGE),
    ("account-nothing", Scene(user={"push_preference": "nothing"}),
     R.PREFERENCE_NOTHING, R.NOT_MENTIONED),
    ("server-default-nothing", Scene(settings={"default_push_preference": "nothing"}),
     R.PREFERENCE_NOTHING, R.NOT_MENTIONED),
    ("room-all-beats-account-nothing",
     Scene(sub={"mobile_push": "all"}, user={"push_preference": "nothing"}),
     R.PREFERENCE_ALL, R.NOT_MENTIONED),
    ("account-all-beats-server-nothing",
     Scene(user={"push_preference": "all"}, settings={"default_push_preference": "nothing"}),
     R.PREFERENCE_ALL, R.NOT_MENTIONED),
    ("account-default-means-server", Scene(user={"push_preference": "default"},
     settings={"default_push_preference": "mentions"}), R.NOT_MENTIONED, R.NOT_MENTIONED),
)  # fmt: skip
def test_cause_7_preference_nothing(scene: Scene, push: Reason, email: Reason) -> None:
    check(scene, push, email)


def large(**scene: Any) -> Scene:
    """A scene in a room with more active members than the default limit of 100."""
    return Scene(active_members=101, **scene)


@table(
    ("large-plain", large(), R.LARGE_ROOM, R.LARGE_ROOM),
    ("large-all", large(message={"mentions": (ALL,)}), R.LARGE_ROOM, R.LARGE_ROOM),
    ("large-mentioned", large(message=MENTIONS_BOB), R.MENTIONED, R.MENTIONED),
    ("large-team-mentioned", large(message={"mentions": (mention("T1", "team"),)},
     team_members=frozenset({BOB})), R.MENTIONED, R.MENTIONED),
    ("large-highlight", large(sub={"user_highlights": ("hello",)}),
     R.HIGHLIGHTED, R.HIGHLIGHTED),
    ("large-thread-participant", large(message={"tmid": "p1"}, parent={"replies": (BOB,)}),
     R.THREAD_PARTICIPANT, R.THREAD_PARTICIPANT),
    ("large-room-preference-all", large(sub={"mobile_push": "all"}),
     R.PREFERENCE_ALL, R.LARGE_ROOM),
    ("large-account-all-is-not-enough", large(user={"push_preference": "all"}),
     R.LARGE_ROOM, R.LARGE_ROOM),
    # Rocket.Chat copies the account preference into subscriptions (`mobilePrefOrigin:
    # 'user'`): such an "all" was not chosen for the room.
    ("large-room-all-copied-from-account", large(sub={"mobile_push": "all",
     "mobile_push_inherited": True, "email_notifications": "all", "email_inherited": True}),
     R.LARGE_ROOM, R.LARGE_ROOM),
    ("large-room-email-all", large(sub={"email_notifications": "all"}),
     R.LARGE_ROOM, R.PREFERENCE_ALL),
    ("dm-never-large", large(room={"type": "d"}), R.DIRECT_MESSAGE, R.DIRECT_MESSAGE),
    ("at-the-limit", Scene(active_members=100), R.PREFERENCE_ALL, R.NOT_MENTIONED),
    ("unlimited", Scene(active_members=100_000, settings={"max_room_members": 0}),
     R.PREFERENCE_ALL, R.NOT_MENTIONED),
    ("smaller-limit", Scene(active_members=6, settings={"max_room_members": 5}),
     R.LARGE_ROOM, R.LARGE_ROOM),
)  # fmt: skip
def test_cause_8_large_room(scene: Scene, push: Reason, email: Reason) -> None:
    check(scene, push, email)


# -- the rest of §4 -----------------------------------------------------------------------


@table(
    ("push-enable-false", Scene(room={"type": "d"}, settings={"push_enable": False}),
     R.PUSH_DISABLED, R.DIRECT_MESSAGE),
    # Rocket.Chat's kill switch: "sounds, desktop notifications, mobile notifications,
    # and emails will stop" (it removes the whole notification callback).
    ("troubleshoot-disable", Scene(room={"type": "d"},
     settings={"troubleshoot_disable_notifications": True}),
     R.NOTIFICATIONS_DISABLED, R.NOTIFICATIONS_DISABLED),
    ("push-enabled", Scene(room={"type": "d"}), R.DIRECT_MESSAGE, R.DIRECT_MESSAGE),
)  # fmt: skip
def test_push_disabled_for_the_server(scene: Scene, push: Reason, email: Reason) -> None:
    check(scene, push, email)


DM = {"type": "d"}


@table(
    ("dm-role-lacks-permission", Scene(room=DM, dm_roles=frozenset({"admin"})),
     R.DM_PERMISSION_MISSING, R.DM_PERMISSION_MISSING),
    ("dm-role-has-permission", Scene(room=DM, dm_roles=frozenset({"admin", "user"})),
     R.DIRECT_MESSAGE, R.DIRECT_MESSAGE),
    ("dm-permission-not-configured", Scene(room=DM, dm_roles=None),
     R.DIRECT_MESSAGE, R.DIRECT_MESSAGE),
    ("channel-needs-no-dm-permission", Scene(dm_roles=frozenset({"admin"})),
     R.PREFERENCE_ALL, R.NOT_MENTIONED),
)  # fmt: skip
def test_direct_message_needs_view_d_room(scene: Scene, push: Reason, email: Reason) -> None:
    check(scene, push, email)


MENTIONS_PREF = {"mobile_push": "mentions"}


@table(
    ("here-alone-never", Scene(sub=MENTIONS_PREF, message={"mentions": (HERE,)}),
     R.HERE_NEVER_PUSHES, R.HERE_NEVER_PUSHES),
    ("here-under-all-pushes-anyway", Scene(message={"mentions": (HERE,)}),
     R.PREFERENCE_ALL, R.HERE_NEVER_PUSHES),
    ("all-is-a-mention", Scene(sub=MENTIONS_PREF, message={"mentions": (ALL,)}),
     R.ALL_MENTIONED, R.ALL_MENTIONED),
    ("not-mentioned", Scene(sub=MENTIONS_PREF), R.NOT_MENTIONED, R.NOT_MENTIONED),
    ("named", Scene(sub=MENTIONS_PREF, message=MENTIONS_BOB), R.MENTIONED, R.MENTIONED),
    ("someone-else-named", Scene(sub=MENTIONS_PREF, message={"mentions": (mention(CAROL),)}),
     R.NOT_MENTIONED, R.NOT_MENTIONED),
    ("team-member", Scene(sub=MENTIONS_PREF, message={"mentions": (mention("T1", "team"),)},
     team_members=frozenset({BOB})), R.MENTIONED, R.MENTIONED),
    ("team-id-is-not-a-user", Scene(sub={**MENTIONS_PREF, "uid": "T1"},
     message={"mentions": (mention("T1", "team"),)}), R.NOT_MENTIONED, R.NOT_MENTIONED),
    ("highlight", Scene(sub={**MENTIONS_PREF, "user_highlights": ("Hello",)}),
     R.HIGHLIGHTED, R.HIGHLIGHTED),
    # Ciphertext is base64, where '+' and '/' are word boundaries: "ok" would match.
    ("e2e-ciphertext-is-no-text", Scene(sub={**MENTIONS_PREF, "user_highlights": ("ok",)},
     message={"type": "e2e", "text": "abc+ok/xyz=="}), R.NOT_MENTIONED, R.NOT_MENTIONED),
    ("direct-message", Scene(room=DM, sub=MENTIONS_PREF), R.DIRECT_MESSAGE, R.DIRECT_MESSAGE),
)  # fmt: skip
def test_mentions_preference_and_here(scene: Scene, push: Reason, email: Reason) -> None:
    check(scene, push, email)


THREAD = {"tmid": "p1"}


@table(
    ("non-participant-under-all", Scene(message=THREAD, parent={"replies": (CAROL,)}),
     R.THREAD_NOT_PARTICIPANT, R.THREAD_NOT_PARTICIPANT),
    ("non-participant-at-all", Scene(message={**THREAD, "mentions": (ALL,)}, parent={}),
     R.THREAD_NOT_PARTICIPANT, R.THREAD_NOT_PARTICIPANT),
    ("participant", Scene(message=THREAD, parent={"replies": (CAROL, BOB)}),
     R.THREAD_PARTICIPANT, R.THREAD_PARTICIPANT),
    ("parent-author", Scene(message=THREAD, parent={"sender": UserRef(BOB, "bob")}),
     R.THREAD_PARTICIPANT, R.THREAD_PARTICIPANT),
    ("mentioned-non-participant", Scene(message={**THREAD, **MENTIONS_BOB}, parent={}),
     R.MENTIONED, R.MENTIONED),
    ("parent-missing-mentioned", Scene(message={**THREAD, **MENTIONS_BOB}),
     R.MENTIONED, R.MENTIONED),
    ("parent-missing", Scene(message=THREAD), R.THREAD_NOT_PARTICIPANT, R.THREAD_NOT_PARTICIPANT),
    ("participant-preference-nothing", Scene(message=THREAD, parent={"replies": (BOB,)},
     sub={"mobile_push": "nothing"}), R.PREFERENCE_NOTHING, R.THREAD_PARTICIPANT),
    # "Also send to channel" (`tshow`): a room message as well.
    ("also-sent-to-the-room", Scene(message={**THREAD, "shown_in_room": True}, parent={}),
     R.PREFERENCE_ALL, R.NOT_MENTIONED),
    # A DM's first thread reply goes to its members; Rocket.Chat then writes them into
    # `replies` (read before or after that write, the first reply notifies them), and
    # `replies` rules the replies after it: a member who unfollowed gets none.
    ("dm-first-reply", Scene(room=DM, message=THREAD, parent={}),
     R.DIRECT_MESSAGE, R.DIRECT_MESSAGE),
    ("dm-first-reply-counted", Scene(room=DM, message=THREAD,
     parent={"thread_count": 1, "replies": ("A", BOB)}), R.DIRECT_MESSAGE, R.DIRECT_MESSAGE),
    ("dm-unfollowed", Scene(room=DM, message=THREAD,
     parent={"thread_count": 3, "replies": ("A",)}),
     R.THREAD_NOT_PARTICIPANT, R.THREAD_NOT_PARTICIPANT),
)  # fmt: skip
def test_thread_replies_notify_participants_and_mentioned(
    scene: Scene, push: Reason, email: Reason
) -> None:
    check(scene, push, email)


CALL = {"type": "videoconf"}
PAIR = {**DM, "users_count": 2}
RINGING = {"videoconf_mobile_ringing": True, "default_mobile_ringing": True}


@table(
    ("call-rings-instead", Scene(room=PAIR, message=CALL, settings=RINGING),
     R.CALL_RINGS, R.DIRECT_MESSAGE),
    ("ringing-off-for-the-server", Scene(room=PAIR, message=CALL),
     R.DIRECT_MESSAGE, R.DIRECT_MESSAGE),
    ("ringing-off-for-the-user", Scene(room=PAIR, message=CALL, settings=RINGING,
     user={"mobile_ringing": False}), R.DIRECT_MESSAGE, R.DIRECT_MESSAGE),
    ("ringing-on-for-the-user", Scene(room=PAIR, message=CALL, user={"mobile_ringing": True},
     settings={"videoconf_mobile_ringing": True}), R.CALL_RINGS, R.DIRECT_MESSAGE),
    ("group-dm-call-pushes", Scene(room={**DM, "users_count": 3}, message=CALL,
     settings=RINGING), R.DIRECT_MESSAGE, R.DIRECT_MESSAGE),
    ("plain-dm-message", Scene(room=PAIR, settings=RINGING), R.DIRECT_MESSAGE, R.DIRECT_MESSAGE),
)  # fmt: skip
def test_a_call_in_a_dm_rings_instead_of_pushing(scene: Scene, push: Reason, email: Reason) -> None:
    """Rocket.Chat pushes the ring itself (VideoConf_Mobile_Ringing); a push of the call's
    message as well would notify the callee twice."""
    check(scene, push, email)


NO_EMAIL = Config(email=EmailConfig(enabled=False))


@table(
    ("server-disallows", Scene(room=DM, settings={"allow_email_notifications": False}),
     R.DIRECT_MESSAGE, R.EMAIL_DISABLED),
    ("config-disables", Scene(room=DM, config=NO_EMAIL), R.DIRECT_MESSAGE, R.EMAIL_DISABLED),
    ("connected", Scene(room=DM, user={"status_connection": "online", "status": "online"}),
     R.DIRECT_MESSAGE, R.USER_ONLINE_ON_DESKTOP),
    ("away-connection-emails", Scene(room=DM, user={"status_connection": "away"}),
     R.DIRECT_MESSAGE, R.DIRECT_MESSAGE),
    ("room-email-all", Scene(sub={"email_notifications": "all"}),
     R.PREFERENCE_ALL, R.PREFERENCE_ALL),
    ("room-email-nothing", Scene(room=DM, sub={"email_notifications": "nothing"}),
     R.DIRECT_MESSAGE, R.PREFERENCE_NOTHING),
    ("account-email-all", Scene(user={"email_preference": "all"}),
     R.PREFERENCE_ALL, R.PREFERENCE_ALL),
    ("server-email-nothing", Scene(message=MENTIONS_BOB,
     settings={"default_email_preference": "nothing"}), R.MENTIONED, R.PREFERENCE_NOTHING),
    ("default-mentions-plain", Scene(), R.PREFERENCE_ALL, R.NOT_MENTIONED),
    ("default-mentions-named", Scene(message=MENTIONS_BOB), R.MENTIONED, R.MENTIONED),
    ("busy-still-emails", Scene(room=DM, user={"status": "busy"}), R.USER_BUSY, R.DIRECT_MESSAGE),
)  # fmt: skip
def test_email_rules(scene: Scene, push: Reason, email: Reason) -> None:
    check(scene, push, email)


@pytest.mark.parametrize(
    ("text", "highlight", "expected"),
    [
        ("the highlighted text", "light", False),
        ("Light it up", "light", True),
        ("say :light: now", "light", False),
        ("so :thumbsup:", "thumbsup", False),
        ("THUMBSUP now", "thumbsup", True),
        ("ship it, release!", "Release", True),
        ("releases are out", "release", False),
        ("c++ rocks", "c++", True),
        ("the new release notes", "release notes", True),
        ("anything", "  ", False),
        ("", "release", False),
        # Case folded the way Rocket.Chat's `iu` regex folds: one letter for one letter.
        ("Die Straße ist zu", "strasse", False),
        ("DIE STRAẞE IST ZU", "straße", True),
        ("ПРИВЕТ всем", "привет", True),
        ("the ﬁle is here", "file", False),
        # JavaScript's `iu` keeps the Turkish dotless ı and dotted İ apart from i and I;
        # Python's IGNORECASE joins all four. These are the only letters on which the two
        # differ (every case pair in Unicode compared against node).
        ("İstanbul'da", "istanbul", False),
        ("KIRMIZI alarm", "kırmızı", False),
        ("ıiı", "IIİ", False),
        ("Istanbul", "istanbul", True),
        ("İSTANBUL", "İstanbul", True),
        ("kırmızı alarm", "kırmızı", True),
    ],
)
def test_highlights_are_case_insensitive_whole_words(
    text: str, highlight: str, expected: bool
) -> None:
    assert is_highlighted(highlight_text(text), [highlight]) is expected


def test_decision_names_the_message_and_recipient() -> None:
    decision = Scene(room=DM, user={"status": "away"}).decision()
    assert dataclasses.astuple(decision) == (
        BOB, "R1", "m1", True, R.DIRECT_MESSAGE, True, R.DIRECT_MESSAGE, "away"
    )  # fmt: skip


def test_reason_codes_are_stable_snake_case_and_explained_in_words() -> None:
    codes = [reason.code for reason in Reason]
    assert len(set(codes)) == len(codes)
    assert all(code.replace("_", "").isalpha() and code.islower() for code in codes)
    assert Reason.SENDER_IGNORED.code == "sender_ignored"
    assert all(" " in reason.value for reason in Reason)
    assert {r for r in Reason if r.notifies} == {
        R.DIRECT_MESSAGE,
        R.MENTIONED,
        R.HIGHLIGHTED,
        R.THREAD_PARTICIPANT,
        R.PREFERENCE_ALL,
        R.ALL_MENTIONED,
    }
