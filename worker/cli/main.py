"""The `agentless` command (SPEC §8): settings are built here, once, and handed to the command."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

from worker import logs
from worker.cli.parser import build_parser
from worker.contract.errors import ConfigError, UsageError
from worker.contract.settings import load_settings

log = logging.getLogger("agentless")

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> NoReturn:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        _fail(str(exc))
    logs.configure(settings.effective_log_format, getattr(logging, args.log_level.upper()))
    try:
        code: int = args.command(settings, args)
    except (ConfigError, UsageError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    print(f"agentless: {message}", file=sys.stderr)
    sys.exit(code)
