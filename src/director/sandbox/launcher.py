"""The sandbox modes: a server's command in, the argv and environment to spawn out.

The seam is one call, ``Launcher.spawn(Command) -> Spawn``: ``StdioUpstream`` hands it the
server's configured command, arguments, environment, working directory and identity (its name
and its owner, the playbook) and spawns ``Spawn.argv`` with ``Spawn.env``, whatever the mode.
The service chooses the launcher once at start (``choose_launcher``):

``systemd`` (``SystemdBox``)
    The spawned process is ``client.py``: it connects to ``director-stdio.socket`` and hands
    the server's stdin, stdout and stderr (the daemon's pipes, no relay) and its command to
    systemd, which starts a ``director-stdio@.service`` instance for that connection:
    a dynamic user of its own, the unit's sandbox and cgroup limits, and ``supervisor.py`` as
    its main process, which runs the command and reports how it ended back to the client. The
    client lives as long as the server; it forwards the daemon's signals and exits as the
    server did (so the daemon's process handling is the same in every mode).
``account`` (``AccountBox``)
    The daemon is root and there is no socket: the server runs as ``STDIO_USER`` (no
    supplementary groups) under ``prlimit`` (memory, tasks, no core files) and ``nice``.
``none`` (``Unboxed``)
    The daemon is not root and has no socket: the server runs as the daemon itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import attrs

from director.mcp.upstream.account import (
    AccountError,
    StdioAccount,
    own_directory,
    prepare_home,
)
from director.sandbox.chain import DEFAULT_PATH, child_environment, launch_argv, resolve_command

if TYPE_CHECKING:
    from director.config import Settings

#: The variable that carries the request to ``client.py`` (its own environment is not the
#: server's: the server's is in the request).
REQUEST_VARIABLE = "DIRECTOR_STDIO_REQUEST"
CLIENT = str(Path(__file__).with_name("client.py"))
PRLIMIT = "/usr/bin/prlimit"
NICE = "/usr/bin/nice"
NICENESS = "10"


UNBOXED_IN_PRODUCTION = (
    "stdio servers run only sandboxed in production, and this daemon has no sandbox (no "
    "director-stdio.socket, and it is not root): `systemctl enable --now director-stdio.socket`")


class SandboxError(Exception):
    """A server cannot be started in this sandbox; the message says why and what to do."""


@attrs.frozen
class Command:
    """What a stdio server is configured to run, and whose it is."""

    server: str
    command: str
    args: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str | None
    #: The server's owner (the playbook's id): with ``server``, what keys its cache directory.
    owner: str = ""


@attrs.frozen
class Spawn:
    """What to spawn: ``argv[0]`` is an absolute path."""

    argv: list[str]
    env: dict[str, str]


@attrs.frozen
class Limits:
    """Per-process resource limits (rlimits) every sandboxed server gets."""

    memory: int
    tasks: int


class Launcher(Protocol):
    #: "systemd", "account" or "none".
    mode: str

    def spawn(self, command: Command) -> Spawn:
        """The argv and environment that start ``command`` in this sandbox; ``SandboxError``
        when it cannot start (command not found, unusable directory, ...)."""
        ...

    def describe(self) -> str:
        """One line for the start log and ``director doctor``."""
        ...


def _resolved(command: Command, env: Mapping[str, str]) -> str:
    path = resolve_command(command.command, env, command.cwd)
    if path is None:
        raise SandboxError(f"command not found: {command.command!r}")
    return path


@attrs.frozen
class Unboxed:
    """No sandbox: the server runs as the daemon (which must not be root). Refused in
    production, where every stdio server runs sandboxed."""

    production: bool = False
    mode = "none"

    def spawn(self, command: Command) -> Spawn:
        if self.production:
            raise SandboxError(UNBOXED_IN_PRODUCTION)
        if os.geteuid() == 0:
            raise SandboxError("refusing to run a stdio server as root: the daemon gives it "
                               "no unprivileged account (STDIO_USER)")
        env = child_environment(command.env)
        path = _resolved(command, env)
        return Spawn(launch_argv(path, list(command.args), command.cwd), env)

    def describe(self) -> str:
        if self.production:
            return "none: " + UNBOXED_IN_PRODUCTION
        return ("none: stdio servers run as the daemon's own account and can read and write "
                "whatever it can (no director-stdio.socket, and the daemon is not root)")


@attrs.frozen
class AccountBox:
    """The server runs as ``account`` under rlimits and a lower priority."""

    account: StdioAccount
    limits: Limits
    mode = "account"

    def spawn(self, command: Command) -> Spawn:
        try:
            prepare_home(self.account)
        except AccountError as failure:
            raise SandboxError(str(failure)) from None
        env = child_environment(command.env, account=self.account)
        path = _resolved(command, env)
        limited = [path, *command.args]
        if os.access(PRLIMIT, os.X_OK) and os.access(NICE, os.X_OK):
            limited = [PRLIMIT, f"--data={self.limits.memory}", f"--nproc={self.limits.tasks}",
                       "--core=0", "--", NICE, "-n", NICENESS, *limited]
        return Spawn(launch_argv(limited[0], limited[1:], command.cwd, self.account), env)

    def describe(self) -> str:
        return (f"account: stdio servers run as {self.account.name} (uid {self.account.uid}, "
                f"shared by all of them) with at most {self.limits.memory // 1024 ** 2} MiB "
                f"of data per process and {self.limits.tasks} tasks for the account; no "
                "private /tmp (director-stdio.socket gives each server a sandbox of its own)")


@attrs.frozen
class CacheHome:
    """The identity variables of a server in the systemd sandbox: its cache directory is its
    HOME (npm, uv and pip keep their caches under it)."""

    home: str

    def environment(self) -> dict[str, str]:
        return {"HOME": self.home, "XDG_CACHE_HOME": f"{self.home}/.cache",
                "TMPDIR": "/tmp"}  # noqa: S108 - the unit's private /tmp


@attrs.frozen
class SystemdBox:
    """Each server in a ``director-stdio@.service`` instance (module docstring)."""

    socket: str
    cache_root: str
    limits: Limits
    #: Keys the cache directories' names, which nobody else can then guess.
    secret: bytes = attrs.field(repr=False)
    mode = "systemd"

    def spawn(self, command: Command) -> Spawn:
        home = self.cache_directory(command)
        env = child_environment(command.env, account=CacheHome(home))
        path = _resolved(command, env)
        request = {"argv": [path, *command.args], "env": env, "cwd": command.cwd,
                   "server": command.server,
                   "limits": {"data": self.limits.memory, "nproc": self.limits.tasks}}
        argv = launch_argv(sys.executable, ["-I", "-S", CLIENT, self.socket], None)
        return Spawn(argv, {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8",
                            REQUEST_VARIABLE: json.dumps(request)})

    def cache_directory(self, command: Command) -> str:
        """The server's own directory under ``cache_root`` (made on first use, mode 0770:
        its group is the parent's, ``director-stdio``, the sandbox's static group). The parent
        is not listable by that group: a sandbox reaches only the directory whose name it is
        given."""
        name = hmac.new(self.secret, f"{command.owner}\0{command.server}".encode(),
                        hashlib.sha256).hexdigest()[:32]
        try:
            group = os.stat(self.cache_root).st_gid
            return own_directory(os.path.join(self.cache_root, name), 0o770, os.geteuid(), group,
                                 "as its cache directory")
        except AccountError as failure:
            raise SandboxError(f"{failure} (the director package creates {self.cache_root}, "
                               "STDIO_CACHE_DIRECTORY)") from None
        except OSError as failure:
            raise SandboxError(f"cannot use {self.cache_root} (STDIO_CACHE_DIRECTORY): "
                               f"{failure.strerror}") from None

    def describe(self) -> str:
        return (f"systemd: each stdio server runs in a director-stdio@.service unit of its own "
                f"through {self.socket} (dynamic user, private /tmp, the daemon's files hidden, "
                "cgroup limits)")


def usable_socket(path: str) -> bool:
    with contextlib.suppress(OSError):
        return stat.S_ISSOCK(os.stat(path).st_mode)
    return False


def choose_launcher(mode: str, socket: str, cache_root: str, limits: Limits,
                    account: StdioAccount | None, secret: bytes,
                    production: bool = False) -> Launcher:
    """The launcher for ``STDIO_SANDBOX=mode``; ``SandboxError`` when an explicit mode cannot
    work here (the message names the fix)."""
    if mode in ("auto", "systemd") and usable_socket(socket):
        if not os.path.isdir(cache_root):
            raise SandboxError(f"{cache_root} (STDIO_CACHE_DIRECTORY) does not exist: the stdio "
                               "sandbox needs it (the director package creates it, with "
                               "systemd-tmpfiles --create director.conf)")
        return SystemdBox(socket, cache_root, limits, secret)
    if mode == "systemd":
        raise SandboxError(f"STDIO_SANDBOX=systemd but {socket} is not a socket: start it with "
                           "`systemctl enable --now director-stdio.socket`, or set "
                           "STDIO_SANDBOX_SOCKET")
    if account is not None:
        return AccountBox(account, limits)
    if mode == "account":
        raise SandboxError("STDIO_SANDBOX=account needs a daemon started as root (to switch to "
                           "STDIO_USER); use systemd (director-stdio.socket) or auto")
    return Unboxed(production)


def stdio_launcher(settings: Settings, account: StdioAccount | None, secret: str) -> Launcher:
    """The service's launcher, from its settings (``choose_launcher``)."""
    key = hmac.new(secret.encode(), b"director stdio cache directories", hashlib.sha256).digest()
    return choose_launcher(settings.stdio_sandbox, settings.stdio_sandbox_socket,
                           settings.stdio_cache_directory,
                           Limits(settings.stdio_memory_max, settings.stdio_tasks_max), account,
                           key, settings.production)


def for_account(account: StdioAccount | None, limits: Limits) -> Launcher:
    """The launcher of a daemon without the socket: ``account`` or ``none``."""
    return Unboxed() if account is None else AccountBox(account, limits)
