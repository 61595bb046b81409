"""The HTTP calls a task makes (SPEC §4): the request, and the retry and poll policies that
repeat it; with the wire models' common ground (ids, header names, secret headers)."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Final

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from yarl import URL

# What orjson, which writes every stored and queued form of a task, refuses; found on the way in
# rather than at the call, where the task could only be returned to the queue again and again.
UNSTORABLE: Final = (
    "has an integer beyond 64 bits (or nesting over 254 levels), which cannot be stored; "
    "send such a number as a string"
)


def storable(value: JsonValue) -> JsonValue:
    """`value`, or ValueError when it cannot be written as JSON (see UNSTORABLE)."""
    try:
        orjson.dumps(value)
    except TypeError:
        raise ValueError(UNSTORABLE) from None
    return value


# Free-form JSON a task carries (a body, its variables): any JSON orjson can write.
StorableJson = Annotated[JsonValue, AfterValidator(storable)]

# Header names (lower case) whose values never reach a log, a stored record or an event.
SECRET_HEADERS: Final = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "authtoken",
        "cookie",
        "set-cookie",
        "x-api-key",
        "api-key",
        "x-auth-token",
    }
)
REDACTED: Final = "***"


class Method(StrEnum):
    OPTIONS = "OPTIONS"
    GET = "GET"
    HEAD = "HEAD"
    POST = "POST"
    PUT = "PUT"
    DELETE = "DELETE"
    TRACE = "TRACE"
    PATCH = "PATCH"


def _method(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
Id = Annotated[str, StringConstraints(pattern=rf"^{ID_PATTERN.pattern}$")]
HeaderName = Annotated[str, StringConstraints(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")]


class WireModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class TaskRequest(WireModel):
    """The HTTP call a task makes (also the shape of `cancelRequest`)."""

    method: Annotated[Method, BeforeValidator(_method)] = Method.POST
    url: str | None = None
    connection: Id | None = None
    url_suffix: str = ""
    headers: dict[HeaderName, str] = Field(default_factory=dict)
    body: StorableJson = None

    @field_validator("url")
    @classmethod
    def _absolute_http(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            url = URL(value)
        except ValueError as exc:
            raise ValueError(f"not a URL: {exc}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an absolute http:// or https:// URL")
        return value

    @field_validator("headers")
    @classmethod
    def _header_values(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            if "\r" in value or "\n" in value:
                raise ValueError(f"header {name!r} has a line break in its value")
        return headers

    @model_validator(mode="after")
    def _one_target(self) -> TaskRequest:
        if (self.url is None) == (self.connection is None):
            raise ValueError("give exactly one of request.url or request.connection")
        if self.url is not None and self.url_suffix:
            raise ValueError("request.urlSuffix goes with request.connection, not request.url")
        return self

    def redacted(self) -> dict[str, JsonValue]:
        """This request as stored and shown: secret header values replaced."""
        data: dict[str, JsonValue] = self.model_dump(mode="json", by_alias=True)
        data["headers"] = {
            name: REDACTED if name.lower() in SECRET_HEADERS else value
            for name, value in self.headers.items()
        }
        return data


# The longest wait before a retry, whatever the policy or the endpoint's Retry-After asks.
MAX_RETRY_DELAY: Final = 3600


class RetryPolicy(WireModel):
    """Opt-in retries of transient failures (SPEC §4): at most `attempts` calls in all, the
    n-th retry `delaySeconds * backoff ** (n - 1)` seconds after the failure."""

    attempts: int = Field(default=3, ge=1, le=100)
    delay_seconds: float = Field(default=1.0, ge=0, le=MAX_RETRY_DELAY)
    backoff: float = Field(default=2.0, ge=1, le=10)

    def delay(self, retry: int) -> float:
        """Seconds before retry number `retry` (from 1)."""
        return min(self.delay_seconds * self.backoff ** (retry - 1), MAX_RETRY_DELAY)


# The longest interval between two polls, and the factor by which a Retry-After may stretch it.
MAX_POLL_INTERVAL: Final = 86_400
RETRY_AFTER_STRETCH: Final = 10


class PollPolicy(WireModel):
    """How a poll task follows the job its start request began (SPEC §4 `poll`)."""

    request: TaskRequest | None = None
    interval_seconds: float = Field(default=10, ge=1, le=MAX_POLL_INTERVAL)
    max_attempts: int | None = Field(default=None, ge=1, le=1_000_000)
    failure_criteria: str | None = Field(default=None, max_length=10_000)
    ignore_failures: bool = False

    def delay(self, retry_after: float | None) -> float:
        """Seconds until the next poll: the interval, or longer if the answer asked for it."""
        if retry_after is None or retry_after <= self.interval_seconds:
            return self.interval_seconds
        return min(retry_after, self.interval_seconds * RETRY_AFTER_STRETCH)
