"""The Director daemon as the bench runs it: a hermetic environment and a guaranteed stop.

The daemon is ``director --env-file= serve`` (the operator's command, without any
``/etc/director/director.env``), on 127.0.0.1, with ``LOG_LEVEL=warn`` so that logging does
not dominate what is measured. With the embedded database it starts a postmaster in its own
session; if that postmaster is still alive after the daemon has exited, the bench stops it
and records the leak (``leftover_postmasters``) because the daemon should have.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from bench.probe import HOST
from bench.reaper import Reaper, pid_alive, stop_pid
from bench.servers import Server, launch
from director.config import VARIABLES

#: Variables that would make a run depend on the calling shell or service manager.
_SCRUBBED = {variable.name for variable in VARIABLES} | {
    "DIRECTOR_ENV", "DIRECTOR_ENV_FILE", "NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC",
    "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
}


def director_command() -> list[str]:
    script = Path(sys.executable).parent / "director"
    found = str(script) if script.exists() else shutil.which("director")
    if found is None:
        raise SystemExit("bench: the `director` command is not installed; run `make .venv/.installed`")
    return [found, "--env-file=", "serve"]


def environment(port: int, state_directory: Path, database_url: str | None,
                extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in _SCRUBBED}
    # Every bench client signs up from 127.0.0.1; the per-address limit is not under test.
    env.update(PORT=str(port), HOST=HOST, LOG_LEVEL="warn", NODE_ENV="development",
               STATE_DIRECTORY=str(state_directory), SIGNUP_RATE_LIMIT_PER_HOUR="1000000",
               # Every load comes from 127.0.0.1, as through a proxy on the same host (the
               # "slow" group sets the cap itself).
               MAX_CONNECTIONS_PER_ADDRESS="0",
               # The address the bench's browsers and clients use: the edge accepts forms
               # only from BASE_URL's origin.
               BASE_URL=f"http://{HOST}:{port}")
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    env.update(extra or {})
    return env


def _postmaster_pid(state_directory: Path) -> int | None:
    try:
        pid = int((state_directory / "postgres" / "data" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    # initdb's bootstrap backend writes its pid negated; only a postmaster counts here.
    return pid if pid > 0 and pid_alive(pid) else None


def _reap_postmaster(reaper: Reaper, state_directory: Path, patience: float = 2.0) -> None:
    """Stop a postmaster that outlived its daemon by more than ``patience`` s; note either case.

    A postmaster that is merely finishing a shutdown it was asked for (the daemon's parent-death
    signal) is given ``patience`` to exit by itself before it counts as left behind.
    """
    pid = _postmaster_pid(state_directory)
    if pid is None:
        return
    started = time.monotonic()
    while time.monotonic() < started + patience and pid_alive(pid):
        time.sleep(0.02)
    if not pid_alive(pid):
        reaper.notes.append(f"the daemon exited {time.monotonic() - started:.2f} s before its "
                            f"PostgreSQL (pid {pid}) did")
    else:
        reaper.notes.append(f"the daemon exited but left its PostgreSQL (pid {pid}) running "
                            f"in {state_directory}; the bench stopped it")
        stop_pid(pid)


def start_director(reaper: Reaper, *, port: int, state_directory: Path, log_path: Path,
                   database_url: str | None = None,
                   extra_env: Mapping[str, str] | None = None) -> Server:
    """Start the daemon; returns once it is healthy (``server.readiness`` has the timings).

    ``extra_env`` adds or overrides configuration variables (``API_KEY_RATE_LIMIT_*``, …).
    """
    return launch(
        reaper, "director", director_command(),
        env=environment(port, state_directory, database_url, extra_env), port=port,
        log_path=log_path,
        after_stop=lambda: _reap_postmaster(reaper, state_directory),
    )


#: Logged at every start of a daemon the bench gives the stdio flag: its own choice, not news.
EXPECTED_WARNING = "dangerous setting: "


def log_findings(directory: Path, threshold: int = 40) -> list[str]:
    """What the daemons logged at ``threshold`` or above (40 = warn), one line per distinct
    message per log file: ``LOG_LEVEL=warn`` makes every line of their logs one of these."""
    found = []
    for path in sorted(directory.glob("director-*.log")):
        counts: dict[str, int] = {}
        for line in path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
                level = int(event.get("level", 0))
            except (ValueError, TypeError, AttributeError):
                event, level = {"msg": line}, threshold  # not JSON: a crash, say so
            text = str(event.get("msg", ""))
            if level < threshold or text.startswith(EXPECTED_WARNING):
                continue
            lines = text.strip().splitlines() or [""]
            summary = lines[0] + (f" … {lines[-1]}" if len(lines) > 1 else "")
            key = f"level {level}: {summary[:300]}"
            counts[key] = counts.get(key, 0) + 1
        found += [f"{path.name} logged {count}x {key}" for key, count in counts.items()]
    return found
