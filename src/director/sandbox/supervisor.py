"""The sandbox's end: the main process of a ``director-stdio@.service`` instance.

Stand-alone (standard library only; the unit runs ``python3 -I -S`` on it as the instance's
dynamic user). Its stdin is the connection ``client.py`` made: it reads the request and the
three descriptors passed with it, forks the server (its own session, those descriptors as
stdin/stdout/stderr, the request's environment, working directory and rlimits) and waits for
either end. The server exiting: ``exit N`` or ``signal N`` goes back to the client, and the
supervisor exits, so that systemd stops the unit and kills whatever the server left in its
cgroup. The client's messages: ``signal N`` is sent to the server's process group; the
connection closing (the daemon gone, or killing the server) kills the group.

A server killed by the cgroup's out-of-memory killer is reported in the server's stderr
(``memory.events``), since SIGKILL alone does not say why.
"""

import array
import contextlib
import json
import os
import resource
import select
import signal
import socket
import struct
import sys

MAX_REQUEST = 4 * 1024 * 1024


def receive_request(connection: socket.socket) -> tuple[dict, list[int]]:
    size = socket.CMSG_SPACE(3 * array.array("i").itemsize)
    data, ancillary, _, _ = connection.recvmsg(4, size)
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    while len(data) < 4:
        chunk = connection.recv(4 - len(data))
        if not chunk:
            raise ValueError("the connection closed before the request")
        data += chunk
    (length,) = struct.unpack("!I", data)
    if length > MAX_REQUEST:
        raise ValueError(f"request of {length} bytes")
    body = b""
    while len(body) < length:
        chunk = connection.recv(length - len(body))
        if not chunk:
            raise ValueError("the connection closed in the middle of the request")
        body += chunk
    request = json.loads(body)
    if len(fds) != 3:
        raise ValueError(f"{len(fds)} descriptors passed, not 3")
    return request, list(fds)


def run_server(request: dict, fds: list[int]) -> None:
    """In the forked child: become the server (never returns)."""
    try:
        os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, 65536)
        for signum in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM,
                       signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        limits = request.get("limits", {})
        if limits.get("data"):
            resource.setrlimit(resource.RLIMIT_DATA, (limits["data"], limits["data"]))
        if limits.get("nproc"):
            resource.setrlimit(resource.RLIMIT_NPROC, (limits["nproc"], limits["nproc"]))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        argv = request["argv"]
        if request.get("cwd"):
            try:
                os.chdir(request["cwd"])
            except OSError as error:
                os.write(2, f"can't cd to {request['cwd']}: {error.strerror}\n".encode())
                os._exit(127)
        os.execve(argv[0], argv, request["env"])  # noqa: S606 - the configured command
    except OSError as error:
        os.write(2, f"cannot run {request['argv'][0]}: {error.strerror}\n".encode())
    finally:
        os._exit(127)


def oom_kills() -> int:
    """The cgroup's out-of-memory kill count (0 when it cannot be read)."""
    try:
        with open("/proc/self/cgroup") as own:
            group = own.read().strip().split("::", 1)[-1]
        with open(f"/sys/fs/cgroup{group}/memory.events") as events:
            for line in events:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def supervise(connection: socket.socket, child: int, stderr: int, oom_before: int) -> str:
    """Wait for the server to end or the client to go; the report for the client."""
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    buffered = b""
    while True:
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid == child:
            break
        readable, _, _ = select.select([connection.fileno(), wake_read], [], [])
        if wake_read in readable:
            os.read(wake_read, 512)
        if connection.fileno() in readable:
            chunk = connection.recv(256)
            if not chunk:  # the client is gone: so is the server
                kill_group(child, signal.SIGKILL)
                os.waitpid(child, 0)
                return ""
            buffered += chunk
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                kind, _, value = line.decode(errors="replace").partition(" ")
                if kind == "signal" and value.isdigit():
                    kill_group(child, int(value))
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        if signum == signal.SIGKILL and oom_kills() > oom_before:
            os.write(stderr, b"director-stdio: killed by the out-of-memory killer: the server "
                             b"used all the memory its sandbox allows (MemoryMax=)\n")
        return f"signal {signum}\n"
    return f"exit {os.WEXITSTATUS(status)}\n"


def kill_group(child: int, signum: int) -> None:
    try:
        os.killpg(child, signum)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(child, signum)


def main() -> int:
    connection = socket.socket(fileno=os.dup(0))
    try:
        request, fds = receive_request(connection)
    except (OSError, ValueError) as error:
        sys.stderr.write(f"director-stdio: refused the request: {error}\n")
        return 2
    oom_before = oom_kills()
    child = os.fork()
    if child == 0:
        connection.close()
        run_server(request, fds)
    stderr = os.dup(fds[2])
    for fd in fds:
        os.close(fd)
    report = supervise(connection, child, stderr, oom_before)
    if report:
        with contextlib.suppress(OSError):
            connection.sendall(report.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
