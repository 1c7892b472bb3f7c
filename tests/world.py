"""A seeded Rocket.Chat world and the daemon's config file, shared by the daemon-level tests.

End-to-end and chaos tests all need the same thing: a database a real
Rocket.Chat would have written (settings, a workspace token, users with push
tokens, rooms), a config file pointing the daemon at it and at a local gateway,
and a way to count what reached that gateway.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path
from typing import Any

from pymongo.database import Database

from tests import factories as f
from tests.servers import Recorded

Doc = dict[str, Any]
GCM = "/push/gcm/send"


class World:
    """A seeded Rocket.Chat database: alice writes, bob (and others) receive."""

    def __init__(self, db: Database[Doc]) -> None:
        self.db = db
        self.alice = f.user("alice", status="online")
        self.bob = f.user("bob")
        db.users.insert_many([self.alice, self.bob])
        db.rocketchat_settings.insert_many(f.default_settings())
        db.rocketchat_permissions.insert_one({"_id": "view-d-room", "roles": ["user", "admin"]})
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        db.rocketchat_workspace_credentials.insert_one(
            {"_id": "wc", "scope": "", "accessToken": "ws-token", "expirationDate": expires}
        )
        db.get_collection("_raix_push_app_tokens").insert_one(f.push_token(self.bob))
        self.dm = f.room("alicebob", t="d", usersCount=2)
        self.channel = f.room("GENERAL", t="c", usersCount=2)
        db.rocketchat_room.insert_many([self.dm, self.channel])
        self.bob_dm = f.subscription(self.bob, self.dm)
        self.bob_general = f.subscription(self.bob, self.channel)
        db.rocketchat_subscription.insert_many(
            [
                f.subscription(self.alice, self.dm),
                self.bob_dm,
                f.subscription(self.alice, self.channel),
                self.bob_general,
            ]
        )

    def say(self, room: Doc, text: str = "hello bob", **fields: Any) -> Doc:
        doc = f.message(room, self.alice, text, **fields)
        self.db.rocketchat_message.insert_one(doc)
        return doc

    def add_offline_members(self, count: int) -> list[Doc]:
        """`count` more offline members of the channel, each with one Android device."""
        members = [f.user(f"member{n}") for n in range(count)]
        self.db.users.insert_many(members)
        self.db.rocketchat_subscription.insert_many(
            [f.subscription(u, self.channel) for u in members]
        )
        self.db.get_collection("_raix_push_app_tokens").insert_many(
            [f.push_token(u) for u in members]
        )
        return members

    def channel_tokens(self, members: list[Doc]) -> list[str]:
        """The device tokens every channel message should reach: bob's and the members'."""
        return [f"gcm-device-{u['username']}" for u in [self.bob, *members]]


def pushes_by_key(requests: list[Recorded]) -> Counter[tuple[str, str]]:
    """How often each (device token, message id) reached the gateway."""
    return Counter(
        (body["token"], body["options"]["payload"]["messageId"])
        for body in (r.json() for r in requests)
    )


def settled(db: Database[Doc], total: int) -> bool:
    """Every push has a ledger record and the queue is empty: nothing more will be sent."""
    return db.streamer_sent.count_documents({}) >= total and not db.streamer_queue.find_one()


def write_config(
    path: Path,
    mongo_uri: str,
    db_name: str,
    gateway_url: str,
    app: dict[str, Any] | None = None,
    delivery: dict[str, Any] | None = None,
    email: dict[str, Any] | None = None,
    **queue: Any,
) -> Path:
    """A config file as an operator writes it; `queue`, `app`, `delivery` and `email`
    add keys (as TOML values) to those sections."""

    def lines(keys: dict[str, Any] | None) -> str:
        return "\n".join(f"{key} = {value}" for key, value in (keys or {}).items())

    queue_lines, app_lines, delivery_lines = lines(queue), lines(app), lines(delivery)
    path.write_text(
        f"""
[mongo]
uri = "{mongo_uri}"
database = "{db_name}"
[queue]
{queue_lines}
[delivery]
gateway_urls = ["{gateway_url}"]
retry_initial = 0.1
retry_max = 0.5
{delivery_lines}
[email]
{lines(email)}
[http]
listen = "127.0.0.1:0"
[log]
level = "debug"
[app]
shutdown_grace = 5.0
{app_lines}
"""
    )
    return path
