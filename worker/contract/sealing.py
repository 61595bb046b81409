"""Secret header values kept at rest only sealed (AES-GCM), under a key derived from the signing
key: a poll task's requests need their credentials long after its message was acknowledged."""

from __future__ import annotations

import os

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from worker.contract.tokens import Signer

_NONCE_BYTES = 12


class SealError(Exception):
    """Sealed data that this key cannot open (another key, or tampered with)."""


class Sealer:
    def __init__(self, signer: Signer) -> None:
        self._aead = AESGCM(signer.derive(b"sealed headers"))

    def seal(self, headers: dict[str, str], bound_to: str) -> bytes:
        """`headers`, sealed; `bound_to` (the task id) must be given again to open them, so that
        sealed values cannot be moved from one task's row to another's."""
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, orjson.dumps(headers), bound_to.encode())

    def unseal(self, sealed: bytes, bound_to: str) -> dict[str, str]:
        try:
            plain = self._aead.decrypt(
                sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], bound_to.encode()
            )
        except InvalidTag as exc:
            raise SealError("sealed headers cannot be opened with this signing key") from exc
        headers: dict[str, str] = orjson.loads(plain)
        return headers
