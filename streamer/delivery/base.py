"""The one interface every push provider implements (gateway, FCM, APNs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from streamer.delivery.errors import Outcome
from streamer.model import TokenKind


@dataclass(frozen=True, slots=True)
class Device:
    token_id: str
    kind: TokenKind
    token: str
    app_name: str | None = None


class Recipient(Protocol):
    """What the sent ledger keys a delivery by, besides the user and the message: a
    device's token, or a mail address (`MailTarget`)."""

    @property
    def token(self) -> str: ...

    @property
    def token_id(self) -> str: ...


@dataclass(frozen=True, slots=True)
class PushContent:
    """What a push says, provider-neutral; built by `delivery.payload` (pure)."""

    uid: str
    rid: str
    mid: str
    title: str
    text: str
    badge: int
    not_id: int
    created_at: float
    #: Rocket.Chat's `payload` object (host, messageId, rid, sender, type, …).
    payload: dict[str, Any] = field(default_factory=dict)
    #: APNs category: "MESSAGE" or "MESSAGE_NOREPLY".
    category: str = "MESSAGE"
    id_only: bool = False
    #: The `uniqueID` setting: names this server to the gateway (`uniqueId`).
    unique_id: str = ""
    #: The notification icon URL Android shows (`gcm.image`).
    image: str | None = None


class Pushkin(Protocol):
    """Dispatch one push to one device.

    Returns a permanent `Outcome`; raises `TemporaryDeliveryError` (retry, with
    its delay) or `CredentialsError` (reload credentials, report).
    """

    async def prepare(self) -> None:
        """Have what a request needs besides a slot in flight (a bearer token), raising
        as `dispatch` does: a push waiting for an OAuth server that hangs must not hold
        a slot that another provider's pushes could use."""

    async def dispatch(self, content: PushContent, device: Device) -> Outcome: ...

    async def aclose(self) -> None: ...
