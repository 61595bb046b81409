"""Success criteria: JMESPath over the response, or Azure's condition expressions over its body;
compiled once, evaluated per response (SPEC §4)."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from functools import lru_cache

import jmespath
from jmespath.exceptions import JMESPathError
from jmespath.parser import ParsedResult

from worker.contract.conditions import ConditionError, compile_condition


class CriteriaSyntax(StrEnum):
    """How successCriteria are written: JMESPath over the response, or Azure's conditions."""

    JMESPATH = "jmespath"
    AZURE = "azure"


@lru_cache(maxsize=4096)
def compile_expression(expression: str) -> ParsedResult:
    """The parsed expression; raises ValueError with the parser's own words if it is invalid."""
    try:
        return jmespath.compile(expression)
    except JMESPathError as exc:
        # The parser's str() spans lines with a caret drawing; one line reads better in a header.
        detail = getattr(exc, "message", None) or str(exc).splitlines()[0].rstrip(":")
        where = getattr(exc, "lex_position", None)
        token = getattr(exc, "token_value", None)
        near = f" near {token!r}" if token else ""
        at = f" at position {where}" if where is not None else ""
        raise ValueError(f"not a valid JMESPath expression: {detail}{near}{at}") from exc


def compile_criterion(expression: str, syntax: CriteriaSyntax) -> None:
    """Raises ValueError, saying what is wrong and where, unless `expression` is valid in
    `syntax`."""
    if syntax is CriteriaSyntax.AZURE:
        try:
            compile_condition(expression)
        except ConditionError as exc:
            raise ValueError(f"not a valid Azure condition: {exc}") from exc
    else:
        compile_expression(expression)


def is_truthy(value: object) -> bool:
    """JMESPath's truth: false, null and empty strings, arrays and objects are false; 0 is true."""
    if value is None or value is False:
        return False
    if isinstance(value, str | list | dict):
        return len(value) > 0
    return True


def holds(expression: str, document: Mapping[str, object], syntax: CriteriaSyntax) -> bool:
    """Whether `expression` holds over `{statusCode, headers, body}`: as JMESPath, truthy over the
    document; as an Azure condition, true with `root` the body."""
    try:
        if syntax is CriteriaSyntax.AZURE:
            return compile_condition(expression).holds(document["body"])
        return is_truthy(compile_expression(expression).search(document))
    except (JMESPathError, TypeError, ValueError):
        # A runtime type error (e.g. comparing a string with <) means the criterion does not hold.
        return False
