"""The ``director`` command: its parser and entry point; one module per command family.

``base`` holds what every command shares (configuration as the daemon reads it, errors, the
database connection, output); ``serve``, ``configuration`` (``config``), ``schema`` (``db``),
``accounts`` (``users``, ``keys``, ``seed``), ``playbooks`` (with ``registry``'s and
``upstream_oauth``'s playbook actions), ``registry``, ``doctor``, ``setup`` (``setup-url``),
``oauth_grants`` (``oauth grants``) and ``upstream_oauth`` (``secrets``) each register their
subcommands with ``add_commands``; ``owned`` is what the playbook commands share. Nothing here is imported
by a command module, so the package has no import cycle (``tests/test_imports.py``).
"""

from __future__ import annotations

import argparse

from director import __version__
from director.cli import (
    accounts,
    configuration,
    doctor,
    oauth_grants,
    playbooks,
    registry,
    schema,
    serve,
    setup,
    upstream_oauth,
)
from director.cli.base import DEFAULT_ENV_FILE, EX_CONFIG, CommandError

#: In the order ``director --help`` lists them.
FAMILIES = (serve, configuration, schema, accounts, playbooks, registry, doctor, setup,
            oauth_grants, upstream_oauth)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="director",
        description="Director, the MCP gateway: run it, look after its database and its accounts.",
    )
    parser.add_argument("--version", action="version", version=f"director {__version__}")
    parser.add_argument(
        "--env-file", metavar="PATH", default=None,
        help=f"environment file to read under the process environment (default: "
             f"{DEFAULT_ENV_FILE} when readable; '' for none)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for family in FAMILIES:
        family.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    try:
        return int(arguments.handler(arguments))
    except CommandError as error:
        # Configuration problems are printed as they are: one self-explaining line each.
        from director.logs import print_problems

        prefix = "" if error.code == EX_CONFIG else "director: "
        print_problems(prefix + line for line in str(error).splitlines())
        return error.code
    except KeyboardInterrupt:
        return 130
