"""``director serve``: the gateway in the foreground."""

from __future__ import annotations

import argparse
import importlib
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
    config = server_options()
    try:
        config.parseOptions(argv)
    except UsageError as error:
        raise CommandError(str(error), 2) from None
    twistd._SomeApplicationRunner(config).run()
    return 0


def server_options() -> Any:
    """twistd's options, knowing of our plugin only: twistd's own search unpickles every
    plugin cache on the path, which imports the interfaces they name (twisted.trial's, and
    unittest with it) into the daemon for good (0.5 MiB of its idle RSS)."""
    from twisted.scripts import twistd

    config = twistd.ServerOptions()
    config._getPlugins = _director_plugin_only  # type: ignore[assignment]
    return config


def _director_plugin_only(interface: Any) -> list[Any]:
    # By name: mypy checks src/twisted/plugins as files of their own, not as this package.
    return [importlib.import_module("twisted.plugins.director_plugin").serviceMaker]


def add_commands(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the gateway in the foreground "
                                "(the same as `twistd -n director`)")
    serve.add_argument("--listen", metavar="ENDPOINT",
                       help="Twisted endpoint, e.g. systemd:domain=INET:name=director-http")
    serve.set_defaults(handler=cmd_serve)
