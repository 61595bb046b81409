"""Bearer tokens for the task and ops API (AGENTLESS_API_TOKENS), compared in constant time and
required of every route declared `auth="api"`; and the secret an Authorization header presents."""

from __future__ import annotations

import base64
import hmac
import ipaddress
import socket

from aiohttp import web
from aiohttp.typedefs import Handler

from callback_api.declarations import declared
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
        # A header that is not UTF-8 (aiohttp keeps such bytes as surrogates) matches no token,
        # and must not fail to encode.
        secret = presented(request).encode(errors="surrogateescape")
        # Every token is compared, so the time taken does not tell which one came close.
        matches = [hmac.compare_digest(secret, token) for token in self._tokens]
        if not any(matches):
            raise Problem(
                401,
                "this API needs 'Authorization: Bearer <token>' (or Basic auth with the token as "
                "password) with one of AGENTLESS_API_TOKENS",
                # Basic lets a browser ask for the token, for the operations page.
                headers={"WWW-Authenticate": 'Bearer realm="agentless", Basic realm="agentless"'},
            )


def presented(request: web.Request) -> str:
    """The secret the Authorization header presents: a Bearer token, or the password of Basic
    auth (Azure's helper library sends the callback token so, with an empty user name); "" for
    none."""
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(credentials.strip(), validate=True).decode().partition(":")[2]
        except ValueError:  # not base64, not ASCII, or not UTF-8 once decoded
            return ""
    return ""


guard_key = web.AppKey("guard", Guard)


@web.middleware
async def require_api_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The Guard's check of every route declared `auth="api"`, before its handler reads anything
    (a request without the token learns nothing of what else is wrong with it)."""
    route = declared(request)
    if route is not None and route.auth == "api":
        request.app[guard_key].check(request)
    return await handler(request)
