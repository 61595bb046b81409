"""What a task's request is told of its plan: Azure's macros and a callback task's headers."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

import orjson
from pydantic import JsonValue

from worker.contract.models import TaskMessage
from worker.contract.response_macros import map_strings

_MACRO: Final = re.compile(r"\$\(([^()\s]+)\)")


def build_macros(task: TaskMessage, public_url: str, access_token: str | None) -> dict[str, str]:
    """Azure's macro values for `task`, keyed by lower-case name."""
    macros = {
        "system.planid": task.plan_id,
        "system.jobid": task.job,
        "system.taskinstanceid": task.task_id,
        "system.timelineid": task.timeline,
        "system.hosttype": task.hub_name,
        "system.teamprojectid": task.project,
        "system.collectionuri": public_url,
    }
    if access_token is not None:
        macros["system.accesstoken"] = access_token
    for name, value in task.variables.items():
        text = value if isinstance(value, str) else orjson.dumps(value).decode()
        macros[f"variables.{name.lower()}"] = text
    return macros


def expand(text: str, macros: Mapping[str, str]) -> str:
    """`text` with each known `$(name)` replaced, any case; unknown ones stay, as in Azure."""
    if "$(" not in text:
        return text

    def value(match: re.Match[str]) -> str:
        return macros.get(match[1].lower(), match[0])

    return _MACRO.sub(value, text)


def expand_json(value: JsonValue, macros: Mapping[str, str]) -> JsonValue:
    return map_strings(value, lambda text: expand(text, macros))


def callback_headers(task: TaskMessage, plan_url: str, token: str) -> dict[str, str]:
    """What Azure's server tasks send, so that services written for them find their way back."""
    return {
        "PlanUrl": plan_url,
        "ProjectId": task.project,
        "HubName": task.hub_name,
        "PlanId": task.plan_id,
        "JobId": task.job,
        "TimelineId": task.timeline,
        "TaskInstanceId": task.task_id,
        "AuthToken": token,
    }
