"""Request input read through the pydantic models the OpenAPI document publishes."""

from __future__ import annotations

from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from callback_api.problems import Problem
from worker.contract.settings import describe

Query = TypeVar("Query", bound=BaseModel)


def query_of(request: web.Request, model: type[Query]) -> Query:
    """The query string as `model`; 400 naming each parameter to fix."""
    try:
        return model.model_validate(dict(request.query))
    except ValidationError as exc:
        raise Problem(400, f"the query is not valid: {describe(exc)}") from exc
