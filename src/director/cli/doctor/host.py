"""Checks of ``director doctor`` on the host: the state directory, the stdio sandbox, the
PostgreSQL tools and Twisted's plugin cache.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

from director.cli import base
from director.cli.doctor.environment import owner_name
from director.cli.doctor.result import FAIL, OK, WARN, Result
from director.config import (
    Settings,
)
from director.mcp.upstream.account import AccountError, stdio_account
from director.sandbox.launcher import SandboxError, stdio_launcher


def check_state_directory(settings: Settings) -> Result:
    name = "state-directory"
    path = Path(settings.state_directory)
    needed = settings.embedded_database or settings.auth_secret is None
    why = "it holds " + " and ".join(
        what for what, on in (("the private database", settings.embedded_database),
                              ("the generated secret", settings.auth_secret is None)) if on)
    if settings.embedded_database:
        socket_path = path / "postgres" / "run" / ".s.PGSQL.5432"
        if len(str(socket_path)) > 107:
            return Result(name, FAIL, f"{path} is too long for the cluster's socket path",
                          "set STATE_DIRECTORY to a shorter directory")
    if not path.exists():
        parent = path.parent
        while not parent.exists():
            parent = parent.parent
        if not needed:
            return Result(name, OK, f"{path} does not exist (not needed: DATABASE_URL and "
                                    "BETTER_AUTH_SECRET are set)")
        if os.access(parent, os.W_OK | os.X_OK):
            return Result(name, OK, f"{path} does not exist yet; it is created at the first "
                                    f"start ({why})")
        return Result(name, FAIL, f"{path} does not exist and {base.user_name()} cannot create it in "
                                  f"{parent}", f"create it: install -d -m 0700 -o director "
                                               f"-g director {path} (systemd's StateDirectory= "
                                               "does this for the service)")
    if not path.is_dir():
        return Result(name, FAIL, f"{path} is not a directory", "remove it or set STATE_DIRECTORY")
    info = path.stat()
    mode = stat.S_IMODE(info.st_mode)
    shown = f"{path} (mode {mode:04o} {owner_name(info)})"
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        return Result(name, FAIL if needed else WARN, f"{shown} is not writable by {base.user_name()}",
                      f"run as its owner or root, or chown it to the service's user ({why})"
                      if needed else "only needed without DATABASE_URL or BETTER_AUTH_SECRET")
    if mode & 0o066:
        return Result(name, WARN, f"{shown} is readable or writable by others",
                      f"chmod 0700 {path} (0711 when root runs the private cluster as another "
                      "user)")
    return Result(name, OK, shown)


def check_stdio_sandbox(settings: Settings) -> Result:
    """How this account's daemon would box stdio servers (``director.sandbox``)."""
    name = "stdio-sandbox"
    try:
        launcher = stdio_launcher(settings, stdio_account(settings.stdio_user), "")
    except (SandboxError, KeyError, AccountError) as refused:
        return Result(name, FAIL, str(refused), "see docs/operations.rst, \"The stdio sandbox\"")
    if launcher.mode == "systemd":
        root = Path(settings.stdio_cache_directory)
        info = root.stat()
        if stat.S_IMODE(info.st_mode) & 0o007 or not info.st_mode & stat.S_ISGID:
            return Result(name, WARN, f"{root} (mode {stat.S_IMODE(info.st_mode):04o} "
                                      f"{owner_name(info)}) lets others in, or lacks the setgid bit",
                          f"chmod 2710 {root} (systemd-tmpfiles --create director.conf)")
        return Result(name, OK, launcher.describe())
    fix = ("install the director package's director-stdio.socket and `systemctl enable --now "
           "director-stdio.socket`: each server then gets a sandbox of its own")
    if launcher.mode == "account":
        return Result(name, WARN, launcher.describe(), fix)
    return Result(name, FAIL if settings.production else WARN, launcher.describe(), fix)


# --- tools --------------------------------------------------------------------------------------


def _major(version_output: str) -> int | None:
    match = re.search(r"(\d+)(?:\.\d+)?", version_output)
    return int(match[1]) if match else None


def check_server_binaries(settings: Settings) -> Result:
    name = "postgres-binaries"
    if not settings.embedded_database:
        return Result(name, OK, "not needed (DATABASE_URL is set)")
    from director.db.embedded import EmbeddedDatabaseError, find_server_binaries

    try:
        bindir = find_server_binaries()
    except EmbeddedDatabaseError as error:
        return Result(name, FAIL, "no PostgreSQL server binaries for the private cluster",
                      str(error))
    try:
        version = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True,
                                 text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        return Result(name, FAIL, f"{bindir}/postgres does not run: {base.one_line(error)}",
                      "reinstall the server package (apt-get install --reinstall postgresql-15)")
    return Result(name, OK, f"{bindir} ({version})")


def check_pg_dump(server_version: int | None) -> Result:
    name = "pg-dump"
    found = shutil.which("pg_dump")
    if found is None:
        return Result(name, WARN, "pg_dump is not installed: no backups from this host",
                      "apt-get install postgresql-client")
    try:
        output = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=10,
                                check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        return Result(name, WARN, f"{found} does not run: {base.one_line(error)}", "")
    major = _major(output.rsplit(")", 1)[-1]) or _major(output)
    if server_version is not None and major is not None and major < server_version // 10000:
        return Result(name, WARN, f"pg_dump {major} is older than the server "
                                  f"({server_version // 10000}) and refuses to dump it",
                      f"install postgresql-client-{server_version // 10000} (PostgreSQL's apt "
                      "repository has every version)")
    return Result(name, OK, f"{found} ({output.strip()})")


def check_plugin_cache() -> Result:
    import importlib.util

    name = "plugin-cache"
    regenerate = ("regenerate it as the installing user: python -c 'from twisted.plugin import "
                  "IPlugin, getPlugins; list(getPlugins(IPlugin))' with the virtualenv's python")
    spec = importlib.util.find_spec("twisted.plugins.director_plugin")
    if spec is None or spec.origin is None:
        return Result(name, FAIL, "twisted/plugins/director_plugin.py is not installed: "
                                  "`twistd director` and `director serve` cannot start",
                      "reinstall Director")
    folder = Path(spec.origin).parent
    cache = folder / "dropin.cache"
    newest = max(p.stat().st_mtime for p in folder.glob("*.py"))
    writable = os.access(folder, os.W_OK)
    if cache.exists() and cache.stat().st_mtime >= newest:
        return Result(name, OK, f"{cache} is current")
    state = "is stale" if cache.exists() else "is missing"
    if writable:
        return Result(name, OK, f"{cache} {state}; twistd rewrites it at the next start",
                      "", (f"unless the service's user cannot write {folder}: then {regenerate}",))
    return Result(name, WARN, f"{cache} {state} and {base.user_name()} cannot write {folder}: twistd "
                              "rescans the plugins at every start", regenerate)


# --- running them -------------------------------------------------------------------------------
