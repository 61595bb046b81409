"""The list conventions that GET /tasks and the definition lists share (SPEC §6, §9): a page by
`rowsPerPage` and `pageNumber` or by a `Range: items=FIRST-LAST` header (answered 206 with
`Content-Range`, or 416 past the end), and `sortType`."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from typing import Annotated, Final, Literal

import orjson
from aiohttp import web
from pydantic import BeforeValidator, Field

from callback_api.problems import Problem

MAX_ROWS_PER_PAGE: Final = 1000
DEFAULT_ROWS_PER_PAGE: Final = 50
MAX_PAGE_NUMBER: Final = 10**9
_RANGE = re.compile(r"items=(\d{1,12})-(\d{1,12})")


# The query's validators: each message follows the parameter's name, as in "rowsPerPage must …".


def _whole(maximum: int) -> BeforeValidator:
    def parse(value: object) -> object:
        # isdigit() alone would take "²", which int() refuses; and int() refuses thousands of
        # digits, which are over the maximum anyway.
        if (
            isinstance(value, str)
            and value.isascii()
            and value.isdigit()
            and len(value.lstrip("0")) <= len(str(maximum))
            and 1 <= int(value) <= maximum
        ):
            return int(value)
        raise ValueError(f"must be a whole number from 1 to {maximum}, not {value!r}")

    return BeforeValidator(parse)


def _sort(value: object) -> object:
    if isinstance(value, str) and value.lower() in ("asc", "desc"):
        return value.lower()
    raise ValueError(f"must be asc or desc, not {value!r}")


# The bounds before the validator, where the schema takes them from.
RowsPerPage = Annotated[int, Field(ge=1, le=MAX_ROWS_PER_PAGE), _whole(MAX_ROWS_PER_PAGE)]
PageNumber = Annotated[int, Field(ge=1, le=MAX_PAGE_NUMBER), _whole(MAX_PAGE_NUMBER)]
SortType = Annotated[Literal["asc", "desc"], BeforeValidator(_sort)]


def one_of(columns: Collection[str]) -> Callable[[str], str]:
    """An `orderField` validator: the value if it is one of `columns`."""

    def validated(value: str) -> str:
        if value not in columns:
            raise ValueError(f"{value!r} is not one of {', '.join(columns)}")
        return value

    return validated


def window(rows_per_page: int, page_number: int, ranged: str | None) -> tuple[int, int]:
    """Offset and limit: from a Range header if there is one, else from the page parameters."""
    if ranged is None:
        return (page_number - 1) * rows_per_page, rows_per_page
    match = _RANGE.fullmatch(ranged.strip())
    if match is None or int(match[1]) > int(match[2]):
        raise Problem(400, f"Range must be 'items=FIRST-LAST' with FIRST <= LAST, not {ranged!r}")
    first, last = int(match[1]), int(match[2])
    return first, min(last, first + MAX_ROWS_PER_PAGE - 1) - first + 1


def json_response(
    body: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


def page_response(
    body: object,
    *,
    ranged: str | None,
    offset: int,
    shown: int,
    total: int,
    exact: bool = True,
    what: str,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """A page of `shown` items from `offset`: 200, or for a Range request 206 with its
    Content-Range, or 416 when the range starts past the last of the list's `total` (plural)
    `what`."""
    if ranged is None:
        return json_response(body, headers=headers)
    if not shown and (total or offset):
        # An empty page is past the end, and its total is always exact (the stores count it).
        raise Problem(
            416,
            f"the range starts past the last of {total} {what}",
            headers={"Content-Range": f"items */{total}"},
        )
    # A page with no item in it has no first and last to name; RFC 9110 writes a complete length
    # that is not known as "*".
    first_last = f"{offset}-{offset + shown - 1}" if shown else "*"
    length = str(total) if exact else "*"
    return json_response(
        body, 206, {**(headers or {}), "Content-Range": f"items {first_last}/{length}"}
    )
