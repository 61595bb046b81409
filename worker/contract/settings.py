"""Every AGENTLESS_* variable, validated once at start-up (SPEC §2)."""

from __future__ import annotations

import ipaddress
import re
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Literal

import orjson
from pydantic import (
    AnyUrl,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from yarl import URL

from worker.contract.errors import ConfigError, describe

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Link-local ranges hold every major cloud's instance metadata service (169.254.169.254,
# fd00:ec2::254 is AWS's IPv6 one); the rest are metadata endpoints outside those ranges.
BUILTIN_EGRESS_DENY: tuple[str, ...] = (
    "169.254.0.0/16",
    "fe80::/10",
    "fd00:ec2::254/128",
    "100.100.100.200/32",
    "168.63.129.16/32",
    "metadata.google.internal",
    "metadata.goog",
)


class BasicAuth(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["basic"]
    username: str
    password: SecretStr


class BearerAuth(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["bearer"]
    token: SecretStr


class HeaderAuth(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["header"]
    name: str = Field(min_length=1)
    value: SecretStr


class ServiceConnection(BaseModel):
    """A base URL plus credentials that stay on the worker's side, never in messages."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    url: str
    auth: Annotated[BasicAuth | BearerAuth | HeaderAuth, Field(discriminator="type")] | None = None

    @field_validator("url")
    @classmethod
    def _absolute_http(cls, value: str) -> str:
        url = URL(value)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an absolute http(s) URL")
        return value


_connections_adapter = TypeAdapter(dict[str, ServiceConnection])


def load_connections(path: Path) -> dict[str, ServiceConnection]:
    """Read a JSON or TOML file mapping connection names to ServiceConnection."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"AGENTLESS_CONNECTIONS: cannot read {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode()) if ".toml" in path.suffixes else orjson.loads(raw)
    except (tomllib.TOMLDecodeError, orjson.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"AGENTLESS_CONNECTIONS: {path} is not valid: {exc}") from exc
    try:
        return _connections_adapter.validate_python(data)
    except ValidationError as exc:
        raise ConfigError(
            f"AGENTLESS_CONNECTIONS: {path} does not describe connections: {describe(exc)}"
        ) from exc


class EgressRule(BaseModel):
    """Networks and host names, from a comma-separated setting."""

    model_config = ConfigDict(frozen=True)
    networks: tuple[Network, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, items: list[str]) -> EgressRule:
        networks: list[Network] = []
        hosts: set[str] = set()
        for item in items:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.add(item.lower().rstrip("."))
        return cls(networks=tuple(networks), hosts=frozenset(hosts))


def _split(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


CommaList = Annotated[list[str], NoDecode]

# AGENTLESS_RETENTION's units, in seconds.
_RETENTION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_RETENTION = re.compile(r"(?:(\d{1,12})|(\d{1,12}(?:\.\d{1,6})?)([smhd]))")
# A century: longer would put now() minus the retention out of PostgreSQL's timestamp range, which
# the purge would learn only at its first statement.
MAX_RETENTION_SECONDS = 100 * 365 * 86400


def parse_retention(value: object) -> float:
    """AGENTLESS_RETENTION in seconds: a whole number of seconds, or a number with a unit s, m, h
    or d (`90s`, `30m`, `36h`, `7d`); 0 keeps completed tasks forever."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _RETENTION.fullmatch(value.strip().lower())):
        whole, number, unit = match.groups()
        seconds = float(whole) if whole is not None else float(number) * _RETENTION_UNITS[unit]
    else:
        raise ValueError(
            "must be a whole number of seconds or a number with a unit s, m, h or d (90s, 30m, "
            "36h, 7d); 0 keeps completed tasks forever"
        )
    if not 0 <= seconds <= MAX_RETENTION_SECONDS:
        raise ValueError(f"must be from 0 (forever) to {MAX_RETENTION_SECONDS // 86400}d")
    return seconds


# A key is a secret to be guessed by no one: as long as the HMAC-SHA256 it keys.
MIN_SIGNING_KEY_BYTES = 32


def split_signing_keys(value: SecretStr) -> tuple[str, ...]:
    """The comma-separated keys of AGENTLESS_SIGNING_KEY; ValueError, naming a key only by its
    place in the list, when one is empty or too short."""
    keys = tuple(key.strip() for key in value.get_secret_value().split(","))
    for number, key in enumerate(keys, 1):
        place = f"key {number} of {len(keys)}" if len(keys) > 1 else "the key"
        size = len(key.encode())
        if not size:
            raise ValueError(
                f"{place} is empty: list keys separated by single commas, or leave the setting "
                "unset to use the key kept in the database"
            )
        if size < MIN_SIGNING_KEY_BYTES:
            raise ValueError(
                f"{place} is {size} bytes long, and every key must be at least "
                f"{MIN_SIGNING_KEY_BYTES} bytes (`openssl rand -base64 32` makes one)"
            )
    return keys


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="AGENTLESS_",
        extra="ignore",
        frozen=True,
        validate_default=True,
        # A refused value may be a key, a token or a URL with its password: errors never echo it.
        hide_input_in_errors=True,
    )

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    prefix: str = Field(default="agentless", pattern=r"^[A-Za-z0-9._-]{1,100}$")
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0, le=65535)
    public_url: AnyUrl = AnyUrl("http://127.0.0.1:8080")
    signing_key: SecretStr | None = None
    api_tokens: Annotated[list[SecretStr], NoDecode] = []
    concurrency: int = Field(default=256, ge=1, le=65535)
    response_timeout: float = Field(default=20, gt=0)
    callback_timeout: float = Field(default=3600, gt=0)
    max_response_bytes: int = Field(default=5_242_880, ge=0)
    connections: Path | None = None
    egress_deny: CommaList = []
    egress_allow: CommaList = []
    log_format: Literal["console", "json"] | None = None
    worker_port: int = Field(default=9464, ge=0, le=65535)
    worker_host: str = "127.0.0.1"
    # None: the command line's --log-level, whose default is info, decides.
    log_level: Literal["debug", "info", "warning", "error"] | None = None
    # Seconds a completed task is kept (AGENTLESS_RETENTION, read by parse_retention); 0: forever.
    retention: Annotated[float, BeforeValidator(parse_retention)] = 7 * 86400.0

    @field_validator("amqp_url")
    @classmethod
    def _amqp(cls, value: str) -> str:
        split_amqp_urls(value)
        return value

    @field_validator("database_url")
    @classmethod
    def _postgres(cls, value: str) -> str:
        # libpq's multi-host form (host1:port1,host2:port2) is no URL yarl can read: only the
        # scheme is checked here, and asyncpg reads the rest.
        if value.partition("://")[0] not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql:// URL")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("signing_key")
    @classmethod
    def _signing_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            split_signing_keys(value)
        return value

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _tokens(cls, value: object) -> object:
        return _split(value)

    @field_validator("egress_deny", "egress_allow", mode="before")
    @classmethod
    def _egress(cls, value: object) -> object:
        return _split(value)

    @field_validator("egress_deny", "egress_allow")
    @classmethod
    def _egress_items(cls, items: list[str]) -> list[str]:
        for item in items:
            if "/" in item:
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError as exc:
                    raise ValueError(f"{item!r} is not a valid CIDR") from exc
        return items

    @property
    def amqp_urls(self) -> tuple[str, ...]:
        """The RabbitMQ nodes AGENTLESS_AMQP_URL lists, in the order to try them."""
        return split_amqp_urls(self.amqp_url)

    @property
    def signing_keys(self) -> tuple[str, ...]:
        """AGENTLESS_SIGNING_KEY's keys, the one that signs first; () when it is not set."""
        return () if self.signing_key is None else split_signing_keys(self.signing_key)

    @property
    def deny_rule(self) -> EgressRule:
        """The built-in metadata ranges plus AGENTLESS_EGRESS_DENY."""
        return EgressRule.parse([*BUILTIN_EGRESS_DENY, *self.egress_deny])

    @property
    def allow_rule(self) -> EgressRule:
        return EgressRule.parse(self.egress_allow)

    @property
    def effective_log_format(self) -> Literal["console", "json"]:
        if self.log_format is not None:
            return self.log_format
        return "console" if sys.stderr.isatty() else "json"

    def load_connections(self) -> dict[str, ServiceConnection]:
        return {} if self.connections is None else load_connections(self.connections)


def load_settings(config_file: Path | None = None) -> Settings:
    """Settings from the environment, then from `config_file` for what the environment lacks."""
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"--config: {config_file} is not a readable file")
    try:
        return Settings(_env_file=config_file)  # type: ignore[call-arg]
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False, include_input=False):
            name = "AGENTLESS_" + "_".join(str(p) for p in error["loc"][:1]).upper()
            lines.append(f"{name}: {error['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(lines)) from exc


def split_amqp_urls(value: str) -> tuple[str, ...]:
    """The node URLs of a comma-separated AGENTLESS_AMQP_URL; ValueError naming the one that is
    not an amqp:// URL (by its position: a URL may hold a password)."""
    urls = tuple(url.strip() for url in value.split(","))
    for position, url in enumerate(urls, 1):
        try:
            scheme, host = URL(url).scheme, URL(url).host
        except ValueError:
            scheme, host = "", None
        if scheme not in ("amqp", "amqps") or not host:
            if len(urls) == 1:
                raise ValueError("must be an amqp:// or amqps:// URL, or several, comma-separated")
            raise ValueError(
                f"must be amqp:// or amqps:// URLs, comma-separated; URL {position} of "
                f"{len(urls)} is not one"
            )
    return urls


# The password in a URL's user info, in a single or a libpq multi-host URL alike.
_PASSWORD = re.compile(r"(?<=://)([^:/@?#]*):[^@/?#]*@")


def redact_url(url: str) -> str:
    """The URL (or comma-separated URLs) without its passwords, for messages a person reads."""
    return _PASSWORD.sub(r"\1:***@", url)
