"""A task's HTTP call: egress policy, redirects, one deadline, a size cap (SPEC §4, §5).

Whatever the endpoint or the task can cause ends in an `InvokeFailure` whose reason a person reads;
`invoke` raises only for the worker's own faults and for cancellation.
"""

from __future__ import annotations

import asyncio
import base64
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import aiohttp
import orjson
from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import JsonValue
from yarl import URL

from worker.budget import ByteBudget, Hold
from worker.call_errors import describe, transient
from worker.contract.errors import EgressRefused
from worker.contract.macros import expand, expand_json
from worker.contract.models import HttpResponse, UnparsedResponse
from worker.contract.redaction import redact_headers
from worker.contract.requests import SECRET_HEADERS, Method, TaskRequest
from worker.contract.settings import BasicAuth, BearerAuth, ServiceConnection, Settings
from worker.egress import EgressPolicy, EgressResolver

MAX_REDIRECTS: Final = 10
ACCEPT_ENCODING: Final = "gzip, deflate"
TEXT_TYPE: Final = "text/plain; charset=utf-8"
JSON_TYPE: Final = "application/json"

# A body up to this size is read without asking the byte budget, and kept parsed: what nearly
# every endpoint answers pays nothing for the bound below.
SMALL_BODY: Final = 16 * 1024
# Bytes of larger bodies the process holds at once (or the size cap, if that is larger): with
# the copies made to record and publish them, this bounds the memory that responses take.
BODY_BUDGET: Final = 64 * 1024 * 1024

# orjson and pydantic write JSON at most 254 levels deep, counted from the event or the stored
# response that holds a body: a body nested deeper than this is kept as its text.
_DEEPEST: Final = 250
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_BODY_HEADERS: Final = (hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH, hdrs.TRANSFER_ENCODING)
# zlib window bits by Content-Encoding; 0 means "look at the first byte" (see _deflate_wbits).
_WBITS: Final = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": 0}


@dataclass(frozen=True, slots=True)
class InvokeFailure:
    """No usable response: the reason is a sentence a user reads. A transient failure (no
    connection, a connection lost, no complete response in time) may succeed if tried again."""

    reason: str
    elapsed_ms: int
    transient: bool = False


class _Failed(Exception):
    """A failure the task or the endpoint caused; its message is the InvokeFailure reason."""

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.transient = transient


@dataclass(slots=True)
class _Call:
    method: str
    url: URL
    headers: CIMultiDict[str]
    body: bytes | None
    # Stripped from the request when a redirect leads to another origin.
    secret_headers: frozenset[str]


@dataclass(frozen=True, slots=True)
class _Connection:
    url: str
    auth_header: tuple[str, str] | None = None
    secret_headers: frozenset[str] = SECRET_HEADERS


def _connection(connection: ServiceConnection) -> _Connection:
    auth = connection.auth
    if auth is None:
        return _Connection(connection.url)
    header: tuple[str, str]
    if isinstance(auth, BasicAuth):
        # RFC 7617's UTF-8, by hand: aiohttp.BasicAuth is deprecated and its successor is too new.
        pair = f"{auth.username}:{auth.password.get_secret_value()}".encode()
        header = (hdrs.AUTHORIZATION, "Basic " + base64.b64encode(pair).decode())
    elif isinstance(auth, BearerAuth):
        header = (hdrs.AUTHORIZATION, f"Bearer {auth.token.get_secret_value()}")
    else:
        header = (auth.name, auth.value.get_secret_value())
    return _Connection(connection.url, header, SECRET_HEADERS | {header[0].lower()})


_NO_CONNECTION: Final = _Connection("")


def _join(base: str, suffix: str) -> str:
    if not suffix or suffix[0] in "?#":
        return base + suffix
    if base.endswith("/"):
        return base + suffix.removeprefix("/")
    return base + suffix if suffix.startswith("/") else f"{base}/{suffix}"


class Invoker:
    """Makes tasks' HTTP calls over one aiohttp session shared by the whole process."""

    def __init__(self, settings: Settings, connections: Mapping[str, ServiceConnection]) -> None:
        self._timeout = settings.response_timeout
        self._limit = settings.max_response_bytes
        self._concurrency = settings.concurrency
        self.budget = ByteBudget(max(BODY_BUDGET, self._limit))
        self._policy = EgressPolicy(settings.deny_rule, settings.allow_rule)
        self._connections = {name: _connection(c) for name, c in connections.items()}
        self._timeout_reason = f"no complete response within {self._timeout:g} s"
        self._too_large_reason = f"response body is larger than the {self._limit}-byte limit"
        self._session: aiohttp.ClientSession | None = None
        self._resolver: EgressResolver | None = None

    async def __aenter__(self) -> Invoker:
        self._resolver = EgressResolver(self._policy)
        # The consumer's tasks and the poller's polls each run up to `concurrency` calls at once.
        connector = aiohttp.TCPConnector(limit=self._concurrency * 2, resolver=self._resolver)
        self._session = aiohttp.ClientSession(
            connector=connector,
            # The whole call runs under one asyncio.timeout; aiohttp's own would only race it.
            timeout=aiohttp.ClientTimeout(),
            # Decompressed here instead, so that the size cap applies to the decompressed body.
            auto_decompress=False,
            # Tasks of unrelated users share the session: no cookie may pass from one to another.
            cookie_jar=aiohttp.DummyCookieJar(),
            # A task without a body sends none, not an empty application/octet-stream one.
            skip_auto_headers=(hdrs.CONTENT_TYPE,),
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._resolver is not None:
            await self._resolver.close()
            self._resolver = None

    async def invoke(
        self,
        request: TaskRequest,
        macros: Mapping[str, str],
        *,
        extra_headers: Mapping[str, str] | None = None,
    ) -> HttpResponse | InvokeFailure:
        """Send `request` and read the whole response, following redirects, within the timeout."""
        started = time.perf_counter()
        try:
            call = self._prepare(request, macros, extra_headers)
            async with asyncio.timeout(self._timeout) as deadline:
                return await self._follow(call, started, deadline)
        except TimeoutError:
            return InvokeFailure(self._timeout_reason, _elapsed_ms(started), transient=True)
        except _Failed as exc:
            return InvokeFailure(str(exc), _elapsed_ms(started), transient=exc.transient)
        except EgressRefused as exc:
            return InvokeFailure(str(exc), _elapsed_ms(started))

    def target(self, request: TaskRequest, macros: Mapping[str, str]) -> tuple[str, str | None]:
        """Where `request` goes (its URL, macros expanded), and its service connection's base URL
        if it names one: what a Location in its answer is resolved against."""
        connection, text = self._target(request, macros)
        return text, connection.url or None

    def _target(self, request: TaskRequest, macros: Mapping[str, str]) -> tuple[_Connection, str]:
        if request.connection is not None:
            connection = self._connections.get(request.connection)
            if connection is None:
                raise _Failed(f"unknown service connection '{request.connection}'")
            return connection, _join(connection.url, expand(request.url_suffix, macros))
        assert request.url is not None  # TaskRequest requires url or connection
        return _NO_CONNECTION, expand(request.url, macros)

    def _prepare(
        self,
        request: TaskRequest,
        macros: Mapping[str, str],
        extra_headers: Mapping[str, str] | None,
    ) -> _Call:
        connection, text = self._target(request, macros)
        try:
            url = URL(text)
        except ValueError as exc:
            raise _Failed(f"request URL is not valid after macro expansion: {exc}") from None
        if url.scheme not in ("http", "https") or not url.raw_host:
            raise _Failed("request URL is not an absolute http(s) URL after macro expansion")

        headers: CIMultiDict[str] = CIMultiDict()
        for name, template in request.headers.items():
            value = expand(template, macros)
            if "\r" in value or "\n" in value:
                raise _Failed(
                    f"header {name!r} has a line break in its value after macro expansion"
                )
            headers[name] = value
        if extra_headers:
            for name, value in extra_headers.items():
                headers.setdefault(name, value)
        if connection.auth_header is not None:
            # The connection's credentials win over a task header of the same name: a task may
            # name a connection, but never decide what is sent as that connection's identity.
            name, value = connection.auth_header
            headers[name] = value
        headers.setdefault(hdrs.ACCEPT_ENCODING, ACCEPT_ENCODING)

        body = _encode_body(request.body, macros)
        if body is not None:
            headers.setdefault(
                hdrs.CONTENT_TYPE, TEXT_TYPE if isinstance(request.body, str) else JSON_TYPE
            )
        return _Call(request.method.value, url, headers, body, connection.secret_headers)

    async def _follow(self, call: _Call, started: float, deadline: asyncio.Timeout) -> HttpResponse:
        hold = Hold(self.budget)
        try:
            return await self._answer(call, started, deadline, hold)
        finally:
            hold.release()

    async def _answer(
        self, call: _Call, started: float, deadline: asyncio.Timeout, hold: Hold
    ) -> HttpResponse:
        assert self._session is not None, "use the Invoker as an async context manager"
        for _ in range(MAX_REDIRECTS + 1):
            url = call.url
            self._policy.check_host(url.raw_host or "")
            try:
                async with self._session.request(
                    call.method,
                    url,
                    headers=call.headers,
                    data=call.body,
                    allow_redirects=False,
                ) as response:
                    location = response.headers.get(hdrs.LOCATION)
                    if response.status in _REDIRECTS and location is not None:
                        _redirect(call, response.status, location)
                        continue
                    if call.method == Method.HEAD:
                        body = b""
                    else:
                        body = await self._read(response, deadline, hold)
                    answer = _response(
                        response.status,
                        _headers(response.headers, call.secret_headers),
                        body,
                        _elapsed_ms(started),
                    )
                    # The body's bytes stay taken until the task is done with its response.
                    hold.keep_until_gone(answer)
                    return answer
            except aiohttp.ClientError as exc:
                raise _Failed(describe(exc, url), transient=transient(exc)) from exc
        raise _Failed(f"too many redirects (more than {MAX_REDIRECTS})")

    async def _read(
        self, response: aiohttp.ClientResponse, deadline: asyncio.Timeout, hold: Hold
    ) -> bytes:
        """The decoded body, never reading past the limit (+1 byte, to tell that it is over),
        nor past a small size without room for it in the byte budget."""
        limit = self._limit
        length = response.content_length
        if length is not None and length > limit:
            raise _Failed(self._too_large_reason)
        encoding = response.headers.get(hdrs.CONTENT_ENCODING, "").strip().lower()
        wbits = _WBITS.get(encoding)
        if length is not None and length > SMALL_BODY and not encoding:
            await self._admit(hold, length, deadline)
        decoder: zlib._Decompress | None = None
        chunks: list[bytes] = []
        received = size = 0
        try:
            while chunk := await response.content.readany():
                received += len(chunk)
                if received > limit:
                    raise _Failed(self._too_large_reason)
                if wbits is not None:
                    if decoder is None:
                        decoder = zlib.decompressobj(wbits or _deflate_wbits(chunk))
                    # Inflating at most the room left keeps a small bomb from filling memory.
                    chunk = decoder.decompress(chunk, limit + 1 - size)
                size += len(chunk)
                if size > limit:
                    raise _Failed(self._too_large_reason)
                if size > SMALL_BODY and not hold.held:
                    # Its size is unknown until it ends: room for the largest body allowed.
                    await self._admit(hold, limit, deadline)
                chunks.append(chunk)
            # Everything was inflated above; bytes after the end of the stream are ignored.
            if decoder is not None and not decoder.eof:
                raise _Failed(f"response body is not valid {encoding} data: it ends early")
        except zlib.error as exc:
            raise _Failed(f"response body is not valid {encoding} data: {exc}") from None
        hold.shrink(size)
        return b"".join(chunks)

    async def _admit(self, hold: Hold, wanted: int, deadline: asyncio.Timeout) -> None:
        """Take room for a body in the budget. The time spent waiting for it is the worker's,
        not the endpoint's: the call's deadline stands still meanwhile."""
        loop = asyncio.get_running_loop()
        asked, when = loop.time(), deadline.when()
        deadline.reschedule(None)
        try:
            await hold.grow(wanted)
        finally:
            if when is not None:
                deadline.reschedule(when + loop.time() - asked)


def _encode_body(body: JsonValue, macros: Mapping[str, str]) -> bytes | None:
    if body is None:
        return None
    if isinstance(body, str):
        return expand(body, macros).encode()
    try:
        data = orjson.dumps(body)
        # One serialisation tells whether any string holds a macro; most bodies hold none.
        if b"$(" in data:
            data = orjson.dumps(expand_json(body, macros))
    except orjson.JSONEncodeError as exc:
        raise _Failed(f"request body cannot be sent as JSON: {exc}") from None
    return data


def _redirect(call: _Call, status: int, location: str) -> None:
    """Point `call` at the next hop, as browsers and Azure's HTTP client do."""
    try:
        target = call.url.join(URL(location)).with_fragment(None)
    except ValueError:
        raise _Failed(f"redirect (HTTP {status}) to an invalid URL: {location!r}") from None
    if target.scheme not in ("http", "https") or not target.raw_host:
        raise _Failed(f"redirect (HTTP {status}) to a URL that is not http(s): {location!r}")
    if status in (301, 302, 303) and call.method != Method.HEAD:
        call.method = Method.GET.value
        call.body = None
        for body_header in _BODY_HEADERS:
            call.headers.popall(body_header, None)
    if target.origin() != call.url.origin():
        for name in call.secret_headers:
            call.headers.popall(name, None)
    call.url = target


def _deflate_wbits(first: bytes) -> int:
    """zlib-wrapped deflate (what the RFC says) or raw deflate (what some servers send)."""
    cmf = first[0]
    return zlib.MAX_WBITS if cmf & 0x0F == 8 and cmf >> 4 <= 7 else -zlib.MAX_WBITS


def _headers(raw: CIMultiDictProxy[str], secret: frozenset[str]) -> dict[str, str]:
    """The response's headers as judged and kept: one value per name, and no secret value, so
    that no criterion, output, record or event ever holds one."""
    headers: dict[str, str] = {}
    for name, value in raw.items():
        key = name.lower()
        previous = headers.get(key)
        headers[key] = value if previous is None else f"{previous}, {value}"
    return redact_headers(headers, secret)


def _response(status: int, headers: dict[str, str], body: bytes, elapsed_ms: int) -> HttpResponse:
    if len(body) <= SMALL_BODY:
        return HttpResponse.model_construct(
            status_code=status, headers=headers, body=_parse(body), elapsed_ms=elapsed_ms
        )
    try:
        # Written again as the stored response always was: compact, and with no number that
        # PostgreSQL's jsonb cannot hold though JSON allows it (20,000 decimals, 1e-20000).
        # The objects are dropped on return (see UnparsedResponse).
        text = orjson.dumps(orjson.loads(body))
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        # Not JSON, or nested too deep to be written again (see _DEEPEST): its text.
        return HttpResponse.model_construct(
            status_code=status,
            headers=headers,
            body=body.decode(errors="replace"),
            elapsed_ms=elapsed_ms,
        )
    return UnparsedResponse.of(status, headers, text, elapsed_ms)


def _parse(body: bytes) -> JsonValue:
    if not body:
        return ""
    try:
        value: JsonValue = orjson.loads(body)
        if body.count(b"[") + body.count(b"{") > _DEEPEST:
            # Perhaps nested too deep to be written again: tried, as deep as an event holds it.
            orjson.dumps([[[[value]]]])
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        return body.decode(errors="replace")
    return value


def _elapsed_ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)
