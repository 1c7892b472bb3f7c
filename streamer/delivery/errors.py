"""Delivery outcomes. Like Sygnal: permanent outcomes are return values, temporary
failures are exceptions that carry their retry delay."""

from __future__ import annotations

import datetime as dt
import email.utils
import enum


class Outcome(enum.Enum):
    """What became of one push to one device; every value is final for that push."""

    SENT = "sent"
    #: The provider says the device token is dead (406, 410, UNREGISTERED): delete it.
    DEAD_TOKEN = "dead token"
    #: The provider refused this push (422, 400): drop it, keep the token.
    REJECTED = "rejected"


#: 429 Too Many Requests: temporary, and the one answer that asks for a slower pace.
TOO_MANY_REQUESTS = 429


def is_temporary(status: int) -> bool:
    """A provider's HTTP answer that means "try again later": 429 or any 5xx."""
    return status == TOO_MANY_REQUESTS or status >= 500


class DeliveryError(Exception):
    """Base of delivery failures; carries what the operator needs to know."""


class TemporaryDeliveryError(DeliveryError):
    """Retry later (429, 5xx, timeout, connection failure)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        #: Seconds the provider asked us to wait (Retry-After), if it said.
        self.retry_after = retry_after


class CredentialsError(DeliveryError):
    """401/403: the workspace is not registered or its credentials are invalid.

    Retrying with the same credentials cannot succeed; the caller reloads them
    and reports loudly, pointing the operator at `streamer doctor`.
    """


def retry_after_seconds(header: str | None, now: float) -> float | None:
    """A Retry-After header (delta-seconds or HTTP-date) as seconds from `now`.

    One parser for every provider: the gateway, FCM and APNs all send it on
    429/503, and a value we cannot read means "use our own backoff".
    """
    if header is None:
        return None
    text = header.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - now)
