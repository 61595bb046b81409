"""Microsoft's own Python client (`azure-devops`), used unchanged, against a live `agentless run`.

The client builds no URL by hand: it discovers each resource location with
`OPTIONS {PlanUrl}/_apis`, negotiates the api-version against it, and turns error answers into
exceptions from their `message` and `typeKey`. It is synchronous, so it runs in a thread beside
the API's event loop.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from pathlib import Path
from typing import Any, Final

import aiohttp
import asyncpg
import orjson
import pytest
from aio_pika.abc import AbstractChannel
from azure.devops import client as azure_client
from azure.devops._file_cache import FileCache
from azure.devops._models import VssJsonCollectionWrapper
from azure.devops.client import Client
from azure.devops.exceptions import AzureDevOpsServiceError
from azure.devops.v7_1.task.models import (
    TaskLog,
    TimelineRecord,
    TimelineRecordFeedLinesWrapper,
    VariableValue,
)
from azure.devops.v7_1.task.task_client import TaskClient
from msrest.authentication import BasicAuthentication

from callback_api import azure
from tests.azure_standin import FEED_LINES, LOG_LINES, lines_of, task_logs
from tests.callbacks import waiting
from tests.conftest import Api, Events, Target

# What the client asks for; the .NET client's RaisePlanEventAsync and AppendTimelineRecordFeedAsync
# use the events and feed locations the same way, by id.
CLIENT_VERSION: Final = "7.1-preview.1"


@pytest.fixture(autouse=True)
def _fresh_discovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The client keeps discovered locations on disk and in the class: start each test with
    # neither, so that every test discovers them from agentless.
    monkeypatch.setattr(azure_client, "OPTIONS_FILE_CACHE", FileCache(str(tmp_path / "o.json")))
    monkeypatch.setattr(Client, "_locations_cache", {})


class AzureService:
    """A service's side of one task: Microsoft's TaskClient built from the invocation's headers."""

    def __init__(self, headers: dict[str, str], token: str | None = None) -> None:
        self.headers = headers
        self.client = TaskClient(
            base_url=headers["PlanUrl"],
            creds=BasicAuthentication("", token or headers["AuthToken"]),
        )
        # scope_identifier, hub_name and plan_id, which every call of the client takes first.
        self.plan = (headers["ProjectId"], headers["HubName"], headers["PlanId"])

    def route_values(self, **more: str) -> dict[str, str]:
        # A new dict each call: the client adds the location's area and resource to it.
        scope, hub, plan = self.plan
        return {"scopeIdentifier": scope, "hubName": hub, "planId": plan, **more}

    def log(self, lines: list[str]) -> int:
        created = self.client.create_log(TaskLog(path=f"logs\\{uuid.uuid4()}"), *self.plan)
        text = "".join(f"{line}\n" for line in lines).encode()
        self.client.append_log_content(io.BytesIO(text), *self.plan, created.id)
        log_id: int = created.id
        return log_id

    def feed(self, lines: list[str]) -> None:
        # The Python client names no method for the feed: its generic send, by location id.
        wrapper = TimelineRecordFeedLinesWrapper(count=len(lines), value=lines)
        self.client._send(
            http_method="POST",
            location_id=azure.FEED.id,
            version=CLIENT_VERSION,
            route_values=self.route_values(
                timelineId=self.headers["TimelineId"],
                # Azure's helper library names the job's record, whichever task writes.
                recordId=self.headers["JobId"],
            ),
            content=self.client._serialize.body(wrapper, "TimelineRecordFeedLinesWrapper"),
        )

    def set_variables(self, variables: dict[str, VariableValue]) -> list[TimelineRecord]:
        record = TimelineRecord(id=self.headers["TaskInstanceId"], variables=variables)
        records: list[TimelineRecord] = self.client.update_records(
            # The wrapper the client sends, as Azure's own services build it.
            VssJsonCollectionWrapper(
                count=1, value=[self.client._serialize.body(record, "TimelineRecord")]
            ),
            *self.plan,
            self.headers["TimelineId"],
        )
        return records

    def records(self) -> list[TimelineRecord]:
        records: list[TimelineRecord] = self.client.get_records(
            *self.plan, self.headers["TimelineId"]
        )
        return records

    def raise_event(self, name: str, result: str | None = None, task_id: str | None = None) -> None:
        # As the .NET client's RaisePlanEventAsync: the plan-events location, by id.
        event = {
            "name": name,
            "taskId": task_id or self.headers["TaskInstanceId"],
            "jobId": self.headers["JobId"],
        }
        if result is not None:
            event["result"] = result
        self.client._send(
            http_method="POST",
            location_id=azure.EVENTS.id,
            version=CLIENT_VERSION,
            route_values=self.route_values(),
            content=event,
        )


async def in_thread(call: Any, *args: Any) -> Any:
    return await asyncio.to_thread(call, *args)


@pytest.mark.parametrize("result", ["succeeded", "failed"])
async def test_a_service_on_microsofts_client_runs_a_callback_task_end_to_end(
    api: Api,
    channel: AbstractChannel,
    events: Events,
    target: Target,
    db: asyncpg.Connection,
    result: str,
) -> None:
    task, headers = await waiting(api, channel, events, target, projectId="proj-7", hubName="rm")
    service = AzureService(headers)

    await in_thread(service.raise_event, "TaskStarted")
    await in_thread(service.log, LOG_LINES)
    await in_thread(service.feed, FEED_LINES)
    written = await in_thread(
        service.set_variables,
        {
            "buildNumber": VariableValue(value="42", is_secret=False),
            "password": VariableValue(value="hunter2", is_secret=True),
        },
    )
    read = await in_thread(service.records)
    for records in (written, read):
        assert [(r.id, r.state, r.result) for r in records] == [
            (task["taskId"], "inProgress", None)
        ]
        assert {n: (v.value, v.is_secret) for n, v in records[0].variables.items()} == {
            "buildNumber": ("42", False)
        }
    await in_thread(service.raise_event, "TaskCompleted", result)

    event = await events.completed(task["taskId"])
    assert {k: event[k] for k in ("result", "reason", "outputs", "hubName")} == {
        "result": result,
        "reason": f"TaskCompleted from the external service: {result}",
        "outputs": {"buildNumber": "42"},
        "hubName": "rm",
    }
    assert lines_of(await task_logs(api, task["taskId"]))["lines"] == LOG_LINES + FEED_LINES
    finished = await in_thread(service.records)
    assert [(r.state, r.result) for r in finished] == [("completed", result)]
    kept = await db.fetchval("SELECT t::text FROM tasks t WHERE task_id = $1", task["taskId"])
    assert "hunter2" not in kept


async def test_discovery_answers_every_location_with_and_without_a_slash(api: Api) -> None:
    answers = []
    async with aiohttp.ClientSession() as session:
        for path in ("/_apis", "/_apis/", "/_apis?allHostTypes=true", "/_apis/?allHostTypes=true"):
            # No token, and the same for every plan: a location names no plan.
            async with session.options(f"{api.url}{path}") as response:
                assert (response.status, response.content_type) == (200, "application/json")
                answers.append(await response.json())
        async with session.options(f"{api.url}/_apis?allHostTypes=maybe") as response:
            assert response.status == 400
            assert "allHostTypes" in (await response.json())["detail"]
    assert all(answer == answers[0] for answer in answers)
    assert answers[0] == {
        "count": 4,
        "value": [
            {
                "id": location_id,
                "area": "distributedtask",
                "resourceName": resource,
                "routeTemplate": template,
                "resourceVersion": 1,
                "minVersion": "1.0",
                "maxVersion": "7.2",
                "releasedVersion": "7.1",
            }
            for location_id, resource, template in [
                (
                    "557624af-b29e-4c20-8ab0-0399d2204f3f",
                    "events",
                    "{scopeIdentifier}/_apis/{area}/hubs/{hubName}/plans/{planId}/{resource}",
                ),
                (
                    "858983e4-19bd-4c5e-864c-507b59b58b12",
                    "feed",
                    "{scopeIdentifier}/_apis/{area}/hubs/{hubName}/plans/{planId}/timelines/"
                    "{timelineId}/records/{recordId}/{resource}",
                ),
                (
                    "46f5667d-263a-4684-91b1-dff7fdcf64e2",
                    "logs",
                    "{scopeIdentifier}/_apis/{area}/hubs/{hubName}/plans/{planId}/{resource}/"
                    "{logId}",
                ),
                (
                    "8893bc5b-35b2-4be7-83cb-99e683551db4",
                    "records",
                    "{scopeIdentifier}/_apis/{area}/hubs/{hubName}/plans/{planId}/timelines/"
                    "{timelineId}/{resource}",
                ),
            ]
        ],
    }


@pytest.mark.parametrize(
    ("location", "method", "route_values", "served"),
    [
        (azure.EVENTS, "POST", {}, "/p/_apis/distributedtask/hubs/h/plans/x/events"),
        (
            azure.FEED,
            "POST",
            {"timelineId": "t", "recordId": "j"},
            "/p/_apis/distributedtask/hubs/h/plans/x/timelines/t/records/j/feed",
        ),
        (azure.LOGS, "POST", {}, "/p/_apis/distributedtask/hubs/h/plans/x/logs"),
        (azure.LOGS, "POST", {"logId": 3}, "/p/_apis/distributedtask/hubs/h/plans/x/logs/3"),
        (
            azure.RECORDS,
            "GET",
            {"timelineId": "t"},
            "/p/_apis/distributedtask/hubs/h/plans/x/timelines/t/records",
        ),
        (
            azure.RECORDS,
            "PATCH",
            {"timelineId": "t"},
            "/p/_apis/distributedtask/hubs/h/plans/x/timelines/t/records",
        ),
    ],
)
async def test_each_route_template_builds_a_url_agentless_serves(
    api: Api,
    location: azure.ResourceLocation,
    method: str,
    route_values: dict[str, object],
    served: str,
) -> None:
    # The client builds the URL from what it discovered, as it does before every call.
    client = TaskClient(base_url=api.url, creds=BasicAuthentication("", "unused"))
    request = await in_thread(
        client._create_request_message,
        method,
        location.id,
        {"scopeIdentifier": "p", "hubName": "h", "planId": "x", **route_values},
    )
    assert request.url == f"{api.url}{served}"
    # No token: the route is served, and refuses the call for want of one.
    async with aiohttp.ClientSession() as session, session.request(method, request.url) as answer:
        assert answer.status == 401


async def test_a_client_newer_than_the_server_negotiates_down(
    api: Api, channel: AbstractChannel, events: Events, target: Target
) -> None:
    task, headers = await waiting(api, channel, events, target)
    service = AzureService(headers)
    # A client of a future version asks for 9.0 and is offered the newest the location serves.
    event = {"name": "TaskCompleted", "taskId": task["taskId"], "result": "succeeded"}
    response = await in_thread(
        lambda: service.client._send(
            http_method="POST",
            location_id=azure.EVENTS.id,
            version="9.0",
            route_values=service.route_values(),
            content=event,
        )
    )
    assert response.status_code == 200
    assert response.request.headers["Accept"] == "application/json;api-version=7.2-preview"
    assert (await events.completed(task["taskId"]))["result"] == "succeeded"


@pytest.mark.parametrize(
    ("query", "accept", "status", "type_key"),
    [
        ("", "application/json", 200, None),
        ("?api-version=7.1-preview.1", "application/json", 200, None),
        ("?api-version=7.1", "application/json", 200, None),
        ("?api-version=2.0-preview.1", "application/json", 200, None),
        ("", "application/json;api-version=7.2-preview.1", 200, None),
        ("", "application/json; api-version=5.0", 200, None),
        ("?api-version=7.2", "application/json", 400, "VssInvalidPreviewVersionException"),
        ("?api-version=9.0", "application/json", 400, "VssVersionOutOfRangeException"),
        ("", "application/json;api-version=0.9", 400, "VssVersionOutOfRangeException"),
        ("?api-version=latest", "application/json", 400, "VssVersionNotParsableException"),
    ],
)
async def test_api_versions_in_the_query_or_in_accept(
    api: Api,
    channel: AbstractChannel,
    events: Events,
    target: Target,
    query: str,
    accept: str,
    status: int,
    type_key: str | None,
) -> None:
    _, headers = await waiting(api, channel, events, target)
    url = (
        f"{headers['PlanUrl']}/{headers['ProjectId']}/_apis/distributedtask/hubs/"
        f"{headers['HubName']}/plans/{headers['PlanId']}/timelines/{headers['TimelineId']}"
        f"/records{query}"
    )
    sent = {
        "Authorization": f"Bearer {headers['AuthToken']}",
        "Accept": accept,
        "X-TFS-FedAuthRedirect": "Suppress",
        "X-VSS-ForceMsaPassThrough": "true",
        "X-TFS-Session": str(uuid.uuid4()),
    }
    async with aiohttp.ClientSession() as session, session.get(url, headers=sent) as response:
        assert response.status == status, await response.text()
        if type_key is not None:
            problem = orjson.loads(await response.read())
            assert response.content_type == "application/problem+json"
            assert (problem["typeKey"], problem["message"]) == (type_key, problem["detail"])
            assert "api-version" in problem["detail"]


async def test_errors_reach_the_client_as_exceptions_that_say_what_the_api_said(
    api: Api, channel: AbstractChannel, events: Events, target: Target
) -> None:
    task, headers = await waiting(api, channel, events, target)
    other, other_headers = await waiting(api, channel, events, target)

    forged = AzureService(headers, token=headers["AuthToken"][:-4] + "AAAA")
    with pytest.raises(AzureDevOpsServiceError) as refused:
        await in_thread(forged.records)
    assert refused.value.type_key == "VssUnauthorizedException"
    assert "use the AuthToken sent with this task" in refused.value.message

    # A genuine token of another task of the same plan: refused on every route.
    foreign = AzureService(headers, token=other_headers["AuthToken"])
    with pytest.raises(AzureDevOpsServiceError) as refused:
        await in_thread(foreign.raise_event, "TaskCompleted", "succeeded")
    assert (refused.value.type_key, refused.value.message) == (
        "AccessCheckException",
        f"this token is for task {other['taskId']!r}, not {task['taskId']!r}",
    )
    elsewhere = AzureService({**headers, "PlanId": "another-plan"}, token=headers["AuthToken"])
    for call in (elsewhere.records, lambda: elsewhere.log(["x"])):
        with pytest.raises(AzureDevOpsServiceError, match="not plan 'another-plan'") as refused:
            await in_thread(call)
        assert refused.value.type_key == "AccessCheckException"

    service = AzureService(headers)
    await in_thread(service.raise_event, "TaskCompleted", "succeeded")
    with pytest.raises(AzureDevOpsServiceError) as refused:
        await in_thread(service.raise_event, "TaskCompleted", "failed")
    assert (refused.value.type_key, refused.value.message) == (
        "InvalidOperationException",
        f"task {task['taskId']!r} already completed with result succeeded, not failed",
    )
