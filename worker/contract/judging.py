"""How a response is judged: its status and the task's successCriteria (SPEC §4)."""

from __future__ import annotations

from collections.abc import Mapping

from jmespath.exceptions import JMESPathError
from pydantic import JsonValue

from worker.contract import criteria
from worker.contract.criteria import CriteriaSyntax
from worker.contract.models import HttpResponse, Outcome, Result


def judge(
    response: HttpResponse,
    expression: str | None,
    syntax: CriteriaSyntax = CriteriaSyntax.JMESPATH,
) -> Outcome:
    """SPEC §4: succeeded when the status is 2xx and the criterion, if any, holds."""
    status = response.status_code
    if not 200 <= status < 300:
        return Outcome(Result.FAILED, f"HTTP {status}", response)
    if expression is None:
        return Outcome(Result.SUCCEEDED, f"HTTP {status}", response)
    if criteria.holds(expression, document(response), syntax):
        return Outcome(Result.SUCCEEDED, f"HTTP {status}; successCriteria true", response)
    return Outcome(Result.FAILED, f"HTTP {status}; successCriteria false", response)


def document(response: HttpResponse) -> dict[str, object]:
    """What criteria and outputs are evaluated over (SPEC §4)."""
    return {
        "statusCode": response.status_code,
        "headers": response.headers,
        "body": response.body_value(),
    }


def outputs(expressions: Mapping[str, str], response: HttpResponse | None) -> dict[str, JsonValue]:
    """The task's named outputs over `response`; an expression that fails at run time (a type
    error in a function) gives null, as one that finds nothing does."""
    if not expressions or response is None:
        return {}
    over = document(response)
    values: dict[str, JsonValue] = {}
    for name, expression in expressions.items():
        try:
            values[name] = criteria.compile_expression(expression).search(over)
        except (JMESPathError, TypeError, ValueError):
            values[name] = None
    return values
