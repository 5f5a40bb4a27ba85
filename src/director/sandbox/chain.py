"""The launch chain of a stdio server: its argv, environment and resolved command.

``launch_argv`` wraps a command in programs that change the process and then ``exec`` in place
(``setsid``, ``setpriv``, a ``sh`` check of the parent), ``child_environment`` builds the
environment a server starts with, ``resolve_command`` finds its executable. Why each step is
there is told in ``director.mcp.upstream.stdio``'s docstring ("Process group, identity and
parent-death signal", "Environment"); the sandbox modes (``director.sandbox.launcher``) build
on these three.
"""

from __future__ import annotations

import os
import pwd
import signal
import sys
from collections.abc import Mapping
from typing import Protocol

from director.mcp.upstream.account import StdioAccount


class Identity(Protocol):
    """Who a child runs as, as far as its environment is concerned."""

    def environment(self) -> dict[str, str]:
        """The identity variables (HOME, ...) the child starts with."""
        ...


DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
INHERITED_VARIABLES = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "NODE_EXTRA_CA_CERTS", "REQUESTS_CA_BUNDLE",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY",
    "http_proxy", "https_proxy", "no_proxy", "all_proxy",
    "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_RUNTIME_DIR",
)
INHERITED_PREFIXES = ("LC_", "npm_config_", "NPM_CONFIG_", "UV_", "PIP_")
#: The daemon's own identity: not passed to a child that runs as another account.
IDENTITY_VARIABLES = ("HOME", "USER", "LOGNAME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME",
                      "XDG_DATA_HOME", "XDG_RUNTIME_DIR")
#: The daemon's cache locations (director.service points npm's at /var/cache/director): a
#: child of another identity cannot write them, and must not share them.
CACHE_VARIABLES = ("npm_config_cache", "NPM_CONFIG_CACHE", "UV_CACHE_DIR", "PIP_CACHE_DIR")

SETSID = "/usr/bin/setsid"
SETPRIV = "/usr/bin/setpriv"
SH = "/bin/sh"
# $1 daemon pid, $2 working directory ("" = inherit), then the command's argv.
_SH_LAUNCH = ('[ "$PPID" = "$1" ] || exit 1; [ -z "$2" ] || cd "$2" || exit 127; '
              'unset OLDPWD PWD; shift 2; exec "$@"')  # dash exports PWD: don't add it
_PR_SET_PDEATHSIG = 1
# argv: daemon pid, "uid:gid" ("" = keep), working directory ("" = inherit), executable,
# argv[0], args…
_WRAPPER = (
    "import ctypes,os,signal,sys\n"
    "if sys.argv[2]:\n"
    " u,g=map(int,sys.argv[2].split(':'));os.setgroups([]);os.setgid(g);os.setuid(u)\n"
    f"ctypes.CDLL(None).prctl({_PR_SET_PDEATHSIG},{int(signal.SIGKILL)})\n"
    "if os.getppid()!=int(sys.argv[1]):os._exit(1)\n"
    "signal.signal(signal.SIGPIPE,signal.SIG_DFL)\n"
    "signal.signal(signal.SIGXFSZ,signal.SIG_DFL)\n"
    "os.setsid()\n"
    "try:\n"
    " sys.argv[3] and os.chdir(sys.argv[3])\n"
    " os.execv(sys.argv[4],sys.argv[5:])\n"
    "except OSError as e:\n"
    " sys.stderr.write(f'cannot run {sys.argv[4]}: {e.strerror}\\n');os._exit(127)\n"
)


def launch_argv(path: str, args: list[str], cwd: str | None,
                account: StdioAccount | None = None) -> list[str]:
    """The argv that runs ``path args…`` in its own session with a parent-death signal, as
    ``account`` (uid, gid, no supplementary groups) when there is one."""
    daemon = str(os.getpid())
    if all(os.access(tool, os.X_OK) for tool in (SETSID, SETPRIV, SH)):
        identity = [] if account is None else [
            f"--reuid={account.uid}", f"--regid={account.gid}", "--clear-groups"]
        return [SETSID, SETPRIV, *identity, "--pdeathsig", "KILL", "--", SH, "-c", _SH_LAUNCH,
                "director-stdio", daemon, cwd or "", path, *args]
    identity_arg = "" if account is None else f"{account.uid}:{account.gid}"
    return [sys.executable, "-I", "-S", "-c", _WRAPPER, daemon, identity_arg, cwd or "", path,
            path, *args]


def child_environment(configured: Mapping[str, str],
                      inherited: Mapping[str, str] | None = None,
                      account: Identity | None = None) -> dict[str, str]:
    """The environment a stdio server runs with (``stdio``'s docstring, "Environment"); a
    child of another identity (``account``) gets its variables instead of the daemon's."""
    source = os.environ if inherited is None else inherited
    environment = {key: value for key, value in source.items()
                   if key in INHERITED_VARIABLES or key.startswith(INHERITED_PREFIXES)}
    if account is not None:
        for key in IDENTITY_VARIABLES + CACHE_VARIABLES:
            environment.pop(key, None)
        environment.update(account.environment())
    environment.setdefault("PATH", DEFAULT_PATH)
    if "HOME" not in environment:
        try:
            environment["HOME"] = pwd.getpwuid(os.getuid()).pw_dir
        except KeyError:
            environment["HOME"] = "/"
    environment.update(configured)
    return environment


def resolve_command(command: str, env: Mapping[str, str], cwd: str | None) -> str | None:
    """The absolute path of an executable ``command`` (configured PATH, then the daemon's)."""
    def runnable(path: str) -> bool:
        return os.path.isfile(path) and os.access(path, os.X_OK)

    if not command:
        return None
    if "/" in command:
        path = os.path.join(cwd or os.getcwd(), command)
        return os.path.abspath(path) if runnable(path) else None
    directories = env.get("PATH", "").split(":") + os.environ.get("PATH", DEFAULT_PATH).split(":")
    for directory in directories:
        if os.path.isabs(directory):  # never "" or a relative entry: they mean the cwd
            path = os.path.join(directory, command)
            if runnable(path):
                return path
    return None
