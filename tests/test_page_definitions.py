"""The operations page's definitions: each with its latest executions, rendered, and on a live
API in headless Chromium."""

from __future__ import annotations

import re
from datetime import timedelta

import asyncpg
from aio_pika.abc import AbstractChannel

from callback_api.ops_page import DefinitionActivity, Definitions, render
from tests.conftest import Api, Events, Target, publish
from tests.test_page import NOW, board, chromium
from worker.contract.definitions import Definition, ExecutionRecord
from worker.contract.definitions import DefinitionSpec as Spec
from worker.contract.models import Result, State


def stored(name: str, version: int = 1) -> Definition:
    return Definition(
        id=f"id-{name}",
        name=name,
        version=version,
        created_at=NOW - timedelta(days=2),
        updated_at=NOW - timedelta(hours=3),
        request={"url": "https://ci.example.com/tags"},  # type: ignore[arg-type]
    )


def execution(index: int, **fields: object) -> ExecutionRecord:
    base: dict[str, object] = {
        "execution_id": f"run-{index}",
        "execution_index": index,
        "definition_id": "id-tag-build",
        "definition_name": "tag-build",
        "version": 1,
        "input": {},
        "tags": [],
        "comments": "",
        "source": "",
        "created_at": NOW - timedelta(minutes=index),
    }
    base.update(fields)
    return ExecutionRecord.model_validate(base)


def executions_shown(page: str, name: str) -> list[tuple[str, str]]:
    """The executions in `name`'s row: index and how each stands, as the page lists them."""
    row = re.search(rf'<td class="id" data-definition="{name}">.*?</tr>', page, re.DOTALL)
    assert row is not None, f"no row of {name!r}"
    return re.findall(r'data-execution="(\d+)" data-standing="(\w+)"', row.group(0))


def test_each_definition_shows_its_latest_executions() -> None:
    page = render(
        board(),
        Definitions(
            [
                DefinitionActivity(
                    stored("tag-build", version=4),
                    [
                        execution(3, state=State.RUNNING),
                        execution(2, state=State.COMPLETED, result=Result.FAILED),
                        # Its task purged past the retention: the execution stays.
                        execution(1),
                    ],
                ),
                DefinitionActivity(stored("never-run"), []),
            ],
            total=25,
        ),
    )
    assert "<h2>Definitions <small>(25)</small></h2>" in page
    assert executions_shown(page, "tag-build") == [
        ("3", "running"),
        ("2", "failed"),
        ("1", "purged"),
    ]
    assert '<a href="/definitions/id-tag-build">tag-build</a>' in page
    assert '<a href="/tasks/run-2">#2</a> <span class="state failed">failed</span>' in page
    assert ">3m00s ago</time>" in page
    assert re.search(r'data-definition="never-run">.*?<td>—</td>\s*</tr>', page, re.DOTALL)
    # A deployment without definitions is not shown an empty section.
    assert "Definitions" not in render(board())


async def test_the_page_lists_definitions_and_their_executions_live(
    api: Api,
    channel: AbstractChannel,
    events: Events,
    target: Target,
    db: asyncpg.Connection,
) -> None:
    store = api.worker.store
    spec = Spec.model_validate(
        {"name": "tag-build", "request": {"url": f"{target.url}/hook?status=$(variables.status)"}}
    )
    await store.definitions.create([spec, spec.model_copy(update={"name": "idle"})])
    # Two executions, by task messages that name the definition (SPEC §4).
    for task_id, status in (("page-1", 200), ("page-2", 500)):
        message: dict[str, object] = {
            "definition": "tag-build",
            "taskId": task_id,
            "input": {"status": status},
        }
        await publish(channel, api.settings, message)
        await events.completed(task_id)

    dom = (await chromium("--dump-dom", f"{api.url}/")).decode()
    assert "<h2>Definitions <small>(2)</small></h2>" in dom
    assert executions_shown(dom, "tag-build") == [("2", "failed"), ("1", "succeeded")]
    assert executions_shown(dom, "idle") == []
    assert '<a href="/tasks/page-2">#2</a>' in dom
    assert "<script" not in dom
