"""The few errors agentless raises, and invalid input told as a person reads it; each message
says what to fix."""

from __future__ import annotations

import errno
import socket
from typing import NamedTuple

from pydantic import ValidationError


class AgentlessError(Exception):
    """Base of every error agentless raises on purpose."""


class ConfigError(AgentlessError):
    """A setting is missing, malformed or points at something unreachable."""


class CannotListen(ConfigError):
    """A server cannot listen where its settings say: the port is taken, or the host is not an
    address of this machine. `setting` is the settings' common prefix, such as
    AGENTLESS_WORKER for AGENTLESS_WORKER_HOST and AGENTLESS_WORKER_PORT."""

    def __init__(
        self, exc: OSError, host: str, port: int, *, setting: str, port_off: str = ""
    ) -> None:
        where = f"port {port} ({setting}_PORT) on {host or 'every address'}"
        if exc.errno == errno.EADDRINUSE:
            also = f", or 0 {port_off}" if port_off else ""
            message = (
                f"{where} is in use by another process; set {setting}_PORT to a free port{also}"
            )
        elif exc.errno == errno.EACCES:
            message = f"{where} needs privileges this process lacks; set {setting}_PORT above 1023"
        elif exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
            message = (
                f"{setting}_HOST {host!r} is not an address of this machine; set it to one of "
                "its addresses, or 0.0.0.0 to listen on all of them"
            )
        else:
            message = f"cannot listen on {where}: {exc.strerror or exc}"
        super().__init__(message)


class Unavailable(AgentlessError):
    """The broker, the database or the API cannot be reached now; trying again later may work.
    The message names the address and what to check."""


class InvalidTask(AgentlessError):
    """A task message that can never be processed; the message says why."""


class EgressRefused(AgentlessError):
    """The egress policy forbids calling this address."""


class UsageError(AgentlessError):
    """A command was given something it cannot use; the message says what."""


class InvalidField(NamedTuple):
    field: str  # its dotted path; empty for the input as a whole
    message: str
    # Our own validators' messages (a ValueError's) are worded to follow the field's name, as in
    # "rowsPerPage must be …"; pydantic's stand apart, as in "allHostTypes: Input should be …".
    ours: bool

    def __str__(self) -> str:
        return f"{self.field} {self.message}" if self.ours else f"{self.field}: {self.message}"


def invalid_fields(exc: ValidationError) -> list[InvalidField]:
    """Each field `exc` found invalid, and what is wrong with it, as a person would read it."""
    return [
        InvalidField(
            ".".join(str(p) for p in error["loc"]),
            error["msg"].removeprefix("Value error, "),
            error["type"] == "value_error",
        )
        for error in exc.errors(include_url=False, include_input=False)
    ]


def describe(exc: ValidationError) -> str:
    """One part per invalid field, on one line."""
    return "; ".join(f"{f.field or 'message'}: {f.message}" for f in invalid_fields(exc))
