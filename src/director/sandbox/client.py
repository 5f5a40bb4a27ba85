"""The daemon's end of a systemd-sandboxed stdio server (run as ``python3 -I -S client.py SOCKET``).

Stand-alone (standard library only, no ``director`` import: it starts in milliseconds). It
connects to ``director-stdio.socket``, whose connection systemd hands to a new
``director-stdio@.service`` instance running ``supervisor.py``, and sends a 4-byte length, the
request (JSON, from ``$DIRECTOR_STDIO_REQUEST``) and, with the first byte, its own stdin, stdout
and stderr (SCM_RIGHTS): the server then reads and writes the daemon's pipes directly. It keeps
only stderr, for its own messages, and stays until the supervisor reports how the server ended:
``exit N`` (it exits N) or ``signal N`` (it kills itself with N), so that the daemon sees the
server's own exit. SIGTERM, SIGINT and SIGHUP are forwarded; when the client dies (SIGKILL, the
daemon gone), the supervisor sees the connection close and kills the server.
"""

import array
import contextlib
import os
import signal
import socket
import struct
import sys

REQUEST_VARIABLE = "DIRECTOR_STDIO_REQUEST"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: Exit status when the sandbox could not be reached or ended without a report.
UNREACHABLE = 126


def say(text: str) -> None:
    os.write(2, f"director-stdio: {text}\n".encode())


def connect(path: str, request: bytes) -> socket.socket:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect(path)
    data = struct.pack("!I", len(request)) + request
    fds = array.array("i", [0, 1, 2])
    sent = connection.sendmsg([data[:4]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    connection.sendall(data[sent:])
    return connection


def release_stdio() -> None:
    """Drop our copies of the server's stdin and stdout: the daemon must see the server's
    stdout close when the server's does."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)


def wait_for_report(connection: socket.socket) -> tuple[str, int]:
    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            connection.sendall(f"signal {signum}\n".encode())

    for signum in FORWARDED:
        signal.signal(signum, forward)
    buffered = b""
    while b"\n" not in buffered:
        chunk = connection.recv(256)
        if not chunk:
            return "lost", 0
        buffered += chunk
    kind, _, value = buffered.split(b"\n", 1)[0].decode().partition(" ")
    return kind, int(value or 0)


def main() -> int:
    path = sys.argv[1]
    request = os.environ.get(REQUEST_VARIABLE, "").encode()
    try:
        connection = connect(path, request)
    except OSError as error:
        say(f"cannot reach the stdio sandbox at {path}: {error.strerror or error} (is "
            "director-stdio.socket running?)")
        return UNREACHABLE
    release_stdio()
    kind, value = wait_for_report(connection)
    if kind == "exit":
        return value
    if kind == "signal":
        for signum in FORWARDED:
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), value)
        return 128 + value
    say("the sandbox ended without saying how the server ended (see the journal of its "
        "director-stdio@ unit)")
    return UNREACHABLE


if __name__ == "__main__":
    sys.exit(main())
