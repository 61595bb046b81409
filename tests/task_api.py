"""The task and ops API as the tests call it over HTTP."""

from __future__ import annotations

import io
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDictProxy


async def call(
    method: str, url: str, body: object = None, headers: dict[str, str] | None = None
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    raw = None if body is None else body if isinstance(body, bytes) else orjson.dumps(body)
    data = None if raw is None else io.BytesIO(raw)
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, data=data, headers=headers) as response,
    ):
        text = await response.text()
        return response.status, orjson.loads(text) if text else None, response.headers
