"""Decisions per second for an @all message in a 10,000-member room (pure rules only).

Run by hand: `python -m bench.rules`. Target: ≥ 200,000 decisions/s on the CI machine.
The documents are parsed once up front, as the sources' caches hold them; what
is measured is `plan_message` once plus `decide` for every member.
"""

from __future__ import annotations

import time

from streamer.config import Config
from streamer.model import Message, Room, Settings, Subscription, User
from streamer.rules import decide, plan_message

MEMBERS = 10_000
ROUNDS = 5


def _room_documents() -> tuple[Message, Room, list[Subscription], dict[str, User]]:
    room = Room.from_doc({"_id": "BIG", "t": "c", "name": "big", "usersCount": MEMBERS})
    message = Message.from_doc(
        {
            "_id": "m1",
            "rid": "BIG",
            "msg": "@all release is out, see the notes :tada:",
            "ts": 1_700_000_000.0,
            "u": {"_id": "u0", "username": "user0"},
            "mentions": [{"_id": "all", "username": "all"}],
        }
    )
    subscriptions = [
        Subscription.from_doc(
            {
                "_id": f"s{i}",
                "rid": "BIG",
                "u": {"_id": f"u{i}"},
                "t": "c",
                "userHighlights": ["release"] if i % 10 == 0 else [],
                "mobilePushNotifications": "all" if i % 7 == 0 else None,
                "muteGroupMentions": i % 13 == 0,
            }
        )
        for i in range(MEMBERS)
    ]
    users = {
        f"u{i}": User.from_doc(
            {
                "_id": f"u{i}",
                "username": f"user{i}",
                "status": ("online", "away", "busy", "offline")[i % 4],
                "roles": ["user"],
                "emails": [{"address": f"user{i}@example.org", "verified": True}],
            }
        )
        for i in range(MEMBERS)
    }
    return message, room, subscriptions, users


def main() -> None:
    message, room, subscriptions, users = _room_documents()
    config = Config()
    for limit, label in ((0, "unlimited room"), (100, "large room (limit 100)")):
        settings = Settings(max_room_members=limit)
        best = float("inf")
        pushes = 0
        for _ in range(ROUNDS):
            started = time.perf_counter()
            plan = plan_message(message, room, settings, config, active_members=MEMBERS)
            decisions = [decide(plan, sub, users.get(sub.uid), True) for sub in subscriptions]
            best = min(best, time.perf_counter() - started)
            pushes = sum(d.push for d in decisions)
        print(
            f"{label}: {MEMBERS:,} decisions in {best * 1000:.1f} ms = "
            f"{MEMBERS / best:,.0f} decisions/s ({pushes:,} pushes)"
        )


if __name__ == "__main__":
    main()
