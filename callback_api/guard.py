"""Bearer tokens for the task and ops API (AGENTLESS_API_TOKENS), compared in constant time."""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import socket

from aiohttp import web

from callback_api.problems import Problem
from worker.contract.errors import ConfigError
from worker.contract.settings import Settings


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        except OSError:
            return False
        return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def check_exposure(settings: Settings) -> None:
    """Without tokens, the task and ops API may only listen where nobody else can reach it."""
    if not settings.api_tokens and not is_loopback(settings.api_host):
        raise ConfigError(
            f"AGENTLESS_API_HOST is {settings.api_host}, which is not a loopback address, and "
            "AGENTLESS_API_TOKENS is empty: set tokens, or listen on 127.0.0.1"
        )


class Guard:
    def __init__(self, settings: Settings) -> None:
        self._tokens = [t.get_secret_value().encode() for t in settings.api_tokens]

    def check(self, request: web.Request) -> None:
        """401 unless the request carries one of the API tokens (when any are set)."""
        if not self._tokens:
            return
        presented = _presented(request.headers.get("Authorization", ""))
        # Every token is compared, so the time taken does not tell which one came close.
        matches = [hmac.compare_digest(presented, token) for token in self._tokens]
        if not any(matches):
            raise Problem(
                401,
                "this API needs 'Authorization: Bearer <token>' (or Basic auth with the token as "
                "password) with one of AGENTLESS_API_TOKENS",
                # Basic lets a browser ask for the token, for the operations page.
                headers={"WWW-Authenticate": 'Bearer realm="agentless", Basic realm="agentless"'},
            )


def _presented(header: str) -> bytes:
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip().encode()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(credentials.strip(), validate=True).partition(b":")[2]
        except binascii.Error:
            return b""
    return b""


guard_key = web.AppKey("guard", Guard)
