"""The ``director`` command: its parser and entry point; one module per command family.

``base`` holds what every command shares (configuration as the daemon reads it, errors, the
database connection, output); ``serve``, ``configuration`` (``config``), ``schema`` (``db``),
``accounts`` (``users``, ``keys``, ``seed``), ``playbooks`` (with ``registry``'s and
``upstream_oauth``'s playbook actions), ``registry``, ``doctor``, ``setup`` (``setup-url``),
``oauth_grants`` (``oauth grants``) and ``upstream_oauth`` (``secrets``) each register their
subcommands with ``add_commands``; ``owned`` is what the playbook commands share. Nothing here is imported
by a command module, so the package has no import cycle (``tests/test_imports.py``). ``director
serve`` imports its own family only (``runs_serve``): the daemon carries no other.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from director import __version__
from director.cli import serve
from director.cli.base import DEFAULT_ENV_FILE, EX_CONFIG, CommandError


def build_parser(serve_only: bool = False) -> argparse.ArgumentParser:
    """Every command's parser; ``serve_only``: only ``serve``'s, for the daemon, which then
    imports no other family (their modules would stay in its memory for its whole life, ~1 MB).
    """
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
    serve.add_commands(commands)
    if serve_only:
        return parser
    from director.cli import (
        accounts,
        configuration,
        doctor,
        oauth_grants,
        playbooks,
        registry,
        schema,
        setup,
        upstream_oauth,
    )

    # In the order ``director --help`` lists them, after serve.
    for family in (configuration, schema, accounts, playbooks, registry, doctor, setup,
                   oauth_grants, upstream_oauth):
        family.add_commands(commands)
    return parser


def runs_serve(argv: Sequence[str]) -> bool:
    """Whether ``argv`` is ``serve`` with at most ``--env-file`` before it: then ``serve``'s
    parser alone parses it exactly as the whole one would. Anything else (``--help`` first, no
    command, another one) gets the whole parser."""
    words = iter(argv)
    for word in words:
        if word == "serve":
            return True
        name = word.partition("=")[0]
        if len(name) < 3 or not "--env-file".startswith(name):  # argparse takes prefixes
            return False
        if "=" not in word:
            next(words, None)  # its value
    return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(serve_only=runs_serve(argv))
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
