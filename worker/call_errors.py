"""Why an HTTP call failed, as a sentence a person reads, and whether trying again could help."""

from __future__ import annotations

import errno
import os
import ssl

import aiohttp
from yarl import URL


def describe(exc: aiohttp.ClientError, url: URL) -> str:
    """A sentence for what went wrong talking to `url`."""
    where = f"{url.raw_host}:{url.port}"
    match exc:
        case aiohttp.ClientConnectorDNSError():
            reason = f"cannot resolve host '{exc.host}'"
        case aiohttp.ClientConnectorCertificateError(
            certificate_error=ssl.SSLCertVerificationError() as cause
        ):
            reason = f"TLS certificate of {where} is not valid: {cause.verify_message}"
        case aiohttp.ClientConnectorCertificateError():
            reason = f"TLS certificate of {where} is not valid: {exc.certificate_error}"
        case aiohttp.ClientConnectorSSLError():
            reason = f"TLS handshake with {where} failed: {_ssl_reason(exc.os_error)}"
        case aiohttp.ClientConnectorError():
            reason = f"cannot connect to {where}: {_os_reason(exc.os_error)}"
        case aiohttp.ClientPayloadError() if _reset_mid_body(exc):
            reason = f"connection reset by {where} before the response was complete"
        case aiohttp.ServerDisconnectedError() | aiohttp.ClientPayloadError():
            reason = f"connection closed by {where} before the response was complete"
        case aiohttp.ClientResponseError():
            reason = f"invalid HTTP response from {where}: {_one_line(exc.message)}"
        case aiohttp.InvalidURL(description=str() as description):
            reason = f"invalid URL {exc.url}: {description}"
        case aiohttp.ClientOSError():
            reason = f"connection to {where} failed: {_os_reason(exc)}"
        case _:
            reason = f"request to {where} failed: {exc}"
    return reason


def _reset_mid_body(exc: aiohttp.ClientPayloadError) -> bool:
    """Whether the connection was reset (rather than closed) before the body was complete.
    aiohttp tells it only in the error's message: its cause is the parser's complaint about the
    missing bytes, and the connection's own error is appended to the message by its repr."""
    return "ConnectionResetError" in str(exc)


def transient(exc: aiohttp.ClientError) -> bool:
    """Whether trying again could help: the network failed, not the endpoint's TLS or HTTP."""
    if isinstance(
        exc,
        aiohttp.ClientConnectorCertificateError
        | aiohttp.ClientConnectorSSLError
        | aiohttp.ClientSSLError,
    ):
        return False
    return isinstance(
        exc,
        aiohttp.ClientConnectorError
        | aiohttp.ServerDisconnectedError
        | aiohttp.ClientPayloadError
        | aiohttp.ClientOSError,
    )


def _one_line(message: str) -> str:
    """aiohttp's parser errors draw a caret under the bad byte; a stored reason is one line."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip(" ^"))


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return _ssl_reason(exc)
    # asyncio's strerror for a failed connect is "Connect call failed ('h', p)"; errno says why.
    if exc.errno is not None and exc.errno in errno.errorcode:
        return os.strerror(exc.errno).lower()
    if exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


def _ssl_reason(exc: OSError) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str):
        return reason.replace("_", " ").lower()
    return str(exc)
