"""``twistd director``: the Director MCP gateway as a twistd plugin.

twistd imports every plugin module at each start, so this file imports nothing of Director
until the plugin is actually chosen.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    synopsis = "[--listen ENDPOINT]"
    longdesc = (
        "Serve the Director MCP gateway. Configuration comes from the environment "
        "(see README.rst, Configuration, or `director config check`)."
    )
    optParameters = [
        ["listen", "l", None,
         "Twisted endpoint to listen on, e.g. systemd:domain=INET:name=director-http for socket "
         "activation. Default: tcp:$PORT:interface=$HOST."],
    ]

    def postOptions(self) -> None:
        import os

        from director.config import ConfigError, load_settings
        from director.service import EX_CONFIG

        parent = getattr(self, "parent", None)
        if parent is not None and not parent.get("logger"):
            # twistd resolves --logger after its sub-command's options: our JSON/journald
            # output becomes the default without anyone passing --logger.
            parent["logger"] = "director.logs.observer"
        try:
            self["settings"] = load_settings(os.environ)
        except ConfigError as error:
            from director.logs import print_problems

            print_problems(error.problems)
            sys.exit(EX_CONFIG)


@implementer(IServiceMaker, IPlugin)
class DirectorServiceMaker:
    tapname = "director"
    description = "Director: MCP gateway for playbooks of upstream MCP servers."
    options = Options

    def makeService(self, options: Any) -> Any:
        from twisted.internet import reactor

        from director.service import DirectorService

        return DirectorService(options["settings"], reactor, options["listen"])


serviceMaker = DirectorServiceMaker()
