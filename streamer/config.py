"""config.toml → one typed, frozen `Config`, with env overrides and redaction.

Every key has a typed default, so the daemon runs with no file at all. A file or
an environment variable `STREAMER_<SECTION>__<KEY>` overrides it; a value of the
wrong type or a key nobody reads is an error that names the key, where it came
from and what was expected, because a silently ignored typo in an operator's
config is a notification nobody receives.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

import orjson

from streamer.model import REDACTED as REDACTED  # re-exported: where callers look for it
from streamer.model import Settings

ENV_PREFIX = "STREAMER_"
CONFIG_PATH_ENV = "STREAMER_CONFIG"


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


def _secret(default: Any = None) -> Any:
    return field(default=default, metadata={"secret": True})


def _mongo_name(default: str, forbidden: str) -> Any:
    """A database or collection name: MongoDB refuses one that is empty or holds any of
    `forbidden`, and the daemon would only find out when it starts."""
    return field(default=default, metadata={"forbidden": forbidden})


#: Seconds, where zero would break what the key paces (a timeout, a backoff).
_POSITIVE = {"min": 0.001}


@dataclass(frozen=True, slots=True)
class MongoConfig:
    uri: str = field(
        default="mongodb://127.0.0.1:27017/?replicaSet=rs0", metadata={"secret_uri": True}
    )
    database: str = _mongo_name("rocketchat", '/\\. "$')
    queue_collection: str = _mongo_name("streamer_queue", "$")
    state_collection: str = _mongo_name("streamer_state", "$")


@dataclass(frozen=True, slots=True)
class QueueConfig:
    delay_online: float = 120.0
    delay_away: float = 120.0
    delay_offline: float = 0.0
    clear_on_read: Literal["user", "room"] = "user"
    reschedule_on_presence: bool = True
    always_notify_mobile: bool = False
    #: Entries older than this are dropped, like Rocket.Chat's 2 h queue TTL; at most
    #: 30 days, which the push ledger's records then outlive.
    max_age: float = field(default=7200.0, metadata={"max": 30 * 86_400})
    #: How long an instance owns an entry it took for delivery before another may.
    lease_seconds: float = field(default=60.0, metadata={"min": 1})


@dataclass(frozen=True, slots=True)
class RulesConfig:
    busy_blocks_push: bool = True
    #: Unset: use the Notifications_Max_Room_Members setting.
    max_room_members: int | None = None


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    mode: Literal["gateway", "direct"] = "gateway"
    #: Unset: use the Push_gateway setting (every line, in order).
    gateway_urls: tuple[str, ...] | None = None
    #: Requests in flight; a gateway ~50-100 ms away needs hundreds (Sygnal caps at 512).
    concurrency: int = field(default=256, metadata={"min": 1})
    timeout: float = field(default=10.0, metadata=_POSITIVE)
    give_up_after: float = 3600.0
    retry_initial: float = field(default=1.0, metadata=_POSITIVE)
    retry_max: float = field(default=300.0, metadata=_POSITIVE)
    #: A push a crash left claimed but unrecorded (the provider may or may not have
    #: it): "skip" it (at most once, SPEC §7) or "resend" it (at least once).
    unknown_outcome: Literal["skip", "resend"] = "skip"


@dataclass(frozen=True, slots=True)
class FcmConfig:
    project_id: str | None = None
    service_account_file: str | None = None
    base_url: str = "https://fcm.googleapis.com"
    #: Unset: the token_uri from the service-account file.
    token_url: str | None = None


@dataclass(frozen=True, slots=True)
class ApnsConfig:
    key_file: str | None = None
    key_id: str | None = None
    team_id: str | None = None
    #: Unset: the token's appName.
    topic: str | None = None
    #: Unset: production or sandbox by the Push_production setting.
    base_url: str | None = None


@dataclass(frozen=True, slots=True)
class EmailConfig:
    enabled: bool = True
    #: Unset SMTP keys fall back to Rocket.Chat's SMTP_* settings.
    host: str | None = None
    port: int | None = field(default=None, metadata={"min": 1, "max": 65535})
    username: str | None = None
    password: str | None = _secret()
    security: Literal["none", "starttls", "tls"] | None = None
    from_address: str | None = None


@dataclass(frozen=True, slots=True)
class HttpConfig:
    listen: str = "127.0.0.1:9464"


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


@dataclass(frozen=True, slots=True)
class AppConfig:
    #: At most a day: past that the stuck-shutdown watchdog's timer cannot be set.
    shutdown_grace: float = field(default=10.0, metadata={"max": 86_400})
    #: Names this instance's leases in the queue (unset: hostname and pid) and its
    #: saved change-stream positions (unset: "default"; see sources/resume.py).
    instance_id: str | None = None


@dataclass(frozen=True, slots=True)
class Config:
    mongo: MongoConfig = MongoConfig()
    queue: QueueConfig = QueueConfig()
    rules: RulesConfig = RulesConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    fcm: FcmConfig = FcmConfig()
    apns: ApnsConfig = ApnsConfig()
    email: EmailConfig = EmailConfig()
    http: HttpConfig = HttpConfig()
    log: LogConfig = LogConfig()
    app: AppConfig = AppConfig()


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Defaults, then the file (`path`, else $STREAMER_CONFIG, else none), then the env."""
    env = os.environ if env is None else env
    if path == "":
        raise ConfigError("--config is empty: give the path of a config file, or leave it out")
    path = path or env.get(CONFIG_PATH_ENV) or None
    raw: dict[str, dict[str, tuple[Any, str]]] = {}
    if path is not None:
        _merge_file(raw, Path(path))
    _merge_env(raw, env)
    return _build(raw)


def _merge_file(raw: dict[str, dict[str, tuple[Any, str]]], path: Path) -> None:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a BOM is no error
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    sections = _sections()
    for section, values in document.items():
        if section not in sections:
            raise ConfigError(
                f"{path}: unknown section [{section}]; known: {', '.join(sorted(sections))}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: [{section}] must be a table of keys")
        for key, value in values.items():
            _check_key(section, key, str(path))
            raw.setdefault(section, {})[key] = (value, f"{path}: [{section}] {key}")


def _merge_env(raw: dict[str, dict[str, tuple[Any, str]]], env: Mapping[str, str]) -> None:
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        _check_key(section, key, f"environment variable {name}")
        value = text if _is_text(section, key) else _parse_env_value(text)
        raw.setdefault(section, {})[key] = (value, f"environment {name}")


def _is_text(section: str, key: str) -> bool:
    """Text keys take the env value as typed: a password `true` or `1e5` must stay one."""
    expected = typing.get_type_hints(_sections()[section])[key]
    return bool(expected is str or expected == str | None)


def _parse_env_value(text: str) -> Any:
    """Env values are TOML literals when they parse as one (`5`, `true`, `["a"]`), else text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _sections() -> dict[str, type[Any]]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _check_key(section: str, key: str, where: str) -> None:
    sections = _sections()
    if section not in sections:
        raise ConfigError(f"{where}: unknown section [{section}]")
    known = {f.name for f in dataclasses.fields(sections[section])}
    if key not in known:
        raise ConfigError(
            f"{where}: unknown key {key!r} in [{section}]; known keys: {', '.join(sorted(known))}"
        )


def _build(raw: dict[str, dict[str, tuple[Any, str]]]) -> Config:
    built: dict[str, Any] = {}
    for section, cls in _sections().items():
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {
            key: _within(
                _coerce(value, hints[key], where, _is_secret(fields[key])), fields[key], where
            )
            for key, (value, where) in raw.get(section, {}).items()
        }
        built[section] = cls(**values)
    config = Config(**built)
    _check_together(config, raw)
    return config


def _check_together(config: Config, raw: dict[str, dict[str, tuple[Any, str]]]) -> None:
    """Keys that only make sense against each other."""

    def where(section: str, key: str) -> str:
        return raw.get(section, {}).get(key, (None, f"[{section}] {key}"))[1]

    delivery, queue = config.delivery, config.queue
    if delivery.retry_max < delivery.retry_initial:
        raise ConfigError(
            f"{where('delivery', 'retry_max')}: retry_max ({delivery.retry_max}) is below "
            f"[delivery] retry_initial ({delivery.retry_initial})"
        )
    for key in ("delay_online", "delay_away", "delay_offline"):
        if getattr(queue, key) >= queue.max_age:
            raise ConfigError(
                f"{where('queue', 'max_age')}: max_age ({queue.max_age}) must exceed every "
                f"delay, but {key} is {getattr(queue, key)}: its entries would all be dropped"
            )


def _within(value: Any, f: dataclasses.Field[Any], where: str) -> Any:
    """Numbers within the field's bounds: never negative, and at least `min` (a port, a
    count of requests) where less cannot work; names without what MongoDB refuses."""
    if isinstance(value, str) and "forbidden" in f.metadata:
        _check_name(value, f.metadata["forbidden"], where)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    low, high = f.metadata.get("min", 0), f.metadata.get("max")
    if value < low or (high is not None and value > high):
        expected = f"{low} to {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{where}: expected {expected}, got {value!r}")
    return value


def _check_name(name: str, forbidden: str, where: str) -> None:
    if not name:
        raise ConfigError(f"{where}: a MongoDB name cannot be empty")
    for char in forbidden + "\0":
        if char in name:
            raise ConfigError(f"{where}: a MongoDB name cannot contain {char!r}, got {name!r}")


def _is_secret(f: dataclasses.Field[Any]) -> bool:
    return bool(f.metadata.get("secret") or f.metadata.get("secret_uri"))


def _coerce(value: Any, expected: Any, where: str, secret: bool = False) -> Any:
    """Check `value` against a field's type; ints widen to floats, lists to tuples.

    The error of a `secret` key names the key and the type it got, never the value.
    """
    origin = typing.get_origin(expected)
    args = typing.get_args(expected)
    got = f"{REDACTED} (a {type(value).__name__})" if secret else repr(value)
    if origin in (types.UnionType, typing.Union):
        inner = next(a for a in args if a is not type(None))
        return _coerce(value, inner, where, secret)
    if origin is Literal:
        if value not in args:
            choices = " or ".join(repr(a) for a in args)
            raise ConfigError(f"{where}: expected {choices}, got {got}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [line.strip() for line in value.replace(",", "\n").splitlines() if line.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {got}")
        return tuple(value)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {expected.__name__}, got {got}")
    if expected is float and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {got}")
    return value


#: URI options whose values are secrets (compared lowercased, as MongoDB does).
SECRET_URI_OPTIONS = frozenset({"tlscertificatekeyfilepassword", "authmechanismproperties"})


def redact_uri(uri: str) -> str:
    """Hide the password and secret options of a MongoDB URI, keeping the user, hosts
    and other options for diagnosis."""
    scheme, userinfo, hosts, options = _split_uri(uri)
    if userinfo is not None and ":" in userinfo:
        hosts = f"{userinfo.partition(':')[0]}:{REDACTED}@{hosts}"
    elif userinfo is not None:
        hosts = f"{userinfo}@{hosts}"
    shown = [
        f"{name}={REDACTED}" if name.lower() in SECRET_URI_OPTIONS else f"{name}{sep}{value}"
        for name, sep, value in options
    ]
    return scheme + hosts + ("?" + "&".join(shown) if options else "")


def uri_secrets(uri: str) -> list[str]:
    """The URI's password and secret option values, as written and as sent."""
    _, userinfo, _, options = _split_uri(uri)
    found = [userinfo.partition(":")[2]] if userinfo and ":" in userinfo else []
    found += [value for name, _, value in options if name.lower() in SECRET_URI_OPTIONS]
    return list(dict.fromkeys(v for secret in found if secret for v in (secret, unquote(secret))))


def _split_uri(uri: str) -> tuple[str, str | None, str, list[tuple[str, str, str]]]:
    """(scheme and '://', userinfo, hosts and path, options) as pymongo splits a URI:
    the userinfo ends at the last '@' before the first '/', so an unescaped '#' or
    '?' in a password is still the password's. An unescaped '/' in it makes the URI
    one pymongo refuses, but it must stay hidden all the same: then the last '@'
    before the options ends the userinfo, or, when a '?' in the password hides where
    the options start, the last '@' of all (over-hiding a URI that cannot work)."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return "", None, uri, []
    hosts, slash, path = rest.partition("/")
    database = path.partition("?")[0]
    if "@" in database:  # not in the options: an X.509 key file may be a@b.pem
        cut = rest.rindex("@", 0, len(hosts) + len(slash) + len(database))
    elif "@" not in hosts and "@" in path and not _looks_like_a_uri(hosts, path):
        cut = rest.rindex("@")
    else:
        cut = -1
    if cut >= 0:
        hosts, slash, path = rest[cut + 1 :].partition("/")
        hosts = f"{rest[:cut]}@{hosts}"
    userinfo, at, hosts = hosts.rpartition("@")
    path, _, query = path.partition("?")
    options = [option.partition("=") for option in query.replace(";", "&").split("&") if option]
    return scheme + sep, userinfo if at else None, hosts + slash + path, options


def _looks_like_a_uri(hosts: str, path: str) -> bool:
    """Whether every `host[:port]` (IPv6 in brackets) has a numeric port, if any, and
    the first option's name holds no '@' (none does): else the text before the first
    '/' is the start of a userinfo with '/' in its password."""
    for host in hosts.split(","):
        port = host.rpartition("]")[2] if host.startswith("[") else host
        if ":" in port and not port.rpartition(":")[2].isdecimal():
            return False
    first_option = path.partition("?")[2].partition("=")[0]
    return "@" not in first_option


def redacted(config: Config) -> dict[str, dict[str, Any]]:
    """The effective configuration as plain data, secrets replaced by `***`."""
    out: dict[str, dict[str, Any]] = {}
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        table: dict[str, Any] = {}
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if f.metadata.get("secret") and value is not None:
                value = REDACTED
            elif f.metadata.get("secret_uri"):
                value = redact_uri(value)
            table[f.name] = value
        out[section.name] = table
    return out


def secret_values(config: Config) -> list[str]:
    """Every secret in the config, so log redaction and tests can look for them."""
    found: list[str] = []
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if f.metadata.get("secret") and value:
                found.append(str(value))
            elif f.metadata.get("secret_uri"):
                # As written in the URI and as sent (a driver error may show either).
                found.extend(uri_secrets(value))
    return found


def to_toml(data: Mapping[str, Mapping[str, Any]]) -> str:
    """Render the flat two-level config as TOML; unset keys become comments."""
    lines: list[str] = []
    for section, table in data.items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            if value is None:
                lines.append(f"# {key} = (unset)")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # JSON escapes every control character TOML refuses but DEL.
    return orjson.dumps(str(value)).decode().replace("\x7f", "\\u007f")


def override_settings(settings: Settings, config: Config) -> Settings:
    """Apply the config keys that the spec lets override Rocket.Chat's settings."""
    changes: dict[str, Any] = {}
    if config.rules.max_room_members is not None:
        changes["max_room_members"] = config.rules.max_room_members
    if config.queue.always_notify_mobile:
        changes["always_notify_mobile"] = True
    if config.delivery.gateway_urls:
        changes["push_gateways"] = tuple(u.rstrip("/") for u in config.delivery.gateway_urls)
    return dataclasses.replace(settings, **changes) if changes else settings
