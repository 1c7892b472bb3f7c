"""Realistic Rocket.Chat documents, shaped like SPEC.md §2, for seeding the real mongod.

Each factory returns the dict Rocket.Chat would store; keyword arguments
override or add fields, so a test states only what matters to it.
"""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

from streamer.delivery.base import PushContent

Doc = dict[str, Any]
_ids = itertools.count(1)


def new_id(prefix: str = "id") -> str:
    return f"{prefix}{next(_ids):06d}"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def user(username: str, **fields: Any) -> Doc:
    doc: Doc = {
        "_id": fields.pop("_id", f"u-{username}"),
        "username": username,
        "name": username.title(),
        "active": True,
        "status": "offline",
        "statusConnection": "offline",
        "type": "user",
        "roles": ["user"],
        "emails": [{"address": f"{username}@example.org", "verified": True}],
        "settings": {"preferences": {}},
        "_updatedAt": utcnow(),
    }
    doc.update(fields)
    return doc


def room(rid: str, t: str = "c", **fields: Any) -> Doc:
    doc: Doc = {"_id": rid, "t": t, "name": rid.lower(), "fname": rid, "usersCount": 2}
    doc.update(fields)
    return doc


def subscription(user_doc: Doc, room_doc: Doc, **fields: Any) -> Doc:
    doc: Doc = {
        "_id": new_id("s"),
        "rid": room_doc["_id"],
        "u": {"_id": user_doc["_id"], "username": user_doc["username"]},
        "t": room_doc["t"],
        "name": room_doc.get("name"),
        "fname": room_doc.get("fname"),
        "open": True,
        "alert": False,
        "unread": 0,
        "ls": utcnow() - dt.timedelta(minutes=5),
        "ts": utcnow() - dt.timedelta(days=1),
        "_updatedAt": utcnow(),
    }
    doc.update(fields)
    return doc


def message(room_doc: Doc, sender: Doc, text: str = "hello", **fields: Any) -> Doc:
    doc: Doc = {
        "_id": new_id("m"),
        "rid": room_doc["_id"],
        "msg": text,
        "ts": utcnow(),
        "u": {"_id": sender["_id"], "username": sender["username"], "name": sender.get("name")},
        "mentions": [],
        "_updatedAt": utcnow(),
    }
    doc.update(fields)
    return doc


def mention(user_doc: Doc) -> Doc:
    return {"_id": user_doc["_id"], "username": user_doc["username"], "type": "user"}


def push_token(user_doc: Doc, kind: str = "gcm", **fields: Any) -> Doc:
    doc: Doc = {
        "_id": new_id("tok"),
        "token": {kind: f"{kind}-device-{user_doc['username']}"},
        "appName": "chat.rocket.android" if kind == "gcm" else "chat.rocket.ios",
        "userId": user_doc["_id"],
        "enabled": True,
        "createdAt": utcnow(),
        "updatedAt": utcnow(),
    }
    doc.update(fields)
    return doc


def setting(setting_id: str, value: Any) -> Doc:
    return {"_id": setting_id, "value": value, "type": type(value).__name__, "_updatedAt": utcnow()}


def default_settings(**overrides: Any) -> list[Doc]:
    values: dict[str, Any] = {
        "Push_enable": True,
        "Push_enable_gateway": True,
        "Push_gateway": "https://gateway.rocket.chat",
        "Push_production": True,
        "Push_show_username_room": True,
        "Push_show_message": True,
        "Register_Server": True,
        "Cloud_Workspace_Id": "ws-1",
        "uniqueID": "abc123",
        "Site_Url": "https://chat.example.org",
        "Site_Name": "Example Chat",
        "Notifications_Max_Room_Members": 100,
    }
    values.update(overrides)
    return [setting(k, v) for k, v in values.items()]


def push_content(**fields: Any) -> PushContent:
    """A provider-neutral push, as `build_push_content` makes them, for the pushkin tests."""
    mid, rid = fields.pop("mid", "m1"), fields.pop("rid", "GENERAL")
    values: Doc = {
        "uid": "u-bob",
        "title": "#general",
        "text": "alice: hello",
        "badge": 1,
        "not_id": 1666299236,
        "created_at": 1_800_000_000.0,
        "payload": {"host": "https://chat.example.org/", "messageId": mid, "rid": rid},
    }
    values.update(fields)
    return PushContent(mid=mid, rid=rid, **values)
