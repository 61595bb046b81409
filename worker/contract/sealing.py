"""Secret header values kept at rest only sealed (AES-GCM), under a key derived from the signing
key: a poll task's requests need their credentials long after its message was acknowledged."""

from __future__ import annotations

import os

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from worker.contract.tokens import Signer

_NONCE_BYTES = 12
_PURPOSE = b"sealed headers"


class SealError(Exception):
    """Sealed data that this key cannot open (another key, or tampered with)."""


class Sealer:
    """Seals under the signing key's derivation; opens under any listed key's, so that headers
    sealed before a key rotation stay readable while the older key is still listed."""

    def __init__(self, signer: Signer) -> None:
        self._aeads = [AESGCM(key) for key in signer.derivations(_PURPOSE)]

    def __repr__(self) -> str:
        return f"<Sealer of {len(self._aeads)} key(s)>"

    def seal(self, headers: dict[str, str], bound_to: str) -> bytes:
        """`headers`, sealed; `bound_to` (the task id) must be given again to open them, so that
        sealed values cannot be moved from one task's row to another's."""
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aeads[0].encrypt(nonce, orjson.dumps(headers), bound_to.encode())

    def unseal(self, sealed: bytes, bound_to: str) -> dict[str, str]:
        nonce, data = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
        for aead in self._aeads:
            try:
                plain = aead.decrypt(nonce, data, bound_to.encode())
            except InvalidTag:
                continue
            headers: dict[str, str] = orjson.loads(plain)
            return headers
        raise SealError("sealed headers cannot be opened with any of the signing keys")
