"""Azure's macros: their values for a task, and their expansion."""

from __future__ import annotations

import pytest

from tests.invoke.calls import task_message
from worker.contract.macros import build_macros, expand
from worker.contract.models import TaskMessage

# --- pure functions ------------------------------------------------------------------------------

MACROS = {"system.planid": "p-7", "variables.color": "blue", "variables.empty": ""}


@pytest.mark.parametrize(
    ("text", "expanded"),
    [
        ("no macros here", "no macros here"),
        ("$(system.PlanId)", "p-7"),
        ("plan $(SYSTEM.PLANID) is $(variables.Color)!", "plan p-7 is blue!"),
        ("$(variables.color)$(variables.color)", "blueblue"),
        ("[$(variables.empty)]", "[]"),
        ("$(variables.missing) stays", "$(variables.missing) stays"),
        ("$(not closed", "$(not closed"),
        ("$() $( spaced ) $((nested))", "$() $( spaced ) $((nested))"),
        ("$$(system.planid)", "$p-7"),
    ],
)
def test_expand(text: str, expanded: str) -> None:
    assert expand(text, MACROS) == expanded


def test_expand_returns_the_same_string_when_there_is_nothing_to_do() -> None:
    text = "x" * 100
    assert expand(text, MACROS) is text


@pytest.mark.parametrize(
    ("task", "token", "macros"),
    [
        (
            task_message(),
            None,
            {
                "system.planid": "p-7",
                "system.jobid": "p-7",
                "system.taskinstanceid": "t-42",
                "system.timelineid": "p-7",
                "system.hosttype": "build",
                "system.teamprojectid": "default",
                "system.collectionuri": "http://api.test/",
            },
        ),
        (
            task_message(
                job_id="j-1",
                hub_name="release",
                project_id="proj",
                timeline_id="tl-3",
                variables={
                    "Name": "v",
                    "Count": 3,
                    "Flag": True,
                    "Obj": {"a": [1, None]},
                    "N": None,
                },
            ),
            "secret-token",
            {
                "system.planid": "p-7",
                "system.jobid": "j-1",
                "system.taskinstanceid": "t-42",
                "system.timelineid": "tl-3",
                "system.hosttype": "release",
                "system.teamprojectid": "proj",
                "system.collectionuri": "http://api.test/",
                "system.accesstoken": "secret-token",
                "variables.name": "v",
                "variables.count": "3",
                "variables.flag": "true",
                "variables.obj": '{"a":[1,null]}',
                "variables.n": "null",
            },
        ),
        (
            task_message(job_id="j-1"),
            "",
            {
                "system.planid": "p-7",
                "system.jobid": "j-1",
                "system.taskinstanceid": "t-42",
                "system.timelineid": "j-1",
                "system.hosttype": "build",
                "system.teamprojectid": "default",
                "system.collectionuri": "http://api.test/",
                "system.accesstoken": "",
            },
        ),
    ],
)
def test_build_macros(task: TaskMessage, token: str | None, macros: dict[str, str]) -> None:
    assert build_macros(task, "http://api.test/", token) == macros
