"""Callback tokens: issued to an external service for one task of one plan, verified without I/O.

A token is `base64url(payload).base64url(HMAC-SHA256(key, payload))`, the payload naming the task,
the plan and the expiry, plus a random nonce so that no two tokens are alike. Nothing about a token
is stored: the signature is the proof, the task's state decides whether it is still of use.

Several keys may be in use at once: tokens are signed with the first and accepted with any, so a
key can be rotated while tasks wait on tokens signed with the one before it.
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


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).digest()


class Signer:
    """Signs with the first of its keys and accepts a signature of any of them."""

    def __init__(self, key: bytes, *older: bytes) -> None:
        keys = (key, *older)
        if any(len(each) < 32 for each in keys):
            raise ValueError("every signing key must be at least 32 bytes")
        self._keys = keys

    def __repr__(self) -> str:
        # Never the keys: a signer may end up in a log line or a traceback.
        return f"<Signer of {len(self._keys)} key(s)>"

    def derive(self, purpose: bytes) -> bytes:
        """A key of its own for `purpose`, from the signing key: one secret to keep, many uses."""
        return self.derivations(purpose)[0]

    def derivations(self, purpose: bytes) -> tuple[bytes, ...]:
        """`derive(purpose)` of every key, the signing key's first: what was made for
        `purpose` under an older key stays readable while that key is still listed."""
        return tuple(_mac(key, b"agentless key for " + purpose) for key in self._keys)

    def issue(self, task_id: str, plan_id: str, expires: float) -> str:
        payload = orjson.dumps([_VERSION, task_id, plan_id, int(expires), secrets.token_hex(16)])
        return f"{_b64(payload)}.{_b64(_mac(self._keys[0], payload))}"

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
        # Every key is compared (a list, not a short-circuiting any()), each in constant time.
        matches = [hmac.compare_digest(given, _mac(key, payload)) for key in self._keys]
        if not any(matches):
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
