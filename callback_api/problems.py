"""RFC 9457 problem details: every error the API gives says what went wrong and what to do."""

from __future__ import annotations

import logging
from http import HTTPStatus

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from worker.amqp import BrokerUnavailable
from worker.store.errors import DB_UNAVAILABLE

log = logging.getLogger(__name__)

PROBLEM_TYPE = "application/problem+json"


class Problem(Exception):
    """Raised by handlers; rendered by `problem_middleware` as application/problem+json."""

    def __init__(
        self, status: int, detail: str, *, headers: dict[str, str] | None = None, **extra: object
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers
        self.extra = extra


def problem_response(
    status: int, detail: str, *, headers: dict[str, str] | None = None, **extra: object
) -> web.Response:
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status}
    body["detail"] = detail
    body.update(extra)
    return web.Response(
        status=status, body=orjson.dumps(body), content_type=PROBLEM_TYPE, headers=headers
    )


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own refusals, in the same form as ours."""
    match exc:
        case web.HTTPRequestEntityTooLarge():
            return problem_response(413, f"the request body is too large: {exc.text}")
        case web.HTTPMethodNotAllowed():
            allowed = ", ".join(sorted(exc.allowed_methods))
            return problem_response(
                405,
                f"{request.method} is not allowed here; use {allowed}",
                headers={"Allow": allowed},
            )
        case web.HTTPNotFound():
            return problem_response(404, f"there is no {request.path} here")
        case _:
            return problem_response(exc.status_code, exc.text or exc.reason)


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as problem:
        return problem_response(
            problem.status, problem.detail, headers=problem.headers, **problem.extra
        )
    except web.HTTPException as exc:
        if exc.status_code < 400:
            raise
        return _from_http_exception(request, exc)
    except BrokerUnavailable as exc:
        log.warning("%s answering %s %s", exc, request.method, request.path)
        return problem_response(
            503,
            f"{exc}; send the request again in {exc.retry_after} s",
            headers={"Retry-After": str(exc.retry_after)},
        )
    except DB_UNAVAILABLE as exc:
        # The request can be sent again as it is, as services do on a 503: whatever it did
        # before the database went away is found then, never done twice.
        log.warning("database unavailable answering %s %s: %s", request.method, request.path, exc)
        return problem_response(
            503,
            "the database is unavailable for a moment; send the request again",
            headers={"Retry-After": "1"},
        )
    except Exception:
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return problem_response(500, "the server failed to answer; the error is in its log")
