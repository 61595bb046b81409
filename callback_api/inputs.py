"""Request input: the body, read within its limits, and the query, read through the pydantic
model the OpenAPI document publishes for it."""

from __future__ import annotations

import asyncio
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from callback_api.problems import Problem
from callback_api.server import deadlines_key
from worker.contract.errors import invalid_fields

Query = TypeVar("Query", bound=BaseModel)


def query_of(request: web.Request, model: type[Query]) -> Query:
    """The query string as `model`; 400 naming each parameter to fix, and each parameter the
    model does not take if it forbids extra ones (a misspelt filter must not list everything)."""
    query = dict(request.query)
    if model.model_config.get("extra") == "forbid":
        known = sorted(field.alias or name for name, field in model.model_fields.items())
        unknown = sorted(set(query) - set(known))
        if unknown:
            raise Problem(
                400, f"unknown query parameters: {', '.join(unknown)}; known: {', '.join(known)}"
            )
    try:
        return model.model_validate(query)
    except ValidationError as exc:
        raise Problem(400, "; ".join(map(str, invalid_fields(exc)))) from exc


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes `limit`, whatever Content-Length claims, and
    (408) when it has not arrived whole within the body deadline (callback_api/server.py)."""
    chunks: list[bytes] = []
    size = 0
    seconds = request.config_dict[deadlines_key].body_seconds
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise Problem(413, f"the request body is over the {limit}-byte limit")
                chunks.append(chunk)
    except TimeoutError:
        raise Problem(
            408,
            f"the request body did not arrive whole within {seconds:g} s of its headers "
            f"({size} bytes came); send it at once",
        ) from None
    except ConnectionResetError:
        # The client went away mid-body: nobody to answer, and nothing for the error log.
        raise Problem(400, "the connection closed before the body arrived whole") from None
    return b"".join(chunks)
