"""Callback tokens: issued to an external service for one task of one plan, verified without I/O.

A token is `base64url(payload).base64url(HMAC-SHA256(key, payload))`, the payload naming the task,
the plan and the expiry, plus a random nonce so that no two tokens are alike. Nothing about a token
is stored: the signature is the proof, the task's state decides whether it is still of use.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import orjson

# Callbacks that arrive a little after the deadline are told "timed out" (409), not "expired" (401).
GRACE_SECONDS = 300
_VERSION = "v1"


class TokenError(Exception):
    """The token is missing, malformed, forged or expired; the message says which."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What a valid token allows: calls about this task of this plan, until `expires`."""

    task_id: str
    plan_id: str
    expires: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("the signing key must be at least 32 bytes")
        self._key = key

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def derive(self, purpose: bytes) -> bytes:
        """A key of its own for `purpose`, from the signing key: one secret to keep, many uses."""
        return self._sign(b"agentless key for " + purpose)

    def issue(self, task_id: str, plan_id: str, expires: float) -> str:
        payload = orjson.dumps([_VERSION, task_id, plan_id, int(expires), secrets.token_hex(16)])
        return f"{_b64(payload)}.{_b64(self._sign(payload))}"

    def verify(self, token: str, *, now: float | None = None) -> Grant:
        """The grant the token carries; TokenError unless it is genuine and unexpired."""
        encoded, dot, signature = token.partition(".")
        if not dot or len(token) > 2048:
            raise TokenError("the token is malformed")
        try:
            payload = _unb64(encoded)
            given = _unb64(signature)
        except (binascii.Error, ValueError) as exc:
            raise TokenError("the token is malformed") from exc
        if not hmac.compare_digest(given, self._sign(payload)):
            raise TokenError("the token's signature is not valid")
        try:
            version, task_id, plan_id, expires, _ = orjson.loads(payload)
        except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
            raise TokenError("the token is malformed") from exc
        if version != _VERSION:
            raise TokenError("the token is of an unknown version")
        if expires < (time.time() if now is None else now):
            raise TokenError("the token has expired")
        return Grant(task_id, plan_id, expires)


def new_key() -> bytes:
    return secrets.token_bytes(32)
