"""A private PostgreSQL cluster under the state directory, for when DATABASE_URL is unset.

Built on the system's own server binaries (``/usr/lib/postgresql/<major>/bin``), listening on
a unix socket only (``listen_addresses=''``), with ``trust`` authentication on that socket:
the socket directory is mode 0700, so only the daemon's own user can reach it.

The same code serves the daemon, the ``director`` command and the test harness, so it is
synchronous; the daemon runs the slow parts (initdb, waiting) in a thread. The postmaster is
started from the calling thread with ``PR_SET_PDEATHSIG`` so that it receives SIGINT (fast
shutdown) when the process that started it dies, even by SIGKILL. An *owner* file records which
process started the cluster: a live owner means "shared, leave it running when done"; a dead
owner means "orphan, adopt it". A postmaster that ends while the daemon runs (stopped or killed
from outside) is noticed by ``ExitWatch`` and reaped (``reap``): no defunct child is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.interfaces import IReadDescriptor
from zope.interface import implementer

DATABASE_NAME = "director"
ROLE_NAME = "director"
_PR_SET_PDEATHSIG = 1
_MAX_SOCKET_PATH = 107


class EmbeddedDatabaseError(Exception):
    """The private cluster could not be prepared or started; the message says why and what to do."""


def find_server_binaries() -> Path:
    """The newest installed PostgreSQL server ``bin`` directory."""
    override = os.environ.get("DIRECTOR_PG_BINDIR")
    candidates = [override] if override else []
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda path: int(Path(path).parent.name) if Path(path).parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates += ["/usr/local/pgsql/bin"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "postgres").is_file():
            return Path(candidate)
    raise EmbeddedDatabaseError(
        "no PostgreSQL server binaries found (looked in /usr/lib/postgresql/*/bin); install them "
        "with `apt-get install postgresql` or set DATABASE_URL to an existing database"
    )


def _set_parent_death_signal() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGINT)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@attrs.define
class EmbeddedPostgres:
    """One private cluster: ``<state>/postgres/data`` plus its socket in ``<state>/postgres/run``."""

    state_directory: Path
    fast_and_unsafe: bool = False  # fsync off: for throwaway test clusters only
    _process: subprocess.Popen[bytes] | None = attrs.field(default=None, init=False)
    _owns_server: bool = attrs.field(default=False, init=False)

    @property
    def root(self) -> Path:
        return self.state_directory / "postgres"

    @property
    def data_directory(self) -> Path:
        return self.root / "data"

    @property
    def socket_directory(self) -> Path:
        return self.root / "run"

    @property
    def owner_file(self) -> Path:
        return self.root / "owner.pid"

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    def dsn(self, database: str = DATABASE_NAME) -> str:
        return f"host={self.socket_directory} port=5432 dbname={database} user={ROLE_NAME}"

    def url(self, database: str = DATABASE_NAME) -> str:
        from urllib.parse import quote

        return f"postgresql://{ROLE_NAME}@/{database}?host={quote(str(self.socket_directory))}"

    # --- who runs postgres -------------------------------------------------------------------

    def _server_account(self) -> pwd.struct_passwd | None:
        """PostgreSQL refuses to run as root; as root we run it as ``postgres`` (or nobody)."""
        if os.geteuid() != 0:
            return None
        if self.data_directory.exists():
            # An existing cluster keeps its owner (e.g. the packaged service's user).
            owner = os.stat(self.data_directory).st_uid
            if owner != 0:
                return pwd.getpwuid(owner)
        for name in ("director", "postgres", "nobody"):
            try:
                return pwd.getpwnam(name)
            except KeyError:
                continue
        raise EmbeddedDatabaseError(
            "running as root, but none of the users director, postgres, nobody exists"
        )

    def server_account(self) -> pwd.struct_passwd | None:
        """The account the cluster runs as; None when it runs as the daemon (not root)."""
        return self._server_account()

    def _prepare_directories(self) -> None:
        account = self._server_account()
        socket_path = self.socket_directory / ".s.PGSQL.5432"
        if len(str(socket_path)) > _MAX_SOCKET_PATH:
            raise EmbeddedDatabaseError(
                f"the socket path {socket_path} is longer than {_MAX_SOCKET_PATH} bytes; "
                "set STATE_DIRECTORY to a shorter directory"
            )
        self.state_directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.root.mkdir(exist_ok=True, mode=0o700)
        self.socket_directory.mkdir(exist_ok=True, mode=0o700)
        if account is None:
            return
        # The server account must traverse the state directory (but not list it) and own
        # its own tree. We only ever loosen the state directory itself, which we own.
        os.chmod(self.state_directory, os.stat(self.state_directory).st_mode | 0o111)  # noqa: S103
        for path in (self.root, self.socket_directory):
            os.chown(path, account.pw_uid, account.pw_gid)
        if self.data_directory.exists():
            os.chown(self.data_directory, account.pw_uid, account.pw_gid)
        probe = subprocess.run(
            ["test", "-x", str(self.root)],
            user=account.pw_uid, group=account.pw_gid, extra_groups=[], check=False,
        )
        if probe.returncode != 0:
            raise EmbeddedDatabaseError(
                f"user {account.pw_name} cannot reach {self.root}: a parent directory is not "
                "traversable; set STATE_DIRECTORY to a directory such as /var/lib/director"
            )

    def _run_as_server(self, argv: list[str]) -> subprocess.CompletedProcess[bytes]:
        account = self._server_account()
        extra: dict[str, object] = {}
        if account is not None:
            extra = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        return subprocess.run(
            argv, capture_output=True, check=False, cwd=str(self.root), **extra  # type: ignore[call-overload]
        )

    # --- lifecycle ---------------------------------------------------------------------------

    def initialise(self) -> bool:
        """Create the cluster if it does not exist yet. Returns True when it was created."""
        self._prepare_directories()
        if (self.data_directory / "PG_VERSION").exists():
            return False
        if self.data_directory.exists():
            # A half-made cluster from an interrupted initdb: start over.
            import shutil

            shutil.rmtree(self.data_directory)
        bindir = find_server_binaries()
        result = self._run_as_server([
            str(bindir / "initdb"), "-D", str(self.data_directory), "-U", ROLE_NAME,
            "--auth-local=trust", "--auth-host=reject", "-E", "UTF8", "--locale=C.UTF-8",
            "--no-sync", "--no-instructions",
        ])
        if result.returncode != 0:
            raise EmbeddedDatabaseError(
                f"initdb failed (exit {result.returncode}): "
                + result.stderr.decode(errors="replace").strip()[-500:]
            )
        return True

    def running_postmaster(self) -> int | None:
        """The pid of a live postmaster on our data directory, if any."""
        try:
            lines = (self.data_directory / "postmaster.pid").read_text().splitlines()
            pid = int(lines[0])
        except (OSError, ValueError, IndexError):
            return None
        if _pid_alive(pid) and _process_name(pid) in ("postgres", "postmaster"):
            return pid
        return None

    def _ready_status(self) -> bool:
        try:
            lines = (self.data_directory / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        if self._process is not None and lines[:1] != [str(self._process.pid)]:
            return False  # a stale file, left by a postmaster that was killed (SIGKILL)
        return len(lines) >= 8 and lines[7].strip() == "ready"

    def _owner_alive(self) -> bool:
        try:
            pid = int(self.owner_file.read_text().strip())
        except (OSError, ValueError):
            return False
        return pid != os.getpid() and _pid_alive(pid)

    def launch(self) -> str:
        """Start (or adopt) the postmaster; call from the thread that will live longest.

        Returns one of ``started``, ``adopted`` (an orphan of a killed daemon, now ours) or
        ``shared`` (another live director process runs it; we leave it running when done).
        """
        existing = self.running_postmaster()
        if existing is not None:
            if self._owner_alive():
                self._owns_server = False
                return "shared"
            self.owner_file.write_text(str(os.getpid()))
            self._owns_server = True
            return "adopted"
        account = self._server_account()
        bindir = find_server_binaries()
        options = [
            "-D", str(self.data_directory), "-k", str(self.socket_directory),
            "-c", "listen_addresses=", "-c", "unix_socket_permissions=0700",
            "-c", "max_connections=200", "-c", "logging_collector=off",
        ]
        if self.fast_and_unsafe:
            options += ["-c", "fsync=off", "-c", "synchronous_commit=off",
                        "-c", "full_page_writes=off"]
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child
        extra: dict[str, object] = {}
        if account is not None:
            os.chown(self.log_file, account.pw_uid, account.pw_gid)
            extra = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        try:
            self._process = subprocess.Popen(  # type: ignore[call-overload]
                [str(bindir / "postgres"), *options],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=str(self.root),
                preexec_fn=_set_parent_death_signal, start_new_session=True, **extra,
            )
        finally:
            log.close()
        self.owner_file.write_text(str(os.getpid()))
        self._owns_server = True
        return "started"

    def poll_ready(self) -> bool:
        """True once the server accepts connections; raises if our child died first."""
        if self._process is not None and self._process.poll() is not None:
            raise EmbeddedDatabaseError(
                f"postgres exited with status {self._process.returncode} while starting; "
                f"see {self.log_file}: {self._log_tail()}"
            )
        return self._ready_status() and (self.socket_directory / ".s.PGSQL.5432").exists()

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log_file.read_text(errors="replace").splitlines()[-3:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.poll_ready():
            if time.monotonic() > deadline:
                raise EmbeddedDatabaseError(
                    f"postgres did not become ready within {timeout:.0f} s; see {self.log_file}"
                )
            time.sleep(0.02)

    def ensure_database(self) -> None:
        """Create the ``director`` database inside the cluster if it is missing."""
        import psycopg2

        connection = psycopg2.connect(self.dsn("postgres"))
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
        finally:
            connection.close()

    def start(self, timeout: float = 30.0) -> str:
        """Synchronous start for the CLI and the test harness."""
        self.initialise()
        outcome = self.launch()
        self.wait_ready(timeout)
        self.ensure_database()
        return outcome

    def owned_postmaster(self) -> int | None:
        """The pid of the postmaster this process started or adopted (a shared one is watched
        by its owner), while it runs."""
        if not self._owns_server:
            return None
        if self._process is not None:
            return self._process.pid if self._process.poll() is None else None
        return self.running_postmaster()

    def reap(self) -> str:
        """Collect the exit of a postmaster that ended without us (so that no zombie is left)
        and say how it ended."""
        if self._process is None:
            return "it was adopted, its exit status is unknown"
        status = self._process.wait()
        if status < 0:
            return f"killed by {signal.Signals(-status).name}"
        return f"exit status {status}"

    def stop(self, timeout: float = 10.0) -> None:
        """Fast shutdown (SIGINT) of a server we own; SIGQUIT when it overstays ``timeout``."""
        if not self._owns_server:
            return
        # Never a pid that was already reaped: the kernel may have given it to another process.
        pid = self.owned_postmaster()
        if pid is None:
            self._disown()
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None:
                if self._process.poll() is not None:
                    break
            elif not _pid_alive(pid):
                break
            time.sleep(0.02)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGQUIT)
            if self._process is not None:
                self._process.wait(5)
        self._disown()

    def _disown(self) -> None:
        with contextlib.suppress(OSError):
            self.owner_file.unlink()
        self._owns_server = False
        self._process = None


@implementer(IReadDescriptor)
class ExitWatch:
    """Calls ``on_exit()`` once when process ``pid`` ends, from the reactor.

    A Linux pidfd turns readable when the process exits, whether or not it is our child, so an
    adopted postmaster is watched the same way and nothing polls. The caller reaps a child of
    its own (``EmbeddedPostgres.reap``): Twisted's SIGCHLD handling only reaps the processes
    Twisted itself spawned."""

    def __init__(self, reactor: Any, pid: int, on_exit: Callable[[], object]) -> None:
        self.reactor = reactor
        self.on_exit = on_exit
        self.fd: int | None = None
        try:
            self.fd = os.pidfd_open(pid)
        except ProcessLookupError:  # gone already
            reactor.callLater(0, on_exit)
            return
        reactor.addReader(self)

    def fileno(self) -> int:
        return -1 if self.fd is None else self.fd

    def doRead(self) -> None:
        self.stop()
        self.on_exit()

    def stop(self) -> None:
        """Stop watching (before stopping the process on purpose)."""
        if self.fd is not None:
            self.reactor.removeReader(self)
            os.close(self.fd)
            self.fd = None

    def connectionLost(self, reason: object) -> None:
        self.stop()

    def logPrefix(self) -> str:
        return "ExitWatch"
