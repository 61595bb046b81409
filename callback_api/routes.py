"""Every route of the API in one table: app.py serves it, openapi.py describes it."""

from __future__ import annotations

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from callback_api import (
    azure,
    definition_io,
    definitions,
    events,
    executions,
    openapi,
    ops,
    ops_page,
    task_page,
    tasks,
)
from callback_api.declarations import NoContent, Route, Text, routes_key
from callback_api.server import Deadlines
from callback_api.services import services_key
from worker import probe
from worker.contract.definitions import (
    Definition,
    DefinitionPatch,
    DefinitionSpec,
    ExecutionRequest,
    ExecutionStarted,
)
from worker.contract.models import TaskMessage
from worker.views import (
    Health,
    LinesAccepted,
    QueueView,
    Readiness,
    Submitted,
    TaskDetail,
    TaskLog,
    TaskLogs,
    TaskPage,
    TaskStatus,
    TimelineRecords,
    TimelineVariable,
    WorkerList,
)

AZURE = "/{projectId}/_apis/distributedtask/hubs/{hubName}/plans/{planId}"


# Request bodies that the handlers read by hand, described for the OpenAPI document.


class LogLines(BaseModel):
    """Log lines as JSON, the way Azure's timeline feed sends them."""

    model_config = ConfigDict(extra="allow")

    value: list[str]


class NewLog(BaseModel):
    """What Azure's TaskLogger sends to create a log; only `path` is read."""

    model_config = ConfigDict(extra="allow")

    path: str | None = None


class TimelineRecordUpdate(BaseModel):
    """A timeline record from Azure's TaskClient: only its variables are kept."""

    model_config = ConfigDict(extra="allow")

    variables: dict[str, TimelineVariable] = Field(
        default_factory=dict,
        description="returned as `outputs` in TaskCompleted; secret ones are not kept",
    )


class TimelineRecordsUpdate(BaseModel):
    model_config = ConfigDict(extra="allow")

    value: list[TimelineRecordUpdate]


_LOG_TEXT = (
    LogLines,
    Text("text/plain", "UTF-8 text, one line per line"),
)
_LATE_BODY = f"the body did not arrive whole within {Deadlines().body_seconds:g} s of its headers"
_CALLBACK_ERRORS: dict[int, type[BaseModel] | Text | str] = {
    403: "a valid token for another task or plan",
    404: "no such task in that plan",
    408: _LATE_BODY,
    413: "the body is over the size limit",
}
_LOG_FINAL = "the task already completed: its log is final"
_LOG_ANSWERS: dict[int, type[BaseModel] | Text | str] = {
    200: LinesAccepted,
    400: "not UTF-8, or JSON that is not a list of lines",
    409: _LOG_FINAL,
    **_CALLBACK_ERRORS,
}
_DEFINITION_BODY = {
    408: _LATE_BODY,
    413: f"the body is over {definition_io.MAX_DEFINITIONS_BYTES // 1_048_576} MiB",
}
_NO_DEFINITION = "no such task definition"
_INVALID_DEFINITION = "the definition is not valid: `errors` names each field to fix"
_NAME_TAKEN = "another definition has this name, in some case"
_STALE = "If-Match names another version: the definition changed since it was read"
_BAD_IF_MATCH = 'If-Match is not "VERSION" nor *'
_WRITTEN = {200: ("ETag", "Agentless-Changed")}
_EXECUTE_ANSWERS: dict[int, type[BaseModel] | Text | NoContent | str] = {
    202: ExecutionStarted,
    400: "the execution is not valid: `errors` names each field to fix",
    404: _NO_DEFINITION,
    408: _LATE_BODY,
    409: "the executionId names another execution, or a task that is none",
    413: "the body is over 1 MiB",
}
_EXECUTED = {202: ("Location",)}
_EVENT_ERRORS = {
    **_CALLBACK_ERRORS,
    400: "the body is not JSON, or not a valid event",
    409: "the task already completed differently, timed out, was canceled, or is not a "
    "callback task",
}


ROUTES: tuple[Route, ...] = (
    *(
        Route(
            "OPTIONS",
            path,
            azure.get_resource_locations,
            "Where each Azure resource lives (Azure's resource-location discovery)",
            "none",
            "callbacks",
            query=azure.DiscoveryQuery,
            responses={200: azure.ResourceLocations, 400: "the query is not valid"},
        )
        # Microsoft's clients ask with and without the slash.
        for path in ("/_apis", "/_apis/")
    ),
    Route(
        "POST",
        "/plans/{planId}/events",
        events.post_event,
        "A plan event from the task's external service",
        "callback",
        "callbacks",
        body=(events.PlanEvent,),
        responses={200: TaskStatus, **_EVENT_ERRORS},
    ),
    Route(
        "POST",
        f"{AZURE}/events",
        events.post_event,
        "A plan event, on Azure's path",
        "callback",
        "callbacks",
        body=(events.PlanEvent,),
        responses={200: TaskStatus, **_EVENT_ERRORS},
        location=azure.EVENTS,
    ),
    Route(
        "POST",
        "/plans/{planId}/tasks/{taskId}/logs",
        events.post_task_logs,
        "Log lines from the task's external service",
        "callback",
        "callbacks",
        body=_LOG_TEXT,
        responses=_LOG_ANSWERS,
    ),
    Route(
        "POST",
        f"{AZURE}/timelines/{{timelineId}}/records/{{recordId}}/feed",
        events.post_feed,
        "Log lines, on Azure's timeline feed path",
        "callback",
        "callbacks",
        body=_LOG_TEXT,
        responses=_LOG_ANSWERS,
        location=azure.FEED,
    ),
    Route(
        "POST",
        f"{AZURE}/logs",
        events.post_create_log,
        "Create a log (Azure's TaskLogger)",
        "callback",
        "callbacks",
        body=(NewLog,),
        body_required=False,
        responses={200: TaskLog, 400: "the body is not JSON", 409: _LOG_FINAL, **_CALLBACK_ERRORS},
        location=azure.LOGS,
    ),
    Route(
        "POST",
        f"{AZURE}/logs/{{logId}}",
        events.post_append_log,
        "Append text lines to a log (Azure's TaskLogger)",
        "callback",
        "callbacks",
        body=_LOG_TEXT,
        responses=_LOG_ANSWERS,
        location=azure.LOGS,
    ),
    Route(
        "GET",
        f"{AZURE}/timelines/{{timelineId}}/records",
        events.get_timeline_records,
        "The task's timeline record",
        "callback",
        "callbacks",
        responses={200: TimelineRecords, 403: _CALLBACK_ERRORS[403], 404: _CALLBACK_ERRORS[404]},
        location=azure.RECORDS,
    ),
    Route(
        "PATCH",
        f"{AZURE}/timelines/{{timelineId}}/records",
        events.patch_timeline_records,
        "Progress and output variables",
        "callback",
        "callbacks",
        body=(TimelineRecordsUpdate,),
        responses={
            200: TimelineRecords,
            400: "the body is not JSON, or not a list of records",
            409: "the task already completed: its record and output variables are final",
            **_CALLBACK_ERRORS,
        },
        location=azure.RECORDS,
    ),
    Route(
        "POST",
        "/tasks",
        tasks.submit_task,
        "Validate and queue a task",
        "api",
        "tasks",
        body=(TaskMessage,),
        responses={
            202: Submitted,
            400: "the task is not valid: `errors` names each field to fix",
            408: _LATE_BODY,
            409: "the taskId already belongs to a task with another body",
            413: "the body is over 1 MiB",
        },
    ),
    Route(
        "GET",
        "/tasks",
        tasks.list_tasks,
        "List tasks",
        "api",
        "tasks",
        query=tasks.TaskListQuery,
        responses={
            200: TaskPage,
            206: TaskPage,
            400: "a query parameter or the Range header is not valid",
            416: "the range starts past the last task",
        },
    ),
    Route(
        "GET",
        "/tasks/{taskId}",
        tasks.get_task,
        "A task's state and result (as an HTML page when Accept prefers text/html)",
        "api",
        "tasks",
        query=task_page.TaskQuery,
        responses={
            200: TaskDetail,
            404: "no such task",
            410: "deleted after AGENTLESS_RETENTION; completedAt says when it completed",
        },
    ),
    Route(
        "POST",
        "/tasks/{taskId}/cancel",
        tasks.cancel_task,
        "Cancel a queued, running, waiting or polling task",
        "api",
        "tasks",
        responses={200: TaskStatus, 404: "no such task", 409: "the task already completed"},
    ),
    Route(
        "GET",
        "/tasks/{taskId}/logs",
        tasks.get_task_logs,
        "The log lines the task's service posted",
        "api",
        "tasks",
        responses={
            200: TaskLogs,
            404: "no such task",
            410: "deleted after AGENTLESS_RETENTION; completedAt says when it completed",
        },
    ),
    Route(
        "POST",
        "/definitions",
        definitions.create_definitions,
        "Create a task definition, or an array of them (all or none)",
        "api",
        "definitions",
        body=(definitions.DefinitionSpecs,),
        responses={
            201: definitions.Definitions,
            400: "a definition is not valid: `errors` names each field to fix, after its index "
            "in an array",
            409: _NAME_TAKEN,
            **_DEFINITION_BODY,
        },
        headers={201: ("Location?", "ETag?")},
    ),
    Route(
        "GET",
        "/definitions",
        definitions.list_definitions,
        "List task definitions",
        "api",
        "definitions",
        query=definitions.DefinitionListQuery,
        responses={
            200: definitions.DefinitionPage,
            206: definitions.DefinitionPage,
            400: "a query parameter or the Range header is not valid",
            416: "the range starts past the last definition",
        },
    ),
    Route(
        "PUT",
        "/definitions",
        definitions.replace_definitions,
        "Replace task definitions, each by its id (all or none)",
        "api",
        "definitions",
        body=(definitions.DefinitionReplacements,),
        responses={
            200: definitions.DefinitionList,
            400: "not an array of valid definitions with ids: `errors` names each field to fix",
            404: _NO_DEFINITION,
            409: _NAME_TAKEN,
            412: "an item's version is not the definition's now",
            **_DEFINITION_BODY,
        },
        headers={200: ("Agentless-Changed",)},
    ),
    Route(
        "DELETE",
        "/definitions",
        definitions.delete_definitions,
        "Delete task definitions by id (all or none); their executions stay readable",
        "api",
        "definitions",
        body=(definitions.DefinitionIds,),
        responses={
            204: NoContent("deleted"),
            400: "not an array of definition ids",
            404: "no definition has one of the ids: none was deleted",
            **_DEFINITION_BODY,
        },
    ),
    # Before the routes by id: /definitions/name/… is always the path by name (ids are never
    # "name").
    Route(
        "GET",
        "/definitions/name/{name}",
        definitions.get_definition_by_name,
        "A task definition by its name, in any case",
        "api",
        "definitions",
        query=definition_io.DefinitionQuery,
        responses={200: Definition, 404: _NO_DEFINITION},
        headers={200: ("ETag",)},
    ),
    Route(
        "POST",
        "/definitions/name/{name}/executions",
        executions.execute_definition_by_name,
        "Execute a task definition named so (in any case): queue a task from it",
        "api",
        "definitions",
        body=(ExecutionRequest,),
        body_required=False,
        responses=_EXECUTE_ANSWERS,
        headers=_EXECUTED,
    ),
    Route(
        "GET",
        "/definitions/{id}",
        definitions.get_definition,
        "A task definition",
        "api",
        "definitions",
        query=definition_io.DefinitionQuery,
        responses={200: Definition, 404: _NO_DEFINITION},
        headers={200: ("ETag",)},
    ),
    Route(
        "PUT",
        "/definitions/{id}",
        definitions.replace_definition,
        "Replace a task definition: omitted attributes take their defaults",
        "api",
        "definitions",
        body=(DefinitionSpec,),
        responses={
            200: Definition,
            400: f"{_INVALID_DEFINITION}; or {_BAD_IF_MATCH}",
            404: _NO_DEFINITION,
            409: _NAME_TAKEN,
            412: _STALE,
            **_DEFINITION_BODY,
        },
        headers=_WRITTEN,
    ),
    Route(
        "PATCH",
        "/definitions/{id}",
        definitions.patch_definition,
        "Change the attributes given of a task definition; absent or null ones stay",
        "api",
        "definitions",
        body=(DefinitionPatch,),
        responses={
            200: Definition,
            400: f"{_INVALID_DEFINITION}; or {_BAD_IF_MATCH}",
            404: _NO_DEFINITION,
            409: _NAME_TAKEN,
            412: _STALE,
            **_DEFINITION_BODY,
        },
        headers=_WRITTEN,
    ),
    Route(
        "DELETE",
        "/definitions/{id}",
        definitions.delete_definition,
        "Delete a task definition; its executions stay readable",
        "api",
        "definitions",
        responses={
            204: NoContent("deleted"),
            400: _BAD_IF_MATCH,
            404: _NO_DEFINITION,
            412: _STALE,
        },
    ),
    Route(
        "POST",
        "/definitions/{id}/executions",
        executions.execute_definition,
        "Execute a task definition: queue a task from its current version",
        "api",
        "definitions",
        body=(ExecutionRequest,),
        body_required=False,
        responses=_EXECUTE_ANSWERS,
        headers=_EXECUTED,
    ),
    Route(
        "GET",
        "/definitions/{id}/executions",
        executions.list_executions,
        "A task definition's executions",
        "api",
        "definitions",
        query=executions.ExecutionListQuery,
        responses={
            200: executions.ExecutionPage,
            206: executions.ExecutionPage,
            400: "a query parameter or the Range header is not valid",
            404: "no such task definition, and no executions of one",
            416: "the range starts past the last execution",
        },
    ),
    Route(
        "GET",
        "/definitions/{id}/executions/{index}",
        executions.get_execution,
        "One execution of a task definition",
        "api",
        "definitions",
        query=definition_io.DefinitionQuery,
        responses={
            200: executions.ExecutionView,
            400: "the index is not a whole number from 1",
            404: "the definition has no execution of that index",
        },
    ),
    Route(
        "GET",
        "/",
        ops_page.get_page,
        "The operations page",
        "api",
        "operations",
        responses={200: Text("text/html", "the operations page")},
    ),
    Route(
        "GET",
        "/queue",
        ops.get_queue,
        "The queue and the task states",
        "api",
        "operations",
        responses={200: QueueView},
    ),
    Route(
        "GET",
        "/workers",
        ops.get_workers,
        "Live worker processes",
        "api",
        "operations",
        responses={200: WorkerList},
    ),
    Route(
        "GET",
        "/metrics",
        ops.get_metrics,
        "Prometheus metrics",
        "api",
        "operations",
        responses={200: Text("text/plain", "Prometheus text format")},
    ),
    Route(
        "GET",
        "/healthz",
        probe.healthz,
        "Liveness",
        "none",
        "operations",
        responses={200: Health},
    ),
    Route(
        "GET",
        "/readyz",
        ops.readyz,
        "Readiness: broker and database reachable",
        "none",
        "operations",
        responses={200: Readiness, 503: Readiness},
    ),
    Route(
        "GET",
        "/openapi.json",
        openapi.get_document,
        "This API's OpenAPI 3.1 document",
        "none",
        "operations",
        responses={200: openapi.Document},
    ),
)


def add_routes(app: web.Application) -> None:
    app[routes_key] = {}
    for number, route in enumerate(ROUTES):
        # Unique, so that middlewares find the route's declaration by the name.
        name = f"{route.tag}:{route.handler.__name__}_{number}"
        app.router.add_route(route.method, route.path, route.handler, name=name)
        app[routes_key][name] = route
    app.on_startup.append(_describe)


async def _describe(app: web.Application) -> None:
    # Once per app, with the settings it serves (they come with the services, at startup).
    settings = app[services_key].settings
    app[openapi.document_key] = orjson.dumps(openapi.document(settings, ROUTES))
