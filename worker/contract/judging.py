"""How a response is judged: its status and the task's successCriteria (SPEC §4)."""

from __future__ import annotations

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
    document = {
        "statusCode": status,
        "headers": response.headers,
        "body": response.body,
    }
    if criteria.holds(expression, document, syntax):
        return Outcome(Result.SUCCEEDED, f"HTTP {status}; successCriteria true", response)
    return Outcome(Result.FAILED, f"HTTP {status}; successCriteria false", response)
