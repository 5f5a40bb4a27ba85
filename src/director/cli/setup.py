"""``director setup-url``: a fresh first-run link for the Studio (see ``studio/setup.py``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from director.cli.base import CommandError, connection_for, run, settings_from


def cmd_setup_url(arguments: argparse.Namespace) -> int:
    from director.studio.setup import issue_token, setup_url

    settings = settings_from(arguments)
    with connection_for(arguments) as connection:
        token = run(connection, issue_token(replace_older=True))
    if token is None:
        raise CommandError("an account exists already, so the setup page is closed; sign in at "
                           f"{settings.base_url}/studio/login (or create accounts with "
                           "`director users create`)")
    url = setup_url(settings.base_url, token)
    if arguments.json:
        print(json.dumps({"url": url}))
    else:
        print(f"open {url} to create the first account")
        print("(valid 24 hours, once; older setup links no longer work)")
    return 0


def add_commands(commands: Any) -> None:
    parser = commands.add_parser(
        "setup-url", help="print a one-time link to create the first account in the Studio",
        description="While no account exists, print a fresh one-time link to the Studio's "
                    "setup page (older links stop working). Fails once an account exists.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=cmd_setup_url)
