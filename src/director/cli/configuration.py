"""``director config check|docs``: the configuration validated without starting, and its
table of variables."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from director.cli.base import (
    EX_CONFIG,
    READ_AS_ADMINISTRATOR,
    CommandError,
    json_flag,
    settings_from,
    unreadable_default_env_file,
)
from director.config import dangerous_settings, database_target


def cmd_config_check(arguments: argparse.Namespace) -> int:
    if arguments.env_file is None and "DIRECTOR_ENV_FILE" not in os.environ:
        # Checking the process environment alone would pass off another configuration as the
        # service's: say why, and how to check the real one (--env-file '' checks the process
        # environment alone, on purpose).
        problem = unreadable_default_env_file()
        if problem is not None:
            raise CommandError(
                f"{problem}, so the service's configuration cannot be checked: "
                f"{READ_AS_ADMINISTRATOR.format(command='config check')}; or pass --env-file "
                "'' to check the process environment alone", EX_CONFIG)
    settings = settings_from(arguments)
    summary = {
        "environment": settings.environment,
        "database": f"external ({database_target(settings.database_url)})"
        if settings.database_url else f"embedded in {settings.state_directory}/postgres",
        "listen": f"{settings.host}:{settings.port}",
        "base_url": settings.base_url,
        "dangerous_flags": [name for name, on in (
            ("DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS", settings.allow_arbitrary_stdio_servers),
            ("DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS", settings.allow_insecure_http_servers),
            ("DANGEROUSLY_ENABLE_SEEDING", settings.enable_seeding),
        ) if on],
    }
    # The same lines the daemon logs at each start.
    warnings = dangerous_settings(settings)
    if arguments.json:
        print(json.dumps({"ok": True, **summary, "warnings": warnings}))
    else:
        print("configuration OK")
        for key, value in summary.items():
            print(f"  {key}: {', '.join(value) if isinstance(value, list) else value or '-'}")
        for warning in warnings:
            print(f"WARNING: dangerous setting: {warning}")
    return 0


def cmd_config_docs(arguments: argparse.Namespace) -> int:
    from director.config import configuration_table

    print(configuration_table())
    return 0


def add_commands(commands: Any) -> None:
    config = commands.add_parser("config", help="validate or document the configuration")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = config_commands.add_parser(
        "check", help="validate the environment without starting; exit 78 when invalid")
    json_flag(check)
    check.set_defaults(handler=cmd_config_check)
    docs = config_commands.add_parser("docs", help="print the table of every variable")
    docs.set_defaults(handler=cmd_config_docs)
