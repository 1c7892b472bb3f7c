"""Properties of the rules that hold for every input, found by hypothesis."""

from __future__ import annotations

import datetime as dt
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st

from streamer.config import Config, RulesConfig
from streamer.directory import parse_or_log
from streamer.model import (
    PUSH_PREFERENCES,
    Mention,
    Message,
    PushToken,
    Room,
    Settings,
    Subscription,
    User,
    UserRef,
)
from streamer.rules import Decision, decide, message_skip_reason, plan_message

NOW = 1_700_000_000.0
SENDER = "u-alice"
UIDS = [SENDER, "u-bob", "u-carol", "u-dave"]
uids = st.sampled_from(UIDS)
preferences = st.sampled_from(sorted(PUSH_PREFERENCES))
presences = st.sampled_from(["online", "away", "busy", "offline"])
words = st.text(alphabet="abcdefg :!@", max_size=30)

mentions = st.lists(
    st.builds(
        Mention,
        id=st.sampled_from([*UIDS, "all", "here", "T1"]),
        type=st.sampled_from([None, "user", "team"]),
    ),
    max_size=4,
).map(tuple)
messages = st.builds(
    Message,
    id=st.just("m1"),
    rid=st.just("R1"),
    text=words,
    ts=st.just(NOW),
    sender=st.just(UserRef(SENDER, "alice")),
    type=st.sampled_from([None, "e2e", "uj"]),
    tmid=st.sampled_from([None, "p1"]),
    mentions=mentions,
)
rooms = st.builds(Room, id=st.just("R1"), type=st.sampled_from(["c", "p", "d", "l"]))
subscriptions = st.builds(
    Subscription,
    id=st.just("s1"),
    rid=st.just("R1"),
    uid=uids,
    room_type=st.sampled_from(["c", "p", "d"]),
    disable_notifications=st.booleans(),
    ignored=st.frozensets(uids, max_size=2),
    mute_group_mentions=st.booleans(),
    mobile_push=preferences,
    email_notifications=preferences,
    user_highlights=st.lists(words, max_size=2).map(tuple),
)
users = st.builds(
    User,
    id=uids,
    username=st.just("someone"),
    active=st.booleans(),
    status=presences,
    status_connection=st.sampled_from([None, "online", "away", "offline"]),
    email=st.sampled_from([None, "someone@example.org"]),
    push_preference=st.none() | preferences,
    email_preference=st.none() | preferences,
    roles=st.lists(st.sampled_from(["user", "guest", "admin"]), max_size=2).map(tuple),
)
all_settings = st.builds(
    Settings,
    push_enable=st.booleans(),
    max_room_members=st.integers(0, 5),
    default_push_preference=st.sampled_from(["all", "mentions", "nothing"]),
    default_email_preference=st.sampled_from(["all", "mentions", "nothing"]),
)
configs = st.builds(Config, rules=st.builds(RulesConfig, busy_blocks_push=st.booleans()))


def decide_one(
    message: Message,
    room: Room,
    sub: Subscription,
    user: User | None,
    settings: Settings = Settings(),  # noqa: B008 - frozen
    config: Config = Config(),  # noqa: B008 - frozen
    active_members: int = 2,
    has_device: bool = True,
) -> Decision:
    plan = plan_message(
        message,
        room,
        settings,
        config,
        parent=Message(id="p1", rid="R1", text="", ts=NOW - 60, sender=UserRef("u-carol", "c")),
        team_members=frozenset({"u-dave"}),
        active_members=active_members,
        dm_roles=frozenset({"user"}),
    )
    return decide(plan, sub, user, has_device)


@given(messages, rooms, subscriptions, users, all_settings, configs, st.integers(0, 10))
def test_the_sender_never_gets_a_push(
    message: Message,
    room: Room,
    sub: Subscription,
    user: User,
    settings: Settings,
    config: Config,
    members: int,
) -> None:
    own = Subscription(**{**_fields(sub), "uid": SENDER})
    decision = decide_one(message, room, own, user, settings, config, members)
    assert not decision.push and not decision.email


@given(messages, rooms, subscriptions, users, all_settings, configs, st.integers(0, 10))
def test_disabled_room_notifications_never_notify(
    message: Message,
    room: Room,
    sub: Subscription,
    user: User,
    settings: Settings,
    config: Config,
    members: int,
) -> None:
    disabled = Subscription(**{**_fields(sub), "disable_notifications": True})
    decision = decide_one(message, room, disabled, user, settings, config, members)
    assert not decision.push and not decision.email


@given(
    text=words,
    mentioned=mentions,
    status=st.sampled_from(["online", "away", "offline"]),
    members=st.integers(0, 100_000),
)
def test_a_direct_message_always_pushes_to_an_ordinary_recipient(
    text: str, mentioned: tuple[Mention, ...], status: str, members: int
) -> None:
    """Active, not ignoring the sender, with a device, default preferences, not Busy."""
    message = Message(
        id="m1", rid="D1", text=text, ts=NOW, sender=UserRef(SENDER, "alice"), mentions=mentioned
    )
    sub = Subscription(id="s1", rid="D1", uid="u-bob", room_type="d")
    user = User(id="u-bob", username="bob", status=status, roles=("user",))  # type: ignore[arg-type]
    decision = decide_one(message, Room(id="D1", type="d"), sub, user, active_members=members)
    assert decision.push


def _fields(sub: Subscription) -> dict[str, Any]:
    return {name: getattr(sub, name) for name in Subscription.__slots__}


# -- arbitrary documents, through the parsers and the rules --------------------------------

#: Characters BSON strings can hold (valid UTF-8: no lone surrogates).
PLAIN = st.characters(blacklist_categories=("Cs",))
#: Any value a BSON document can hold (so the same documents can go into the real mongod).
junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(PLAIN, max_size=10)
    | st.datetimes(timezones=st.none() | st.just(dt.UTC)),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text("abcxyz_", min_size=1, max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


def field(realistic: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a realistic value, sometimes junk: so that many documents reach the rules."""
    return st.sampled_from([*[realistic] * 7, junk]).flatmap(lambda chosen: chosen)


def document(
    required: tuple[str, ...] = (), **fields: st.SearchStrategy[Any]
) -> st.SearchStrategy[dict[str, Any]]:
    """A document whose `required` keys are always present (mostly realistic, sometimes junk)."""
    return st.fixed_dictionaries(
        {k: field(v) for k, v in fields.items() if k in required},
        optional={k: field(v) for k, v in fields.items() if k not in required},
    )


when = st.just(dt.datetime.fromtimestamp(NOW, dt.UTC))
mention_docs = st.lists(
    document(_id=st.sampled_from([*UIDS, "all", "here", "T1"]), type=st.just("team")), max_size=3
)
message_docs = document(
    ("_id", "rid", "ts", "u"),
    _id=st.just("m1"),
    rid=st.just("R1"),
    msg=words,
    ts=when,
    u=document(("_id",), _id=uids, username=st.text(PLAIN, max_size=5)),
    t=st.sampled_from(["uj", "e2e", "videoconf"]),
    tmid=st.just("p1"),
    mentions=mention_docs,
    replies=st.lists(uids),
    _hidden=st.booleans(),
    editedAt=when,
)
room_docs = document(
    ("_id", "t"),
    _id=st.just("R1"),
    t=st.sampled_from(["c", "p", "d", "l", "x"]),
    usersCount=st.integers(-(2**63), 2**63 - 1),
)
subscription_docs = document(
    ("_id", "rid", "u"),
    _id=st.text(PLAIN, min_size=1, max_size=3),
    rid=st.just("R1"),
    u=document(("_id",), _id=uids),
    t=st.sampled_from(["c", "d"]),
    ls=when,
    disableNotifications=st.booleans(),
    ignored=st.lists(uids),
    muteGroupMentions=st.booleans(),
    mobilePushNotifications=preferences,
    emailNotifications=preferences,
    userHighlights=st.lists(words),
)
user_docs = document(
    ("_id",),
    _id=uids,
    username=st.text(PLAIN, max_size=5),
    active=st.booleans(),
    status=presences,
    statusConnection=presences,
    emails=st.lists(document(address=st.just("x@example.org"), verified=st.booleans())),
    settings=document(
        preferences=document(pushNotifications=preferences, emailNotificationMode=preferences)
    ),
    roles=st.lists(st.sampled_from(["user", "guest"])),
    _updatedAt=when,
)
token_docs = document(
    ("_id", "token", "userId"),
    _id=st.text(PLAIN, min_size=1, max_size=3),
    token=document(gcm=st.text(PLAIN, max_size=5), apn=st.text(PLAIN, max_size=5)),
    userId=uids,
    enabled=st.booleans(),
)
setting_values = st.dictionaries(
    st.sampled_from(
        [
            "Push_enable",
            "Notifications_Max_Room_Members",
            "Accounts_Default_User_Preferences_pushNotifications",
            "Accounts_Default_User_Preferences_emailNotificationMode",
            "Accounts_AllowEmailNotifications",
            "Troubleshoot_Disable_Notifications",
        ]
    ),
    junk | st.sampled_from(["all", "nothing", "mentions", True, False, 0, 3, "5"]),
)


@settings(max_examples=300)
@given(
    message_doc=message_docs,
    parent_doc=message_docs,
    room_doc=room_docs,
    sub_docs=st.lists(subscription_docs, max_size=4),
    user_docs=st.lists(user_docs, max_size=4),
    token_docs=st.lists(token_docs, max_size=4),
    values=setting_values,
)
def test_arbitrary_documents_never_make_the_rules_raise(
    message_doc: dict[str, Any],
    parent_doc: dict[str, Any],
    room_doc: dict[str, Any],
    sub_docs: list[dict[str, Any]],
    user_docs: list[dict[str, Any]],
    token_docs: list[dict[str, Any]],
    values: dict[str, Any],
) -> None:
    """What the parsers accept, the rules decide; what they reject is skipped, not raised."""
    message = parse_or_log(Message.from_doc, message_doc)
    room = parse_or_log(Room.from_doc, room_doc)
    subs = [s for s in (parse_or_log(Subscription.from_doc, d) for d in sub_docs) if s]
    people = {u.id: u for u in (parse_or_log(User.from_doc, d) for d in user_docs) if u}
    owners = {t.uid for t in (parse_or_log(PushToken.from_doc, d) for d in token_docs) if t}
    settings = Settings.from_values(values)
    if message is None or room is None:
        return
    message_skip_reason(message, room, NOW)
    event(f"rules reached with {len(subs)} subscription(s)")
    plan = plan_message(
        message,
        room,
        settings,
        Config(),
        parent=parse_or_log(Message.from_doc, parent_doc),
        active_members=len(people),
    )
    for sub in subs:
        decision = decide(plan, sub, people.get(sub.uid), sub.uid in owners)
        assert decision.push == decision.push_reason.notifies
        assert decision.email == decision.email_reason.notifies
