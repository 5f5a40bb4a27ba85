"""``director serve``: the gateway in the foreground."""

from __future__ import annotations

import argparse
import os
from typing import Any

from director.cli.base import CommandError, environment


def cmd_serve(arguments: argparse.Namespace) -> int:
    """``twistd -n director``, except that a drained stop exits 0.

    Plain twistd re-raises the stop signal on itself at exit (systemd counts that as clean
    too); a shell, ``make run`` and supervisors other than systemd read it as a crash.
    """
    from twisted.python.usage import UsageError
    from twisted.scripts import twistd

    os.environ.update(environment(arguments.env_file))
    argv = ["--nodaemon", "--pidfile=", "--logger=director.logs.observer", "director"]
    if arguments.listen:
        argv += ["--listen", arguments.listen]
    config = twistd.ServerOptions()
    try:
        config.parseOptions(argv)
    except UsageError as error:
        raise CommandError(str(error), 2) from None
    twistd._SomeApplicationRunner(config).run()
    return 0


def add_commands(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the gateway in the foreground "
                                "(the same as `twistd -n director`)")
    serve.add_argument("--listen", metavar="ENDPOINT",
                       help="Twisted endpoint, e.g. systemd:domain=INET:name=director-http")
    serve.set_defaults(handler=cmd_serve)
