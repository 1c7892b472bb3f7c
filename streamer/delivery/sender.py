"""One notification to all of a user's devices: the policy around the providers.

The providers (`Pushkin`s) say what happened to one push; this decides what
that means: dead tokens are deleted, rejected pushes dropped, temporary
failures become a `RetryAt` the queue persists in its entry (so a restart keeps
the retry), and a push that keeps failing past `give_up_after` is a `GivenUp`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import structlog
import tenacity
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from streamer import metrics
from streamer.config import DeliveryConfig
from streamer.delivery.base import Device, PushContent, Pushkin, Recipient
from streamer.delivery.email import EmailContent, Mailer, MailTarget
from streamer.delivery.errors import (
    CredentialProblems,
    CredentialsError,
    DeliveryError,
    Outcome,
    RefusalStreak,
    TemporaryDeliveryError,
)
from streamer.delivery.http import InFlightCap
from streamer.delivery.ledger import SentLedger
from streamer.model import PUSH_TOKENS, PushToken, TokenKind

log = structlog.get_logger("streamer.delivery.sender")
Doc = dict[str, Any]


def device_of(token: PushToken) -> Device:
    return Device(token_id=token.id, kind=token.kind, token=token.token, app_name=token.app_name)


@dataclass(frozen=True, slots=True)
class Attempts:
    """How often a notification failed so far; stored in the queue entry across restarts."""

    count: int = 0
    first_failure_at: float | None = None


@dataclass(frozen=True, slots=True)
class Delivered:
    """Every device has a final answer (sent, dead token or rejected)."""


@dataclass(frozen=True, slots=True)
class RetryAt:
    """Some device failed temporarily: try again at `at` (devices done are skipped then)."""

    at: float
    error: str
    attempts: Attempts


@dataclass(frozen=True, slots=True)
class GivenUp:
    error: str


SendResult = Delivered | RetryAt | GivenUp


@dataclass(frozen=True, slots=True)
class _Failure:
    error: str
    retry_after: float | None = None


Channel = Literal["push", "email"]
_RETRIES = {"push": metrics.PUSH_RETRIES, "email": metrics.EMAIL_RETRIES}
_GIVEN_UP = {"push": metrics.PUSH_GIVEN_UP, "email": metrics.EMAIL_GIVEN_UP}


class RetryPolicy:
    """When to try a failed notification again, or give up: one policy for push and email."""

    def __init__(self, config: DeliveryConfig, clock: Callable[[], float] = time.time) -> None:
        self._give_up_after = config.give_up_after
        self._clock = clock
        self._backoff = tenacity.wait_exponential_jitter(
            initial=config.retry_initial, max=config.retry_max, jitter=config.retry_initial
        )

    def after_failure(
        self,
        error: str,
        retry_after: float | None,
        attempts: Attempts,
        channel: Channel = "push",
        **context: str,
    ) -> RetryAt | GivenUp:
        """Exponential backoff with jitter, never before Retry-After; give up past the limit.

        Counted and logged per channel: an SMTP outage must not look like pushes failing.

        No retry is scheduled past the give-up time, whatever Retry-After asks: a
        gateway answering `Retry-After: 86400` would otherwise park the push for a
        day, long after it should have been given up with a log line.
        """
        now = self._clock()
        first_failure_at = attempts.first_failure_at if attempts.first_failure_at else now
        give_up_at = first_failure_at + self._give_up_after
        if now >= give_up_at:
            _GIVEN_UP[channel].inc()
            log.warning(
                f"{channel}_given_up",
                attempts=attempts.count + 1,
                failing_since=first_failure_at,
                error=error,
                **context,
            )
            return GivenUp(error)
        following = Attempts(attempts.count + 1, first_failure_at)
        delay = min(max(self._wait(following.count), retry_after or 0.0), give_up_at - now)
        _RETRIES[channel].inc()
        log.info(f"{channel}_retry_scheduled", delay=delay, error=error, **context)
        return RetryAt(now + delay, error, following)

    def _wait(self, attempt_number: int) -> float:
        """tenacity's exponential-with-jitter wait for the n-th failure."""
        state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = attempt_number
        return float(self._backoff(state))


class PushSender:
    def __init__(
        self,
        pushkins: Mapping[TokenKind, Pushkin],
        db: AsyncDatabase[Doc],
        config: DeliveryConfig,
        *,
        cap: InFlightCap,
        ledger: SentLedger,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pushkins = pushkins
        self._tokens = db[PUSH_TOKENS]
        self._config = config
        self._cap = cap
        self._ledger = ledger
        self._clock = clock
        self.retries = RetryPolicy(config, clock)
        #: Shared with the courier's email path: what makes delivery unhealthy (/readyz).
        self.credentials = CredentialProblems()
        self._refusals = RefusalStreak()

    @property
    def problem(self) -> str | None:
        """The credentials failures that make delivery unhealthy, in the providers' words."""
        return self.credentials.problem

    async def send(
        self, content: PushContent, devices: Sequence[Device], attempts: Attempts
    ) -> SendResult:
        """Push `content` to every device at once; the result covers them all.

        Raises `PyMongoError` when the ledger cannot be written: the caller
        keeps the entry and tries again later.
        """
        unique = list({d.token: d for d in devices}.values())
        claimed = await self._ledger.claim(content.uid, content.mid, unique, self._clock())
        failures: list[_Failure] = []
        try:
            if len(claimed) == 1:  # most users have one phone: no task group (~50 µs)
                await self._push_one(content, claimed[0], failures)
            else:
                await self._push_all(content, claimed, failures)
        finally:
            self._ledger.end(content.uid, content.mid, claimed)
        if not failures:
            return Delivered()
        error = "; ".join(sorted({f.error for f in failures}))
        retry_after = max((f.retry_after or 0.0 for f in failures), default=0.0)
        return self.retries.after_failure(
            error, retry_after, attempts, uid=content.uid, mid=content.mid
        )

    async def _push_all(
        self, content: PushContent, devices: Sequence[Device], failures: list[_Failure]
    ) -> None:
        """Every device at once; then a MongoDB error (the ledger) is raised as itself.

        One device's MongoDB error must not cancel the others: a push cancelled
        mid-way leaves its claim "sending", an outcome nobody knows, which the
        default `unknown_outcome` never sends again.
        """
        errors: list[PyMongoError] = []

        async def push(device: Device) -> None:
            try:
                await self._push_one(content, device, failures)
            except PyMongoError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tasks:
            for device in devices:
                tasks.start_soon(push, device)
        if errors:
            raise errors[0]

    async def _push_one(
        self, content: PushContent, device: Device, failures: list[_Failure]
    ) -> None:
        """One device, end to end; a failure is appended to `failures`, never raised."""
        provider = self._provider(device)
        failure = await self._dispatch(content, device, provider)
        if failure is None:
            return
        failures.append(failure)
        await self._ledger.release(content.uid, content.mid, device)

    async def _dispatch(
        self, content: PushContent, device: Device, provider: str
    ) -> _Failure | None:
        pushkin = self._pushkins.get(device.kind)
        if pushkin is None:  # direct mode without credentials for this platform
            log.warning("no_provider_for_device", kind=device.kind, token_id=device.token_id)
            await self._record(content, device, provider, Outcome.REJECTED)
            return None
        started: float | None = None  # once a slot is free: the histogram is the provider's
        try:
            await pushkin.prepare()
            async with self._cap.slot():
                started = time.perf_counter()
                outcome = await pushkin.dispatch(content, device)
        except anyio.get_cancelled_exc_class():
            await self._release_cut_short(content.uid, content.mid, device)
            raise
        except TemporaryDeliveryError as exc:
            metrics.PUSHES.labels(provider, "temporary_error").inc()
            return _Failure(str(exc), exc.retry_after)
        except CredentialsError as exc:
            self._credentials_failed(provider, exc)
            return _Failure(str(exc))
        except PyMongoError as exc:  # reading the gateway's token, before any request
            metrics.PUSHES.labels(provider, "temporary_error").inc()
            return _Failure(f"MongoDB unavailable: {type(exc).__name__}")
        except Exception as exc:  # a provider bug must not take the daemon down
            log.exception("push_failed_unexpectedly", provider=provider, token_id=device.token_id)
            metrics.PUSHES.labels(provider, "unexpected_error").inc()
            return _Failure(repr(exc))
        finally:
            if started is not None:
                metrics.PUSH_LATENCY.labels(provider).observe(time.perf_counter() - started)
        if not self._refusals.answered(provider, outcome):
            problem = self._refusals.problem(provider, outcome)
            self._credentials_failed(provider, problem)
            return _Failure(str(problem))
        self.credentials.answered(provider)  # it answered: its credentials work
        await self._record(content, device, provider, outcome)
        return None

    async def _release_cut_short(self, uid: str, mid: str, recipient: Recipient) -> None:
        """A delivery cancelled (the end of `shutdown_grace`) is retried, like a timeout:
        before its request it was surely not sent; during it, the provider may or may not
        have taken it, and left "sending" the default `unknown_outcome` would drop it."""
        with anyio.CancelScope(shield=True), contextlib.suppress(PyMongoError):
            await self._ledger.release(uid, mid, recipient)

    async def send_mail(
        self, mailer: Mailer, content: EmailContent, attempts: Attempts
    ) -> SendResult:
        """One mail, at most once per (user, message, address) as a push is per device:
        an entry queued again after its mail went out (a replayed batch, another
        instance's late stream) finds it sent in the ledger."""
        target = MailTarget(content.to)
        if not await self._ledger.claim(content.uid, content.mid, [target], self._clock()):
            return Delivered()
        try:
            outcome = await mailer.send(content)
        except anyio.get_cancelled_exc_class():
            await self._release_cut_short(content.uid, content.mid, target)
            raise
        except DeliveryError as exc:
            # SMTP down, or refusing us (an operator fixes that): keep the mail, retry.
            await self._ledger.release(content.uid, content.mid, target)
            if isinstance(exc, CredentialsError) and self.credentials.failed("email", exc):
                log.error("email_credentials_invalid", error=str(exc))
            retry_after = exc.retry_after if isinstance(exc, TemporaryDeliveryError) else None
            return self.retries.after_failure(str(exc), retry_after, attempts, channel="email")
        finally:
            self._ledger.end(content.uid, content.mid, [target])
        self.credentials.answered("email")
        await self._ledger.finish(content.uid, content.mid, target, outcome, self._clock())
        return Delivered()

    async def _record(
        self, content: PushContent, device: Device, provider: str, outcome: Outcome
    ) -> None:
        """Mark the device done in the ledger, then act on the answer: it is final
        whatever the acting meets."""
        metrics.PUSHES.labels(provider, outcome.name.lower()).inc()
        await self._ledger.finish(content.uid, content.mid, device, outcome, self._clock())
        if outcome is Outcome.DEAD_TOKEN:
            await self._delete_token(device, provider)
        elif outcome is Outcome.REJECTED:
            log.info("push_rejected", provider=provider, token_id=device.token_id)

    async def _delete_token(self, device: Device, provider: str) -> None:
        """The provider says the app is gone from the device: stop pushing to it. If
        MongoDB cannot take the delete, the next push to it finds it dead again."""
        try:
            result = await self._tokens.delete_many(
                {"$or": [{"_id": device.token_id}, {f"token.{device.kind}": device.token}]}
            )
        except PyMongoError as exc:
            log.warning(
                "dead_token_not_deleted",
                provider=provider,
                token_id=device.token_id,
                error=type(exc).__name__,
                action="deleted when a push to it is refused again",
            )
            return
        metrics.TOKENS_DELETED.inc(result.deleted_count)
        log.info(
            "dead_token_deleted",
            provider=provider,
            token_id=device.token_id,
            deleted=result.deleted_count,
        )

    def _credentials_failed(self, provider: str, exc: CredentialsError) -> None:
        """One loud line when pushes start failing for credentials, not one per push."""
        metrics.PUSHES.labels(provider, "credentials_error").inc()
        if self.credentials.failed(provider, exc):
            log.error("push_credentials_invalid", provider=provider, error=str(exc))

    def _provider(self, device: Device) -> str:
        """The metric label: "gateway" or, in direct mode, "apns"/"fcm"."""
        if self._config.mode == "gateway":
            return "gateway"
        return "apns" if device.kind == "apn" else "fcm"
