"""Email notifications: one mail per notification, over SMTP (aiosmtplib).

The mail is built by pure functions (`email_content`, `build_email`) and sent
by `Mailer`. The SMTP server comes from `[email]` in config.toml, key by key
falling back to Rocket.Chat's own SMTP_* and From_Email settings, so a
deployment whose Rocket.Chat already sends mail needs no extra configuration.
"""

from __future__ import annotations

import email.utils
import html
import ssl
import time
import urllib.parse
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Literal

import aiosmtplib
import structlog

from streamer import metrics
from streamer.config import EmailConfig
from streamer.delivery.direct import Clock
from streamer.delivery.errors import (
    CredentialsError,
    DeliveryError,
    Outcome,
    TemporaryDeliveryError,
)
from streamer.delivery.payload import readable_text
from streamer.model import Message, Room, RoomType, Settings, User

#: "auto" upgrades with STARTTLS when the server offers it, like Rocket.Chat's
#: mailer does for SMTP_Protocol "smtp" once SMTP_IgnoreTLS is turned off.
Security = Literal["none", "starttls", "tls", "auto"]
#: The SMTP reply "authentication required": the server wants a login we did not give.
AUTHENTICATION_REQUIRED = 530
#: What an address the server cannot take (beyond ASCII, without SMTPUTF8) is counted as.
ADDRESS_UNUSABLE = 553
DEFAULT_PORTS: dict[Security, int] = {"none": 25, "auto": 25, "starttls": 587, "tls": 465}
#: Rocket.Chat's route segment for each room type.
ROOM_ROUTES: dict[RoomType, str] = {"c": "channel", "p": "group", "d": "direct", "l": "live"}
#: The room's "Notification Preferences" panel (its toolbox id in Rocket.Chat's web client).
PREFERENCES_TAB = "push-notifications"

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class SmtpServer:
    host: str
    port: int
    from_address: str
    security: Security = "auto"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 30.0

    @classmethod
    def resolve(cls, config: EmailConfig, settings: Settings) -> SmtpServer | None:
        """The server to send through, or None (logged, with why) when mail cannot go out."""
        host = config.host or settings.smtp_host
        from_address = config.from_address or settings.from_email
        if not config.enabled:
            why = "[email] enabled = false"
        elif not host:
            why = "no SMTP server: set [email] host or Rocket.Chat's SMTP_Host"
        elif not from_address or "@" not in email.utils.parseaddr(from_address)[1]:
            why = "no sender address: set [email] from_address or Rocket.Chat's From_Email"
        else:
            security = config.security or _security(settings)
            return cls(
                host=host,
                port=config.port or settings.smtp_port or DEFAULT_PORTS[security],
                from_address=from_address,
                security=security,
                # Blank is "no login", as Rocket.Chat's defaults have it.
                username=config.username or settings.smtp_username or None,
                password=config.password or settings.smtp_password or None,
            )
        log.info("email_notifications_off", why=why)
        return None


def _security(settings: Settings) -> Security:
    """What Rocket.Chat's own mailer does with the same settings, so a relay it can
    send through (a self-signed certificate, say) works here too."""
    if settings.smtp_protocol == "smtps":
        return "tls"
    return "none" if settings.smtp_ignore_tls else "auto"


@dataclass(frozen=True, slots=True)
class EmailContent:
    """What one notification mail says, provider-neutral and already decided."""

    uid: str
    mid: str
    to: str
    room_name: str
    #: A one-to-one direct message: the mail names the sender, not the room.
    direct: bool
    sender_name: str
    text: str
    site_name: str
    site_url: str
    #: The room in Rocket.Chat's web client (`{Site_Url}/{channel|group|direct}/{name|rid}`).
    room_url: str
    #: The recipient was mentioned by name (changes the subject).
    mentioned: bool = False

    @property
    def preferences_url(self) -> str:
        return f"{self.room_url}/{PREFERENCES_TAB}"


@dataclass(frozen=True, slots=True)
class MailTarget:
    """A mail address as the sent ledger keys it, beside device tokens."""

    address: str
    token_id: str = "email"

    @property
    def token(self) -> str:
        return f"mailto:{self.address}"


def email_content(
    message: Message, room: Room, recipient: User, settings: Settings, sender: User | None
) -> EmailContent | None:
    """The mail for `recipient` about `message`; None when they have no verified address."""
    if recipient.email is None:
        return None
    sender_name = _display_name(message, settings, sender)
    site_url = settings.site_url.rstrip("/")
    slug = room.name if room.type in ("c", "p") and room.name else room.id
    return EmailContent(
        uid=recipient.id,
        mid=message.id,
        to=recipient.email,
        room_name=room.title(recipient.username, settings.room_names_with_special_chars),
        direct=not room.group_chat,
        sender_name=sender_name,
        text=readable_text(message, settings) if settings.email_show_message else "",
        site_name=settings.site_name,
        site_url=site_url,
        room_url=f"{site_url}/{ROOM_ROUTES[room.type]}/{urllib.parse.quote(slug, safe='')}",
        mentioned=any(m.id == recipient.id for m in message.mentions),
    )


def _display_name(message: Message, settings: Settings, sender: User | None) -> str:
    username = sender.username if sender and sender.username else message.sender.username
    if settings.use_real_name:
        return (sender.name if sender else None) or message.sender.name or username
    return username


def email_subject(content: EmailContent) -> str:
    sender, room = _one_line(content.sender_name), _one_line(content.room_name)
    if content.direct:
        what = f"Direct message from {sender}"
    elif content.mentioned:
        what = f"You have been mentioned by {sender} in #{room}"
    else:
        what = f"You have received a message from {sender} in #{room}"
    return f"[{_one_line(content.site_name)}] {what}"


def build_email(content: EmailContent, *, from_address: str, now: float) -> EmailMessage:
    """The whole mail: headers, a plain-text body and its HTML alternative.

    The Message-ID is derived from (message, recipient), so a mail sent again
    after a crash is recognisably the same mail to the receiving side.
    """
    _, sender_address = email.utils.parseaddr(from_address)
    mail = EmailMessage()
    mail["Subject"] = email_subject(content)
    mail["From"] = email.utils.formataddr((_one_line(content.sender_name), sender_address))
    mail["To"] = content.to
    mail["Date"] = email.utils.formatdate(now, usegmt=True)
    domain = sender_address.rpartition("@")[2]
    mail["Message-ID"] = f"<{content.mid}.{content.uid}@{domain}>"
    mail["List-Unsubscribe"] = f"<{content.preferences_url}>"
    mail["Auto-Submitted"] = "auto-generated"
    mail.set_content(_text_body(content))
    mail.add_alternative(_html_body(content), subtype="html")
    return mail


def _heading(content: EmailContent) -> str:
    if content.direct:
        return f"{content.sender_name} sent you a direct message:"
    return f"{content.sender_name} in #{content.room_name}:"


def _text_body(content: EmailContent) -> str:
    quoted = f"{content.text}\n\n" if content.text else ""
    return (
        f"{_heading(content)}\n\n{quoted}"
        f"Open the conversation: {content.room_url}\n\n"
        "-- \n"
        f"You receive this mail because of your notification preferences in {content.site_name}.\n"
        f"Change them for this room: {content.preferences_url}\n"
    )


def _html_body(content: EmailContent) -> str:
    text = html.escape(content.text).replace("\n", "<br>\n")
    quoted = (
        f'<blockquote style="border-left:3px solid #ccc;margin:0;padding-left:1em">{text}'
        "</blockquote>\n"
        if text
        else ""
    )
    room_url, preferences_url = html.escape(content.room_url), html.escape(content.preferences_url)
    return (
        "<!DOCTYPE html>\n<html><body>\n"
        f"<p>{html.escape(_heading(content))}</p>\n"
        f"{quoted}"
        f'<p><a href="{room_url}">Open the conversation</a></p>\n'
        '<hr><p style="font-size:small;color:#666">'
        "You receive this mail because of your notification preferences in "
        f"{html.escape(content.site_name)}. "
        f'<a href="{preferences_url}">Change them for this room</a>.</p>\n'
        "</body></html>\n"
    )


def _one_line(text: str) -> str:
    """Header-safe: user-chosen names must not smuggle line breaks into headers."""
    return " ".join(text.split())


def _misconfigured(exc: Exception) -> bool:
    """Failures that repeat until the configuration changes: the server lacks what it is
    asked for (a login without AUTH offered, STARTTLS, XOAUTH2), which aiosmtplib says
    with its base exception alone, or its certificate is not trusted."""
    if type(exc) is aiosmtplib.SMTPException:
        return True
    return any(isinstance(e, ssl.SSLCertVerificationError) for e in (exc, exc.__cause__))


class Mailer:
    """Sends notification mails through one SMTP server, a connection per mail."""

    def __init__(self, server: SmtpServer, clock: Clock = time.time) -> None:
        self.server = server
        self._clock = clock

    async def send(self, content: EmailContent) -> Outcome:
        """SENT, or REJECTED when the server refuses for good; otherwise raises.

        Raises TemporaryDeliveryError (server down, 4xx) or CredentialsError (the
        login, the session or the sender refused for good, or the server unusable as
        configured: no mail goes out until an operator acts, and /readyz says so).
        """
        try:
            mail = build_email(content, from_address=self.server.from_address, now=self._clock())
            await self._submit(mail)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [refusal.code for refusal in exc.recipients]
            return self._refused(content, min(codes), "; ".join(r.message for r in exc.recipients))
        except aiosmtplib.SMTPNotSupported as exc:  # an address beyond ASCII, no SMTPUTF8
            return self._refused(content, ADDRESS_UNUSABLE, str(exc))
        except aiosmtplib.SMTPAuthenticationError as exc:
            if exc.code >= 500:
                metrics.EMAILS.labels("credentials").inc()
                raise CredentialsError(
                    f"SMTP {self.server.host} refused the login of {self.server.username!r} "
                    f"({exc.code} {exc.message}); check [email] username/password or SMTP_*"
                ) from exc
            return self._refused(content, exc.code, exc.message)
        except (
            aiosmtplib.SMTPConnectResponseError,
            aiosmtplib.SMTPHeloError,
            aiosmtplib.SMTPSenderRefused,
        ) as exc:
            # The server refuses us, not this mail: retried (and loud) until fixed.
            raise self._server_refused(exc) from exc
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code == AUTHENTICATION_REQUIRED:
                raise self._server_refused(exc) from exc
            return self._refused(content, exc.code, exc.message)
        except (aiosmtplib.SMTPException, OSError) as exc:
            if _misconfigured(exc):
                metrics.EMAILS.labels("credentials").inc()
                raise CredentialsError(
                    f"SMTP {self.server.host}:{self.server.port} cannot be used as configured "
                    f"({exc}); check [email] security ({self.server.security}) and the login"
                ) from exc
            metrics.EMAILS.labels("temporary").inc()
            raise TemporaryDeliveryError(
                f"SMTP {self.server.host}:{self.server.port} unavailable: {exc!r}"
            ) from exc
        except ValueError as exc:
            log.warning("email_not_sendable", uid=content.uid, mid=content.mid, error=str(exc))
            metrics.EMAILS.labels("rejected").inc()
            return Outcome.REJECTED
        metrics.EMAILS.labels("sent").inc()
        return Outcome.SENT

    async def _submit(self, mail: EmailMessage) -> None:
        server = self.server
        await aiosmtplib.send(
            mail,
            hostname=server.host,
            port=server.port,
            username=server.username,
            password=server.password,
            use_tls=server.security == "tls",
            start_tls={"starttls": True, "auto": None}.get(server.security, False),
            timeout=server.timeout,
        )

    def _server_refused(self, exc: aiosmtplib.SMTPResponseException) -> DeliveryError:
        """A refusal of the sender or the session: no mail can go out until it is fixed."""
        if exc.code == AUTHENTICATION_REQUIRED:
            metrics.EMAILS.labels("credentials").inc()
            return CredentialsError(
                f"SMTP {self.server.host} requires a login ({exc.code} {exc.message}); "
                "set [email] username/password or SMTP_Username/SMTP_Password"
            )
        refusal = (
            f"SMTP {self.server.host} refused the session or the sender address "
            f"({exc.code} {exc.message}); check the From address and the server's rules "
            "for this host"
        )
        if exc.code >= 500:  # its final word: no mail goes out until someone acts
            metrics.EMAILS.labels("credentials").inc()
            return CredentialsError(refusal)
        metrics.EMAILS.labels("temporary").inc()
        return TemporaryDeliveryError(refusal)

    def _refused(self, content: EmailContent, code: int, reply: str) -> Outcome:
        """5xx is the server's final word on this mail; 4xx means try again later."""
        if code < 500:
            metrics.EMAILS.labels("temporary").inc()
            raise TemporaryDeliveryError(
                f"SMTP {self.server.host} deferred the mail: {code} {reply}"
            )
        log.warning(
            "smtp_refused_mail",
            uid=content.uid,
            mid=content.mid,
            code=code,
            reply=reply,
        )
        metrics.EMAILS.labels("rejected").inc()
        return Outcome.REJECTED
