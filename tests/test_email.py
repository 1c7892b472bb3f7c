"""Email notifications: the pure mail builder, SMTP settings fallback, and delivery to
a real local SMTP server (aiosmtpd)."""

from __future__ import annotations

import contextlib
import dataclasses
import email
import email.policy
import socket
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword

from streamer.config import EmailConfig
from streamer.delivery.email import EmailContent, Mailer, SmtpServer, build_email, email_content
from streamer.delivery.errors import CredentialsError, Outcome, TemporaryDeliveryError
from streamer.devmongo import free_port
from streamer.model import Message, Room, Settings, User
from tests import factories
from tests.servers import serve_connections

pytestmark = pytest.mark.anyio

NOW = 1_800_000_000.0
SETTING_VALUES: dict[str, object] = {
    "Site_Url": "https://chat.example.org/",
    "Site_Name": "Example Chat",
}
SETTINGS = Settings.from_values(SETTING_VALUES)
ALICE = User.from_doc(factories.user("alice", name="Alice Liddell"))
BOB = User.from_doc(factories.user("bob"))
GENERAL = Room.from_doc(factories.room("GENERAL", name="general", fname="General"))


def message_to(room: Room, text: str = "lunch?", **fields: Any) -> Message:
    room_doc = factories.room(room.id, room.type, name=room.name)
    return Message.from_doc(factories.message(room_doc, factories.user("alice"), text, **fields))


def content(text: str = "lunch?", room: Room = GENERAL, **fields: Any) -> EmailContent:
    built = email_content(message_to(room, text, **fields), room, BOB, SETTINGS, ALICE)
    assert built is not None
    return built


def parts(mail: EmailMessage) -> tuple[str, str]:
    plain, rich = mail.get_body(("plain",)), mail.get_body(("html",))
    assert plain is not None and rich is not None
    return plain.get_content(), rich.get_content()


def test_mail_names_room_sender_and_text_and_links_the_room_preferences() -> None:
    mail = build_email(content(), from_address="chat@example.org", now=NOW)

    assert mail["Subject"] == "[Example Chat] You have received a message from alice in #general"
    assert mail["From"] == "alice <chat@example.org>"
    assert mail["To"] == "bob@example.org"
    assert mail["Date"] == "Fri, 15 Jan 2027 08:00:00 +0000"
    assert mail["Message-ID"].endswith(".u-bob@example.org>")
    assert mail["List-Unsubscribe"] == (
        "<https://chat.example.org/channel/general/push-notifications>"
    )
    assert mail["Auto-Submitted"] == "auto-generated"
    text, rich = parts(mail)
    assert "alice in #general:\n\nlunch?\n" in text
    assert "https://chat.example.org/channel/general/push-notifications" in text
    assert "<blockquote" in rich and "lunch?" in rich
    assert '<a href="https://chat.example.org/channel/general">' in rich
    assert '<a href="https://chat.example.org/channel/general/push-notifications">' in rich


def test_user_text_is_html_escaped_in_the_html_part_only() -> None:
    hostile = 'a <script>alert("x")</script> & <b>b</b>'
    text, rich = parts(build_email(content(hostile), from_address="c@example.org", now=NOW))
    assert hostile in text
    assert "<script>" not in rich and "<b>b</b>" not in rich
    assert "a &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;b&lt;/b&gt;" in rich


def test_line_breaks_in_names_cannot_inject_headers() -> None:
    sneaky = User.from_doc(factories.user("eve", name="Eve\r\nBcc: all@example.org"))
    real_names = Settings.from_values({"UI_Use_Real_Name": True})
    built = email_content(message_to(GENERAL), GENERAL, BOB, real_names, sneaky)
    assert built is not None
    mail = build_email(built, from_address="c@example.org", now=NOW)
    assert mail["Bcc"] is None
    assert mail["From"] == '"Eve Bcc: all@example.org" <c@example.org>'


@pytest.mark.parametrize(
    ("room", "url", "subject"),
    [
        (GENERAL, "https://chat.example.org/channel/general", "message from alice in #general"),
        (
            Room.from_doc(factories.room("SECRET", "p", name="secret", fname="Secret")),
            "https://chat.example.org/group/secret",
            "message from alice in #secret",
        ),
        (
            Room.from_doc(factories.room("u-aliceu-bob", "d", name=None, fname=None)),
            "https://chat.example.org/direct/u-aliceu-bob",
            "Direct message from alice",
        ),
    ],
    ids=["channel", "group", "direct"],
)
def test_room_links_follow_the_room_type(room: Room, url: str, subject: str) -> None:
    built = content(room=room)
    assert built.room_url == url
    mail = build_email(built, from_address="c@example.org", now=NOW)
    assert mail["List-Unsubscribe"] == f"<{url}/push-notifications>"
    assert mail["Subject"].endswith(subject)


@pytest.mark.parametrize(
    ("room", "settings", "named"),
    [
        (GENERAL, {"UI_Allow_room_names_with_special_chars": True}, "in #General"),
        (Room.from_doc(factories.room("D1", prid="GENERAL", fname="Lunch plans")), {},
         "in #Lunch plans"),
        (Room.from_doc(factories.room("u-3", "d", name=None, fname=None, usersCount=3,
                                      usernames=["alice", "bob", "carol"])), {},
         "in #alice, carol"),
    ],
    ids=["special-chars", "discussion", "group-dm"],
)  # fmt: skip
def test_a_room_is_named_as_rocket_chat_names_it(
    room: Room, settings: dict[str, object], named: str
) -> None:
    """A channel goes by its name unless names may hold special characters; a
    discussion by its display name; a group DM, a group chat, by its other members."""
    with_settings = Settings.from_values({**SETTING_VALUES, **settings})
    built = email_content(message_to(room), room, BOB, with_settings, ALICE)
    assert built is not None
    assert build_email(built, from_address="c@example.org", now=NOW)["Subject"].endswith(
        f"message from alice {named}"
    )


def test_mention_changes_the_subject() -> None:
    mentioned = content(mentions=[{"_id": BOB.id, "username": "bob"}])
    assert build_email(mentioned, from_address="c@example.org", now=NOW)["Subject"] == (
        "[Example Chat] You have been mentioned by alice in #general"
    )


def test_real_names_when_the_server_shows_them() -> None:
    real_names = Settings.from_values({"UI_Use_Real_Name": True})
    built = email_content(message_to(GENERAL), GENERAL, BOB, real_names, ALICE)
    assert built is not None and built.sender_name == "Alice Liddell"


def test_the_message_stays_out_of_mail_when_rocket_chat_says_so() -> None:
    private = Settings.from_values({"Email_notification_show_message": False})
    built = email_content(message_to(GENERAL, "the launch code"), GENERAL, BOB, private, ALICE)
    assert built is not None and built.text == ""
    text, rich = parts(build_email(built, from_address="chat@example.org", now=0.0))
    assert "launch code" not in text + rich
    assert "blockquote" not in rich
    assert built.room_url in text


def test_encrypted_message_text_is_never_mailed() -> None:
    assert content("c2VjcmV0", t="e2e").text == "Encrypted message"


def test_no_mail_without_a_verified_address() -> None:
    unverified = User.from_doc(
        factories.user("carol", emails=[{"address": "carol@example.org", "verified": False}])
    )
    assert email_content(message_to(GENERAL), GENERAL, unverified, SETTINGS, ALICE) is None


SMTP_SETTINGS = Settings.from_values(
    {
        "SMTP_Host": "smtp.rocket.example",
        "SMTP_Port": 2525,
        "SMTP_Username": "rocket",
        "SMTP_Password": "rocket-secret",
        "SMTP_Protocol": "smtps",
        "From_Email": "rocket@example.org",
    }
)


def test_rocket_chat_smtp_settings_are_the_fallback() -> None:
    assert SmtpServer.resolve(EmailConfig(), SMTP_SETTINGS) == SmtpServer(
        host="smtp.rocket.example",
        port=2525,
        from_address="rocket@example.org",
        security="tls",
        username="rocket",
        password="rocket-secret",
    )


def test_config_keys_beat_the_settings() -> None:
    config = EmailConfig(host="smtp.local", security="starttls", from_address="s@example.org")
    assert SmtpServer.resolve(config, SMTP_SETTINGS) == SmtpServer(
        host="smtp.local",
        port=2525,
        from_address="s@example.org",
        security="starttls",
        username="rocket",
        password="rocket-secret",
    )


@pytest.mark.parametrize(
    ("values", "security", "port"),
    [
        ({}, "none", 25),  # SMTP_IgnoreTLS is on by default: Rocket.Chat never upgrades
        ({"SMTP_IgnoreTLS": False}, "auto", 25),
        ({"SMTP_Protocol": "smtps"}, "tls", 465),
    ],
)
def test_security_and_default_port_follow_rocket_chats_mailer(
    values: dict[str, Any], security: str, port: int
) -> None:
    config = EmailConfig(host="h", from_address="a@b.c")
    server = SmtpServer.resolve(config, Settings.from_values(values))
    assert server is not None and (server.security, server.port) == (security, port)


def test_blank_smtp_login_settings_mean_no_login() -> None:
    """Rocket.Chat's defaults for SMTP_Username/Password (and SMTP_Port) are ''."""
    blank = {"SMTP_Username": "", "SMTP_Password": "", "SMTP_Port": ""}
    settings = Settings.from_values(blank)
    assert settings.problems == ()
    server = SmtpServer.resolve(EmailConfig(host="h", from_address="a@b.c", username=""), settings)
    assert server is not None and (server.username, server.password, server.port) == (
        None,
        None,
        25,
    )


def test_a_room_name_beyond_ascii_is_a_valid_link() -> None:
    room = Room(id="R9", type="c", name="café-général")
    built = email_content(message_to(room), room, BOB, SETTINGS, ALICE)
    assert built is not None
    assert built.room_url == "https://chat.example.org/channel/caf%C3%A9-g%C3%A9n%C3%A9ral"
    mail = build_email(built, from_address="chat@example.org", now=0.0)
    assert str(mail["List-Unsubscribe"]).isascii()


@pytest.mark.parametrize(
    "config",
    [
        EmailConfig(from_address="a@example.org"),
        EmailConfig(host="smtp.local"),
        EmailConfig(host="smtp.local", from_address="not an address"),
        EmailConfig(enabled=False, host="smtp.local", from_address="a@example.org"),
    ],
    ids=["no-host", "no-from", "bad-from", "disabled"],
)
def test_no_server_when_mail_cannot_go_out(config: EmailConfig) -> None:
    assert SmtpServer.resolve(config, Settings()) is None


class Mailbox:
    """An aiosmtpd handler that keeps what it accepted and refuses chosen recipients."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []
        self.logins: list[tuple[str, str]] = []
        self.replies: dict[str, str] = {}

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Envelope, address: str, options: Any
    ) -> str:
        if address in self.replies:
            return self.replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 Message accepted for delivery"

    def authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        self.logins.append((data.login.decode(), data.password.decode()))
        return AuthResult(success=True)

    def mail(self, index: int = 0) -> EmailMessage:
        parsed = email.message_from_bytes(
            self.envelopes[index].original_content or b"", policy=email.policy.default
        )
        assert isinstance(parsed, EmailMessage)
        return parsed


@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, int]]:
    mailbox = Mailbox()
    port = free_port()
    controller = Controller(
        mailbox,
        hostname="127.0.0.1",
        port=port,
        authenticator=mailbox.authenticate,
        auth_require_tls=False,
    )
    controller.start()
    try:
        yield mailbox, port
    finally:
        controller.stop()


def local_server(port: int, **fields: Any) -> SmtpServer:
    return SmtpServer(host="127.0.0.1", port=port, from_address="chat@example.org", **fields)


async def test_mail_arrives_at_the_smtp_server(smtp: tuple[Mailbox, int]) -> None:
    mailbox, port = smtp
    assert await Mailer(local_server(port)).send(content("see <you> & bye")) is Outcome.SENT

    [envelope] = mailbox.envelopes
    assert envelope.mail_from == "chat@example.org"
    assert envelope.rcpt_tos == ["bob@example.org"]
    mail = mailbox.mail()
    assert mail["To"] == "bob@example.org"
    # Folded onto a continuation line on the wire, as RFC 5322 allows.
    assert mail["List-Unsubscribe"].strip() == (
        "<https://chat.example.org/channel/general/push-notifications>"
    )
    text, rich = parts(mail)
    assert "see <you> & bye" in text
    assert "see &lt;you&gt; &amp; bye" in rich


async def test_rocket_chat_settings_alone_send_with_their_login(
    smtp: tuple[Mailbox, int],
) -> None:
    mailbox, port = smtp
    settings = Settings.from_values(
        {
            "SMTP_Host": "127.0.0.1",
            "SMTP_Port": port,
            "SMTP_Username": "rocket",
            "SMTP_Password": "rocket-secret",
            "SMTP_Protocol": "smtp",
            "From_Email": "rocket@example.org",
        }
    )
    server = SmtpServer.resolve(EmailConfig(), settings)
    assert server is not None
    assert await Mailer(server).send(content()) is Outcome.SENT
    assert mailbox.logins == [("rocket", "rocket-secret")]
    assert mailbox.envelopes[0].mail_from == "rocket@example.org"


async def test_refused_recipient_is_rejected(smtp: tuple[Mailbox, int]) -> None:
    mailbox, port = smtp
    mailbox.replies["bob@example.org"] = "550 5.1.1 No such user"
    assert await Mailer(local_server(port)).send(content()) is Outcome.REJECTED
    assert mailbox.envelopes == []


async def test_deferred_recipient_is_temporary(smtp: tuple[Mailbox, int]) -> None:
    mailbox, port = smtp
    mailbox.replies["bob@example.org"] = "450 4.2.1 Mailbox busy, try later"
    with pytest.raises(TemporaryDeliveryError, match="450"):
        await Mailer(local_server(port)).send(content())


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # a local test server
async def test_a_server_that_requires_a_login_is_a_credentials_error_not_a_refusal() -> None:
    """530 on MAIL FROM says nothing about this mail: it is kept, and the cause is loud."""
    mailbox, port = Mailbox(), free_port()
    controller = Controller(
        mailbox, hostname="127.0.0.1", port=port, authenticator=mailbox.authenticate,
        auth_require_tls=False, auth_required=True,
    )  # fmt: skip
    controller.start()
    try:
        with pytest.raises(CredentialsError, match="requires a login"):
            await Mailer(local_server(port)).send(content())
    finally:
        controller.stop()
    assert mailbox.envelopes == []


def greeting(reply: bytes) -> Callable[[socket.socket], None]:
    """A peer that answers the connection with `reply`, as a mail server refusing us does."""

    def answer(connection: socket.socket) -> None:
        connection.sendall(reply)
        with contextlib.suppress(OSError):
            connection.recv(1024)

    return answer


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        # This host is blocklisted, or no mail service is offered: every mail would fail.
        (b"554 5.7.1 Service unavailable; client host blocked\r\n", CredentialsError),
        (b"421 4.3.2 Too busy, come back later\r\n", TemporaryDeliveryError),
    ],
    ids=["554", "421"],
)
async def test_a_server_refusing_the_session_keeps_the_mail(
    reply: bytes, error: type[Exception]
) -> None:
    """A 554 greeting was read as this mail refused: dropped, /readyz green, and every
    other mail after it dropped the same way."""
    with serve_connections(greeting(reply)) as url:
        port = int(url.rpartition(":")[2])
        with pytest.raises(error, match="refused the session"):
            await Mailer(local_server(port, timeout=5.0)).send(content())


@pytest.mark.parametrize(
    ("fields", "offered"),
    [
        ({"username": "rocket", "password": "secret"}, "AUTH"),
        ({"security": "starttls"}, "STARTTLS"),
    ],
    ids=["login-without-auth", "starttls-not-offered"],
)
async def test_a_server_lacking_what_is_configured_is_a_configuration_error(
    fields: dict[str, Any], offered: str
) -> None:
    """It will not offer a login or STARTTLS on the next try either: loud, not retried
    quietly for an hour and given up."""
    mailbox, port = Mailbox(), free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        with pytest.raises(CredentialsError, match=f"cannot be used as configured.*{offered}"):
            await Mailer(local_server(port, **fields)).send(content())
    finally:
        controller.stop()
    assert mailbox.envelopes == []


async def test_an_address_beyond_ascii_a_server_cannot_take_is_refused_not_retried() -> None:
    """Without SMTPUTF8 this server will never take it: retrying for an hour helps nobody."""
    mailbox, port = Mailbox(), free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port, enable_SMTPUTF8=False)
    controller.start()
    try:
        unicode = dataclasses.replace(content(), to="bøb@example.org")
        assert await Mailer(local_server(port)).send(unicode) is Outcome.REJECTED
    finally:
        controller.stop()


async def test_server_down_is_temporary() -> None:
    with pytest.raises(TemporaryDeliveryError, match="unavailable"):
        await Mailer(local_server(free_port(), timeout=5.0)).send(content())


async def test_unusable_address_is_rejected_not_crashing(smtp: tuple[Mailbox, int]) -> None:
    mailbox, port = smtp
    odd = User.from_doc(
        factories.user("odd", emails=[{"address": "odd@example.org\nBcc: x@y", "verified": True}])
    )
    built = email_content(message_to(GENERAL), GENERAL, odd, SETTINGS, ALICE)
    assert built is not None
    assert await Mailer(local_server(port)).send(built) is Outcome.REJECTED
    assert mailbox.envelopes == []
