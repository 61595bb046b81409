"""What PostgreSQL can hold: text and JSON made storable, responses as stored."""

from __future__ import annotations

import orjson
from pydantic import JsonValue

from worker.contract.models import HttpResponse


def response_json(response: HttpResponse | None) -> str | None:
    return None if response is None else storable_json(response.json_text())


# PostgreSQL's text and jsonb cannot hold U+0000, which endpoints and services may well send:
# it is kept as U+FFFD, the replacement character.
def storable_text(text: str) -> str:
    return text.replace("\x00", "\ufffd")


def storable_json(text: str) -> str:
    return text.replace("\\u0000", "\\ufffd")


def outputs_json(outputs: dict[str, JsonValue] | None) -> str:
    return "{}" if not outputs else storable_json(orjson.dumps(outputs).decode())
