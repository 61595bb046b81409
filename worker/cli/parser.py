"""The `agentless` command's arguments: each subcommand and its flags (main.py maps each
subcommand to its handler)."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable
from pathlib import Path

from worker import __version__
from worker.cli.events import IDLE_SECONDS
from worker.cli.exits import EXIT_CODES
from worker.contract.models import Result, State
from worker.store.queries import ORDER_COLUMNS

# Most rows `tasks` and `dead list` print at once: past this, a table is no longer read.
MAX_LISTED = 1000


# What the long-running commands exit with.
SERVE_EXITS = """exit codes:
  0  stopped by SIGTERM or SIGINT
  1  the consume loop died
  2  a setting to fix, or a port already in use (the message names the setting)
  4  RabbitMQ or PostgreSQL did not answer at start-up: try again later"""
# What the commands that read or change one task exit with.
TASK_EXITS = """exit codes:
  0  done
  1  no such task{also}
  2  the id is not an id
  4  the database{broker} is unavailable: try again later"""


class _HelpFormatter(argparse.HelpFormatter):
    """Paragraphs wrapped to the terminal as usual, but each line of a text kept apart, so that
    the exit codes stay a table."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(_fill(line, width, indent) for line in text.splitlines())


def _fill(line: str, width: int, indent: str) -> str:
    """One line wrapped; an indented one (a row of a table) hangs under its text."""
    margin = line[: len(line) - len(line.lstrip())]
    hang = margin + "   " if margin else ""
    return textwrap.fill(
        line.strip(), width, initial_indent=indent + margin, subsequent_indent=indent + hang
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentless",
        description="Agentless task worker: HTTP tasks from RabbitMQ, judged by JMESPath, "
        "state in PostgreSQL. Configured by AGENTLESS_* environment variables.",
        epilog=EXIT_CODES,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"agentless {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=".env-style file of AGENTLESS_* settings; the environment wins over it",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="default: AGENTLESS_LOG_LEVEL, else info",
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    worker = commands.add_parser(
        "worker",
        epilog=SERVE_EXITS,
        formatter_class=_HelpFormatter,
        help="consume and run tasks until SIGTERM",
        description="Consume the task "
        "queue and run tasks until SIGTERM or SIGINT; then finish in-flight tasks and exit 0.",
    )
    worker.set_defaults(command="worker")

    run = commands.add_parser(
        "run",
        epilog=SERVE_EXITS,
        formatter_class=_HelpFormatter,
        help="a worker and the HTTP API in one process",
        description="Run a worker and the HTTP API (AGENTLESS_API_HOST:AGENTLESS_API_PORT) in "
        "one process: for a laptop and the quick start.",
    )
    run.set_defaults(command="run")

    api = commands.add_parser(
        "api",
        epilog=SERVE_EXITS,
        formatter_class=_HelpFormatter,
        help="the HTTP API alone",
        description="Serve the callback API and the task API on "
        "AGENTLESS_API_HOST:AGENTLESS_API_PORT; any number may run against one broker and "
        "database.",
    )
    api.set_defaults(command="api")

    submit = commands.add_parser(
        "submit",
        epilog=SUBMIT_EXITS,
        formatter_class=_HelpFormatter,
        help="queue a task; with --wait, print its result",
        description="Queue a task from a JSON file (SPEC §4) and/or flags; flags win over the "
        "file. With --wait, print the TaskCompleted event and exit 0 only if it succeeded; "
        "while it waits, a line on stderr shows how the task is doing, if stderr is a terminal.",
    )
    submit.add_argument("file", nargs="?", type=Path, help="task message JSON file, or - for stdin")
    submit.add_argument("--url", help="absolute http(s) URL to call")
    submit.add_argument("-X", "--method", help="HTTP method (default POST)")
    submit.add_argument(
        "-H", "--header", action="append", default=[], metavar="'NAME: VALUE'", help="repeatable"
    )
    body = submit.add_mutually_exclusive_group()
    body.add_argument("-d", "--body", help="request body, sent as text")
    body.add_argument("--json", dest="json_body", metavar="JSON", help="request body, as JSON")
    submit.add_argument("--connection", help="service connection name instead of --url")
    submit.add_argument("--url-suffix", help="appended to the connection's URL")
    submit.add_argument(
        "--criteria",
        help="success criterion: JMESPath, or an Azure condition with --criteria-syntax",
    )
    submit.add_argument(
        "--criteria-syntax",
        choices=["jmespath", "azure"],
        help="how --criteria is written (default jmespath); azure: e.g. "
        "\"eq(root['status'], 'ok')\" over the response body",
    )
    mode = submit.add_mutually_exclusive_group()
    mode.add_argument(
        "--callback",
        action="store_true",
        help="wait for the external service's TaskCompleted (waitForCompletion: callback)",
    )
    mode.add_argument(
        "--poll",
        action="store_true",
        help="poll the job the request starts until --criteria holds (waitForCompletion: poll)",
    )
    submit.add_argument(
        "--poll-url",
        metavar="URL",
        help="URL each poll GETs (default: the start answer's Location, else --url); may use "
        "$(response.body.PATH), $(response.headers.NAME), $(response.statusCode)",
    )
    submit.add_argument(
        "--interval", type=float, metavar="SECONDS", help="seconds between polls (default 10)"
    )
    submit.add_argument("--max-polls", type=int, metavar="N", help="fail after N polls")
    submit.add_argument(
        "--failure-criteria", metavar="EXPR", help="the task fails on a poll where this holds"
    )
    submit.add_argument(
        "--ignore-failures",
        action="store_true",
        help="a poll that cannot connect, times out, or answers 429 or 5xx only counts as a poll",
    )
    submit.add_argument(
        "--output",
        action="append",
        default=[],
        metavar="NAME=JMESPATH",
        help="named output over {statusCode, headers, body} of the final response, repeatable",
    )
    submit.add_argument(
        "--timeout",
        type=int,
        metavar="SECONDS",
        help="timeoutSeconds of a callback or poll task",
    )
    submit.add_argument(
        "--retry",
        type=int,
        metavar="ATTEMPTS",
        help="retry connection errors, timeouts, 429 and 503: at most ATTEMPTS calls in all",
    )
    submit.add_argument(
        "--retry-delay",
        type=float,
        metavar="SECONDS",
        help="seconds before the first retry (default 1), doubled for each one after",
    )
    submit.add_argument("--task-id", help="default: a new UUID")
    submit.add_argument("--plan-id", help="default: the taskId")
    submit.add_argument("--job-id")
    submit.add_argument("--hub", help="hubName (default build)")
    submit.add_argument("--name", help="display name")
    submit.add_argument(
        "--var", action="append", default=[], metavar="NAME=VALUE", help="variable, repeatable"
    )
    submit.add_argument("--wait", action="store_true", help="wait for the result and print it")
    submit.add_argument(
        "--wait-timeout", type=float, default=600, metavar="SECONDS", help="default 600"
    )
    submit.set_defaults(command="submit")
    _add_operations(commands)
    _add_task_commands(commands)
    _add_definitions(commands)
    return parser


SUBMIT_EXITS = """exit codes:
  0  queued (with --wait: the task succeeded)
  1  with --wait: the task's result is not succeeded
  2  invalid input: the message says what to fix
  3  --wait-timeout passed: the task stays queued or running
  4  RabbitMQ is unavailable: try again later"""


def _add_task_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The commands that follow tasks as they run, read and cancel one, and serve health checks."""
    events = commands.add_parser(
        "events",
        help="print task events as they are published",
        description="Print the task events published from now on (TaskStarted, TaskWaiting, "
        "TaskCompleted), one line each: the time, the event, taskId, hub, and a TaskCompleted's "
        "result and reason. Without --follow: with --task, until that task's TaskCompleted "
        "(printed at once if the task has already completed); without --task, until "
        f"{IDLE_SECONDS:g} s pass without an event.",
        epilog="""exit codes:
  0  done, or stopped by SIGINT or SIGTERM
  2  --hub or --task is not an id
  4  RabbitMQ (or, for --task without --follow, PostgreSQL) is unavailable""",
        formatter_class=_HelpFormatter,
    )
    events.add_argument("--follow", "-f", action="store_true", help="until SIGINT or SIGTERM")
    events.add_argument("--hub", help="only this hubName's events (exact, as in routing keys)")
    events.add_argument("--task", metavar="ID", help="only this taskId's events")
    events.add_argument("--json", action="store_true", help="each event's JSON body, one a line")
    events.set_defaults(command="events")

    task = commands.add_parser(
        "task",
        help="one task in detail",
        description="Show a task as GET /tasks/{taskId} does: state, result, reason, times, "
        "attempts, the request (secrets redacted), the response, the events received.",
        epilog=TASK_EXITS.format(also="", broker=""),
        formatter_class=_HelpFormatter,
    )
    task.add_argument("id", metavar="ID", help="the taskId")
    task.add_argument("--json", action="store_true", help="GET /tasks/{taskId}'s JSON")
    task.set_defaults(command="task")

    cancel = commands.add_parser(
        "cancel",
        help="cancel a queued, running or waiting task",
        description="Complete a task with the result canceled, as POST /tasks/{taskId}/cancel "
        "does, and publish its TaskCompleted event; its cancelRequest, if any, is called by a "
        "worker. A task already completed is left as it is.",
        epilog=TASK_EXITS.format(also=", or it has already completed", broker=" or RabbitMQ"),
        formatter_class=_HelpFormatter,
    )
    cancel.add_argument("id", metavar="ID", help="the taskId")
    cancel.set_defaults(command="cancel")

    logs = commands.add_parser(
        "logs",
        help="the log lines a task's service posted",
        description="Print the log lines the task's service posted, oldest first, as "
        "GET /tasks/{taskId}/logs gives them.",
        epilog=TASK_EXITS.format(also="", broker=""),
        formatter_class=_HelpFormatter,
    )
    logs.add_argument("id", metavar="ID", help="the taskId")
    logs.add_argument(
        "--follow", "-f", action="store_true", help="print new lines until the task completes"
    )
    logs.set_defaults(command="logs")

    check = commands.add_parser(
        "check",
        help="exit 0 if this machine's agentless processes are ready (a health check)",
        description="Ask GET /readyz of the worker's probe server (AGENTLESS_WORKER_HOST, "
        "AGENTLESS_WORKER_PORT) and of the API (AGENTLESS_API_HOST, AGENTLESS_API_PORT) on "
        "this machine; a port that refuses the connection is skipped. For a container's "
        "HEALTHCHECK.",
        epilog="""exit codes:
  0  at least one answers 200, and none anything else
  1  one answers anything else (503: not ready), or does not answer in 2 s
  2  both ports are 0
  4  no port is listening""",
        formatter_class=_HelpFormatter,
    )
    check.set_defaults(command="check")

    openapi = commands.add_parser(
        "openapi",
        help="print the API's OpenAPI document",
        description="Print the OpenAPI 3.1 document that GET /openapi.json serves, built "
        "from the route table, without connecting to anything.",
    )
    openapi.set_defaults(command="openapi")


def _add_operations(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The commands that show and repair what the queue and the database hold."""
    status = commands.add_parser(
        "status",
        help="the queue, the task states and the live workers",
        description="Show what GET /queue shows: the task queue's ready messages and consumers, "
        "the dead letters, how many tasks are queued, running, waiting and completed; and the "
        "live workers.",
    )
    status.add_argument(
        "--json", action="store_true", help="print GET /queue's JSON instead of tables"
    )
    status.set_defaults(command="status")

    tasks = commands.add_parser(
        "tasks",
        help="list tasks, newest first",
        description="List tasks from the database, newest first unless --order or --asc say "
        "otherwise. Filters compare case-insensitively, as GET /tasks does.",
    )
    tasks.add_argument("--state", type=str.lower, choices=[s.value for s in State])
    tasks.add_argument("--result", type=_result_name, choices=[r.value for r in Result])
    tasks.add_argument("--plan-id", help="planId")
    tasks.add_argument("--hub", help="hubName")
    tasks.add_argument(
        "--limit", type=_whole(1, MAX_LISTED), default=20, metavar="N", help="default 20"
    )
    tasks.add_argument(
        "--order", choices=list(ORDER_COLUMNS), default="queuedAt", help="default queuedAt"
    )
    tasks.add_argument("--asc", action="store_true", help="ascending order (default descending)")
    tasks.add_argument(
        "--json", action="store_true", help="print the task summaries as a JSON array"
    )
    tasks.set_defaults(command="tasks")

    dead_letters = commands.add_parser(
        "dead",
        help="list or requeue dead letters",
        description="Messages that could not be processed wait in the dead-letter queue "
        "({prefix}.dead), each with its reason. List them, or move them back to the task "
        "queue once their cause is fixed or has passed.",
    )
    dead_commands = dead_letters.add_subparsers(title="commands", required=True, metavar="COMMAND")
    dead_list = dead_commands.add_parser(
        "list",
        help="show dead letters and their reasons; they stay in the queue",
        description="Show the dead letters, oldest first: message id, reason, and the start of "
        "the body. Every message stays in the queue, in its order; the queue is read whole, "
        "so a large one takes a while.",
    )
    dead_list.add_argument(
        "--limit", type=_whole(1, MAX_LISTED), default=100, metavar="N", help="default 100"
    )
    dead_list.add_argument("--json", action="store_true", help="print a JSON array")
    dead_list.set_defaults(command="dead-list")
    dead_requeue = dead_commands.add_parser(
        "requeue",
        help="move dead letters back to the task queue",
        description="Move the dead letters with these message ids (task ids), or all of them, "
        "back to the task queue with their original properties; the others stay. Exits 1 if "
        "an id matches no dead letter.",
    )
    dead_requeue.add_argument("ids", nargs="*", metavar="ID", help="message id (the taskId)")
    dead_requeue.add_argument("--all", action="store_true", help="every dead letter")
    dead_requeue.set_defaults(command="dead-requeue")


DEFINITION_EXITS = """exit codes:
  0  done
  1  {missing}
  4  the database is unavailable: try again later"""
APPLY_EXITS = """exit codes:
  0  done
  2  a file is not valid (the message lists every field to fix): nothing in it was applied
  4  the database is unavailable: try again later"""
EXECUTE_EXITS = """exit codes:
  0  queued (with --wait: the task succeeded)
  1  no such definition; with --wait: the task's result is not succeeded
  2  invalid input: the message says what to fix
  3  --wait-timeout passed: the task stays queued or running
  4  RabbitMQ or PostgreSQL is unavailable: try again later"""


def _add_definitions(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The commands that keep task definitions (SPEC §9) and execute them by name."""
    definitions = commands.add_parser(
        "definitions",
        help="apply, list, show or delete task definitions",
        description="Task definitions are stored task templates (SPEC §9): a task's fields "
        "without taskId and planId, plus a unique name and a description. Each change bumps "
        "its version.",
    )
    definition_commands = definitions.add_subparsers(
        title="commands", required=True, metavar="COMMAND"
    )
    apply = definition_commands.add_parser(
        "apply",
        help="create or replace definitions by name from JSON files",
        description="Each FILE holds one definition (a JSON object) or several (an array). A "
        "definition whose name (any case) is not stored yet is created; one that is stored is "
        "replaced whole, attributes left out taking their defaults, and its version goes up "
        "only if something changed. Prints, for each definition, created, updated to version "
        "N, or unchanged. A file with an invalid definition applies nothing and lists every "
        "invalid field; the other files are applied.",
        epilog=APPLY_EXITS,
        formatter_class=_HelpFormatter,
    )
    apply.add_argument("files", nargs="+", type=Path, metavar="FILE", help="JSON, or - for stdin")
    apply.set_defaults(command="definitions-apply")

    listed = definition_commands.add_parser(
        "list",
        help="list definitions by name",
        description="List the definitions, by name: version, when last changed, description.",
    )
    listed.add_argument("--name", help="only names that contain this (any case)")
    listed.add_argument(
        "--limit", type=_whole(1, MAX_LISTED), default=100, metavar="N", help="default 100"
    )
    listed.add_argument("--json", action="store_true", help="a JSON array of the definitions")
    listed.set_defaults(command="definitions-list")

    show = definition_commands.add_parser(
        "show",
        help="one definition in full",
        description="Show a definition, named or by id, and its last executions.",
        epilog=DEFINITION_EXITS.format(missing="no such definition"),
        formatter_class=_HelpFormatter,
    )
    show.add_argument("definition", metavar="NAME|ID")
    show.add_argument(
        "--json", action="store_true", help="GET /definitions/{id}'s JSON (every attribute)"
    )
    show.set_defaults(command="definitions-show")

    delete = definition_commands.add_parser(
        "delete",
        help="delete definitions; their executions stay",
        description="Delete definitions, named or by id. The tasks they executed stay, and "
        "can still be read.",
        epilog=DEFINITION_EXITS.format(missing="one of them is not there (the others are deleted)"),
        formatter_class=_HelpFormatter,
    )
    delete.add_argument("definitions", nargs="+", metavar="NAME|ID")
    delete.set_defaults(command="definitions-delete")

    execute = commands.add_parser(
        "execute",
        help="queue a task from a definition; with --wait, print its result",
        description="Queue a task from the current version of a definition, named or by id, "
        "as POST /definitions/name/{name}/executions does; print its executionId (the taskId), "
        "executionIndex and executionLink. Each --input overrides one of the definition's "
        "variables: its value is read as JSON when it is JSON (7, true, null, [1,2], "
        '{"a":1}, "quoted"), else taken as a string (v1.2 stays "v1.2"). With --wait, print '
        "the TaskCompleted event and exit 0 only if it succeeded.",
        epilog=EXECUTE_EXITS,
        formatter_class=_HelpFormatter,
    )
    execute.add_argument("definition", metavar="NAME|ID")
    execute.add_argument(
        "--input",
        "-i",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="variable for this execution, repeatable; VALUE is JSON if it parses, else text",
    )
    execute.add_argument("--comments", help="why this execution, kept with the task")
    execute.add_argument("--tag", action="append", default=[], help="repeatable")
    execute.add_argument("--source", default="cli", help="who executes it (default cli)")
    execute.add_argument(
        "--execution-id",
        metavar="ID",
        help="the taskId (default a new one); the same id with the same input is the same "
        "execution",
    )
    execute.add_argument("--wait", action="store_true", help="wait for the result and print it")
    execute.add_argument(
        "--wait-timeout", type=float, default=600, metavar="SECONDS", help="default 600"
    )
    execute.set_defaults(command="execute")


def _whole(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}")
        return value

    return parse


def _result_name(text: str) -> str:
    """The result spelled as the contract spells it, whatever the case typed."""
    return next((r.value for r in Result if r.value.lower() == text.lower()), text)
