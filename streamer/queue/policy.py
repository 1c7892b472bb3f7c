"""When a queued push is due — Rocket.Chat's documented delays, as one pure function."""

from __future__ import annotations

from streamer.config import QueueConfig
from streamer.model import Presence


def due_at(
    status: Presence,
    now: float,
    config: QueueConfig,
    away_since: float | None = None,
    always_notify_mobile: bool = False,
) -> float:
    """Online waits `delay_online`; away waits `delay_away` less the time already away;
    offline (and busy, which only reaches here when busy does not block) goes at once."""
    if always_notify_mobile:
        return now
    if status == "online":
        return now + config.delay_online
    if status == "away":
        away_for = 0.0 if away_since is None else max(0.0, now - away_since)
        return now + max(0.0, config.delay_away - away_for)
    return now + config.delay_offline
