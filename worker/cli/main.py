"""The `agentless` command (SPEC §8): settings are built here, once, and handed to the command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import NoReturn

from worker import logs
from worker.cli.parser import build_parser
from worker.cli.reports import cmd_dead_list, cmd_dead_requeue, cmd_status, cmd_tasks
from worker.cli.serve import cmd_api, cmd_run, cmd_worker
from worker.cli.submit import cmd_submit
from worker.contract.errors import ConfigError, UsageError
from worker.contract.settings import Settings, load_settings

log = logging.getLogger("agentless")

EXIT_USAGE = 2

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
    except (ConfigError, UsageError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    print(f"agentless: {message}", file=sys.stderr)
    sys.exit(code)
