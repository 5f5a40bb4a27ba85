"""sd_notify and the watchdog, in-house (the protocol is one datagram; no dependency needed)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger(namespace="systemd")


def notify(message: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send ``message`` (e.g. ``READY=1``) to the service manager; False when there is none."""
    address = environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as error:
        log.warn("cannot notify systemd at {address}: {error}", address=address, error=error)
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Half the watchdog period systemd expects from us, or None when there is no watchdog."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2_000_000


class WatchdogService(Service):
    """Pings ``WATCHDOG=1`` every half period while the reactor turns."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self.environ = environ
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        interval = watchdog_interval(self.environ)
        if interval is not None:
            self._loop = LoopingCall(notify, "WATCHDOG=1", self.environ)
            self._loop.start(interval, now=True)

    def stopService(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return super().stopService()
