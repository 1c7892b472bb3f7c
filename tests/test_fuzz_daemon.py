"""Bad input: hypothesis-generated Rocket.Chat documents written while ONE daemon runs.

Each test starts `streamer run` once and lets hypothesis write many examples into
the real collections: documents with wrong types, missing fields, huge strings,
deep nesting, unicode edge cases and unknown message types, each example ending
with a good message to bob. The promise checked after every example: the daemon
is alive, bob's push arrived, and every bad document was logged exactly once
with its `_id` (in a line of bounded size).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from bson import ObjectId
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pymongo.database import Database

from tests import factories as f
from tests.daemon import Daemon, wait_until
from tests.servers import StubApp, serve_http
from tests.world import GCM, World, write_config

Doc = dict[str, Any]
DELETE = object()
#: No log line may be longer: a huge bad value must not become a huge log line.
MAX_LINE = 4096
EXAMPLES = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    # Shrinking replays examples against the live daemon, each up to a timeout: too slow.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_serial = itertools.count()

# --- values -------------------------------------------------------------------------------

UNICODE = st.sampled_from(
    [
        "",
        "\u200b",  # zero-width space
        "\u202e\u0645\u0631\u062d\u0628\u0627",  # right-to-left override, Arabic
        "e\u0301\u0301\u0301",  # stacked combining accents
        "\U0001f469\u200d\U0001f469\u200d\U0001f467",  # a ZWJ family
        "\ufeff\ufffd\U0010ffff",  # BOM, replacement char, last code point
        "\x00nul\x1b[31m",  # NUL and an ANSI escape
        ":thumbsup: @all @here",
    ]
)
TEXT = st.one_of(UNICODE, st.text(st.characters(exclude_categories=["Cs"]), max_size=40))
HUGE = st.integers(100_000, 2_000_000).map(lambda n: "\u00e9" * n)


def nested(depth: int) -> Doc:
    doc: Doc = {"leaf": "x"}
    for _ in range(depth):
        doc = {"n": doc}
    return doc


DEEP = st.integers(20, 90).map(nested)
INT64 = st.integers(-(2**63), 2**63 - 1)
NOT_TEXT = st.one_of(
    INT64,
    st.floats(),
    st.booleans(),
    st.lists(INT64, max_size=3),
    st.dictionaries(st.sampled_from("abc"), INT64, max_size=2),
    st.binary(max_size=8),
    DEEP,
)
NOT_A_DOCUMENT = st.one_of(INT64, st.booleans(), TEXT, HUGE, st.lists(INT64, max_size=5))


#: Rocket.Chat's ids are strings; an ObjectId `_id` is a bad document whatever else it holds.
BAD_ID = st.one_of(st.builds(lambda: f"bad-{next(_serial)}"), st.builds(ObjectId))


# --- bad documents: each mutation makes a realistic document one the parser must reject ----

ALICE = f.user("alice")
ELSEWHERE = f.room("fuzz-room", t="c")


def mutate(doc: Doc, path: str, value: Any) -> Doc:
    *parents, leaf = path.split(".")
    target = doc
    for key in parents:
        target = target[key]
    if value is DELETE:
        target.pop(leaf, None)
    else:
        target[leaf] = value
    return doc


@st.composite
def bad_message(draw: st.DrawFn) -> Doc:
    path, value = draw(
        st.one_of(
            st.tuples(st.just("rid"), st.one_of(NOT_TEXT, st.just(""), st.just(DELETE))),
            st.tuples(st.just("u"), st.one_of(NOT_A_DOCUMENT)),
            st.tuples(st.just("u._id"), st.one_of(NOT_TEXT, st.just(DELETE))),
            st.tuples(st.just("msg"), NOT_TEXT),
            st.tuples(st.just("ts"), st.one_of(TEXT, HUGE, st.booleans(), st.just(DELETE))),
            st.tuples(st.just("t"), NOT_TEXT),
            st.tuples(st.just("tmid"), NOT_TEXT),
            st.tuples(st.just("mentions"), st.one_of(TEXT, HUGE, INT64, DEEP)),
        )
    )
    message = f.message(ELSEWHERE, ALICE, draw(st.one_of(TEXT, HUGE)), _id=draw(BAD_ID))
    return mutate(message, path, value)


@st.composite
def bad_subscription(draw: st.DrawFn) -> Doc:
    path, value = draw(
        st.one_of(
            st.tuples(st.just("rid"), st.one_of(NOT_TEXT, st.just(DELETE))),
            st.tuples(st.just("u"), NOT_A_DOCUMENT),
            st.tuples(st.just("u._id"), st.one_of(NOT_TEXT, st.just(DELETE))),
            st.tuples(st.just("ls"), st.one_of(TEXT, HUGE)),
            st.tuples(st.just("mobilePushNotifications"), st.one_of(TEXT, HUGE, NOT_TEXT)),
        )
    )
    user = f.user(f"ghost{next(_serial)}")
    subscription = f.subscription(user, ELSEWHERE, _id=draw(BAD_ID))
    if path == "mobilePushNotifications" and value in ("", "all", "mentions", "nothing"):
        value = "sometimes"
    return mutate(subscription, path, value)


@st.composite
def bad_user(draw: st.DrawFn) -> Doc:
    path, value = draw(
        st.one_of(
            st.tuples(st.just("status"), st.one_of(TEXT, HUGE, NOT_TEXT)),
            st.tuples(st.just("username"), NOT_TEXT),
            st.tuples(st.just("_updatedAt"), st.one_of(TEXT, HUGE)),
        )
    )
    if path == "status" and value in ("", "online", "away", "busy", "offline"):
        value = "invisible"
    return mutate(f.user(f"fuzzed{next(_serial)}", _id=draw(BAD_ID)), path, value)


@st.composite
def bad_push_token(draw: st.DrawFn) -> Doc:
    """Another device of bob's, broken: read on every reload of his devices."""
    path, value = draw(
        st.one_of(
            st.tuples(st.just("token"), st.one_of(NOT_A_DOCUMENT, st.just(DELETE))),
            st.tuples(st.just("token"), st.fixed_dictionaries({"gcm": NOT_TEXT})),
            st.tuples(st.just("token"), st.fixed_dictionaries({"fcm": TEXT})),
            st.tuples(st.just("appName"), NOT_TEXT),
        )
    )
    return mutate(f.push_token(f.user("bob"), _id=draw(BAD_ID)), path, value)


BAD = {
    "_raix_push_app_tokens": bad_push_token(),
    "rocketchat_message": bad_message(),
    "rocketchat_subscription": bad_subscription(),
    "users": bad_user(),
}


def json_id(doc_id: Any) -> Any:
    """The `_id` as a JSON log line carries it."""
    return str(doc_id) if isinstance(doc_id, ObjectId) else doc_id


# --- the daemon -----------------------------------------------------------------------------


@pytest.fixture
def world(sync_db: Database[Doc]) -> World:
    return World(sync_db)


@pytest.fixture
def running(
    world: World, tmp_path: Path, mongo_uri: str, db_name: str
) -> Iterator[tuple[Daemon, StubApp]]:
    """One daemon for the whole test: hypothesis's examples all go to it."""
    stub = StubApp()
    with serve_http(stub) as url:
        config = write_config(tmp_path / "config.toml", mongo_uri, db_name, url)
        with Daemon(config, env={"STREAMER_LOG__LEVEL": '"info"'}) as daemon:
            daemon.wait_for_log("started", timeout=60)
            try:
                yield daemon, stub
            finally:
                print("\n".join(line[:1000] for line in daemon.raw[-30:]))  # shown on failure
            assert daemon.process is not None and daemon.process.poll() is None, "daemon died"
            long_lines = [line[:200] for line in daemon.raw if len(line) > MAX_LINE]
            assert long_lines == [], "log lines longer than {MAX_LINE} bytes"
            assert daemon.terminate() == 0


def pushed_mids(stub: StubApp) -> set[str]:
    return {r.json()["options"]["payload"]["messageId"] for r in stub.received(GCM)}


def malformed(daemon: Daemon, doc_id: Any) -> list[dict[str, Any]]:
    return daemon.logs("malformed_document", doc_id=json_id(doc_id))


@given(
    bad=st.lists(st.tuples(st.sampled_from(sorted(BAD)), st.data()), min_size=1, max_size=4),
    text=st.one_of(TEXT, HUGE),
    system_type=TEXT.filter(lambda t: t not in ("", "e2e", "videoconf")),
)
@EXAMPLES
def test_bad_documents_are_logged_once_and_good_messages_around_them_still_push(
    running: tuple[Daemon, StubApp],
    world: World,
    bad: list[tuple[str, st.DataObject]],
    text: str,
    system_type: str,
) -> None:
    daemon, stub = running
    written = []
    for collection, data in bad:
        doc = data.draw(BAD[collection])
        world.db[collection].insert_one(doc)
        written.append(doc)
    system = world.say(world.dm, "joined", t=system_type)
    good = world.say(world.dm, text)

    wait_until(lambda: good["_id"] in pushed_mids(stub), 30, lambda: f"push of {good['_id']}")
    for doc in written:
        wait_until(
            lambda d=doc: malformed(daemon, d["_id"]), 30, lambda d=doc: f"log of {str(d)[:300]}"
        )
    (decided,) = daemon.wait_for_log("message_decided", mid=system["_id"])
    assert decided["reason"] == "system_message"
    assert system["_id"] not in pushed_mids(stub)
    for doc in written:
        assert len(malformed(daemon, doc["_id"])) == 1, f"logged more than once: {doc['_id']}"
    [push] = [
        r.json()
        for r in stub.received(GCM)
        if r.json()["options"]["payload"]["messageId"] == good["_id"]
    ]
    assert len(push["options"]["text"]) <= 240
    assert orjson.dumps(push)


BAD_SETTINGS = {
    "Notifications_Max_Room_Members": "abc",
    "Push_enable": ["yes"],
    "Push_show_message": {"$numberInt": "1"},
    "Push_show_username_room": "\u00e9" * 100_000,
    "Site_Url": 42,
    "uniqueID": nested(80),
}


def test_bad_setting_values_are_logged_and_their_defaults_used(
    world: World, sync_db: Database[Doc], running: tuple[Daemon, StubApp]
) -> None:
    daemon, stub = running
    for setting_id, value in BAD_SETTINGS.items():
        sync_db.rocketchat_settings.update_one(
            {"_id": setting_id}, {"$set": {"value": value}}, upsert=True
        )
    for setting_id in BAD_SETTINGS:
        daemon.wait_for_log("bad_setting", problem=_contains(f"setting {setting_id}="))
    message = world.say(world.dm, "still pushed")
    wait_until(lambda: message["_id"] in pushed_mids(stub), 30, lambda: "the push")
    (decided,) = daemon.wait_for_log("message_decided", mid=message["_id"])
    assert decided["pushes"] == 1  # Push_enable's default (true) and the room limit's (100)


class _contains(str):
    """Matches a log field containing this text (for `Daemon.logs(field=...)`)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and str(self) in other

    __hash__ = str.__hash__
