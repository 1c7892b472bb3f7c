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
#: The 4xx that say "the same request may work later": 408 Request Timeout (a load
#: balancer gave up waiting), 425 Too Early, 429.
_TRY_AGAIN = frozenset({408, 425, TOO_MANY_REQUESTS})


def is_temporary(status: int) -> bool:
    """A provider's HTTP answer that means "try again later": 408, 425, 429 or any 5xx."""
    return status in _TRY_AGAIN or status >= 500


class DeliveryError(Exception):
    """Base of delivery failures; carries what the operator needs to know."""


class TemporaryDeliveryError(DeliveryError):
    """Retry later (429, 5xx, timeout, connection failure)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        #: Seconds the provider asked us to wait (Retry-After), if it said.
        self.retry_after = retry_after


class CredentialsError(DeliveryError):
    """The provider refuses this deployment, not the push: the workspace is not
    registered, a key or login is invalid, a mail server refuses this host or sender.

    Retrying with the same configuration cannot succeed; the caller reloads what it
    can and reports loudly (/readyz), pointing the operator at `streamer doctor`.
    """


class CredentialProblems:
    """Credentials failures by source ("gateway", "apns", "fcm", "email"), each from its
    first failure until that same source answers again: APNs working says nothing of
    a revoked FCM key. What /readyz reports as the delivery problem."""

    def __init__(self) -> None:
        self._problems: dict[str, str] = {}

    def failed(self, source: str, exc: CredentialsError) -> bool:
        """Record the failure; True if the source was not failing yet (say it loudly once)."""
        text = str(exc)
        new = source not in self._problems
        self._problems[source] = text if text.startswith(f"{source}:") else f"{source}: {text}"
        return new

    def answered(self, source: str) -> None:
        self._problems.pop(source, None)

    @property
    def problem(self) -> str | None:
        return "; ".join(self._problems[source] for source in sorted(self._problems)) or None


#: Refusals in a row, with no push going through, that say more about the setup than
#: about the phones: all the pushes of a wrong [apns] topic or FCM project, or of
#: sandbox tokens sent to production, come back as dead tokens or refusals.
REFUSALS_IN_A_ROW = 20


class RefusalStreak:
    """Per provider, final refusals (dead token, rejected) since a push last went
    through. Past `REFUSALS_IN_A_ROW` they are not acted on: deleting every iOS token
    because of a typo in the topic would cost every user a reinstall."""

    def __init__(self) -> None:
        self._refusals: dict[str, int] = {}

    def answered(self, provider: str, outcome: Outcome) -> bool:
        """Note the answer; True if it should be acted on."""
        if outcome is Outcome.SENT:
            self._refusals.pop(provider, None)
            return True
        self._refusals[provider] = self._refusals.get(provider, 0) + 1
        return self._refusals[provider] < REFUSALS_IN_A_ROW

    def problem(self, provider: str, outcome: Outcome) -> CredentialsError:
        return CredentialsError(
            f"{provider}: {REFUSALS_IN_A_ROW} pushes in a row were refused ({outcome.value}) "
            "and none went through: a wrong [apns] topic, Push_production "
            "(sandbox or production) or FCM project is likelier than that many dead phones; "
            "the tokens are kept and the pushes retried until one goes through"
        )


def retry_after_seconds(header: str | None, now: float) -> float | None:
    """A Retry-After header (delta-seconds or HTTP-date) as seconds from `now`.

    One parser for every provider: the gateway, FCM and APNs all send it on
    429/503, and a value we cannot read means "use our own backoff".
    """
    if header is None:
        return None
    text = header.strip()
    if text.isdecimal():  # not isdigit: "²" is a digit float() refuses
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - now)
