"""The `agentless` command (SPEC §8): settings are built here, once, and handed to the command;
whatever goes wrong on the way out becomes one line on stderr and an exit code (exits.py)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from worker import logs
from worker.cli.check import cmd_check
from worker.cli.definitions import cmd_apply, cmd_delete, cmd_list, cmd_show
from worker.cli.events import cmd_events
from worker.cli.execute import cmd_execute
from worker.cli.exits import (
    CONNECTION_LOST,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    lost,
    unreachable,
    what_to_do,
)
from worker.cli.parser import build_parser
from worker.cli.reports import cmd_dead_list, cmd_dead_requeue, cmd_status, cmd_tasks
from worker.cli.serve import cmd_api, cmd_openapi, cmd_run, cmd_worker
from worker.cli.submit import cmd_submit
from worker.cli.task import cmd_cancel, cmd_logs, cmd_task
from worker.contract.errors import ConfigError, Unavailable, UsageError
from worker.contract.settings import Settings, load_settings

log = logging.getLogger("agentless")

Command = Callable[[Settings, argparse.Namespace], int]
# Each subcommand's handler, by the name the parser gives it.
COMMANDS: dict[str, Command] = {
    "worker": cmd_worker,
    "run": cmd_run,
    "api": cmd_api,
    "submit": cmd_submit,
    "status": cmd_status,
    "tasks": cmd_tasks,
    "dead-list": cmd_dead_list,
    "dead-requeue": cmd_dead_requeue,
    "events": cmd_events,
    "task": cmd_task,
    "cancel": cmd_cancel,
    "logs": cmd_logs,
    "check": cmd_check,
    "openapi": cmd_openapi,
    "definitions-apply": cmd_apply,
    "definitions-list": cmd_list,
    "definitions-show": cmd_show,
    "definitions-delete": cmd_delete,
    "execute": cmd_execute,
}


def main(argv: list[str] | None = None) -> NoReturn:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        _fail(str(exc))
    level = args.log_level or settings.log_level or "info"
    logs.configure(settings.effective_log_format, getattr(logging, level.upper()))
    try:
        code = COMMANDS[args.command](settings, args)
    except Unavailable as exc:
        _fail(str(exc), EXIT_UNAVAILABLE)
    except ConfigError as exc:
        if unreachable(exc):
            _fail(what_to_do(str(exc), settings), EXIT_UNAVAILABLE)
        _fail(str(exc))
    except UsageError as exc:
        _fail(str(exc))
    except BrokenPipeError:
        # The reader went away (`agentless events --follow | head`): nothing more to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except CONNECTION_LOST as exc:
        _fail(lost(exc, settings), EXIT_UNAVAILABLE)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    print(f"agentless: {message}", file=sys.stderr)
    sys.exit(code)
