"""Log output: Pino-compatible JSON lines on stdout, or native journald entries under systemd.

Every line is one JSON object with the fields the deployment guide shows (``level`` numeric,
``time`` in epoch milliseconds, ``name``, ``msg``) plus the event's structured context, so the
guide's log-shipping recipes keep working. When stdout is connected to the journal
(``JOURNAL_STREAM`` names our stdout), entries go to journald's native socket instead, with
``PRIORITY``, ``SYSLOG_IDENTIFIER`` and the context as upper-case fields (``PLAYBOOK_ID``,
``TRACE_ID``, ``SPAN_ID``: the span a line was logged in, with tracing on …), so
``journalctl -o json`` is directly shippable and ``journalctl -p warning`` filters by severity.
If the journal socket refuses an entry, that entry falls back to stdout.

twistd selects this with ``--logger=director.logs.observer`` (``director serve`` and the
plugin do that for you).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import sys
import time
from collections.abc import Iterable, Mapping
from typing import IO, Any

from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer

from director import tracing

#: Pino's numeric levels. Twisted has no "trace"; LOG_LEVEL=trace shows debug and below.
PINO_LEVEL = {
    LogLevel.debug: 20,
    LogLevel.info: 30,
    LogLevel.warn: 40,
    LogLevel.error: 50,
    LogLevel.critical: 60,
}
THRESHOLD = {"trace": 10, "debug": 20, "info": 30, "warn": 40, "error": 50, "fatal": 60,
             "silent": 1000}
SYSLOG_PRIORITY = {20: 7, 30: 6, 40: 4, 50: 3, 60: 2}
JOURNAL_SOCKET = "/run/systemd/journal/socket"
#: Overridable only so tests can stand in for journald with a socket of their own.
JOURNAL_SOCKET_VARIABLE = "DIRECTOR_JOURNAL_SOCKET"
#: ``SYSLOG_IDENTIFIER`` of the daemon's own journal entries; ``director@.service`` sets the
#: variable to its ``SyslogIdentifier=`` (``director-%i``), which systemd does not pass on.
IDENTIFIER = os.environ.get("DIRECTOR_LOG_IDENTIFIER") or "director"
#: journald's stream prefix for priority "err" (``SyslogLevelPrefix=``, on by default).
JOURNAL_ERR_PREFIX = "<3>"

_SKIP_KEYS = frozenset({"format", "message", "isError", "system", "time", "failure", "why"})
_FIELD_UNSAFE = re.compile(r"[^A-Z0-9_]")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def _context(event: Mapping[str, Any]) -> dict[str, Any]:
    context = {}
    for key, value in event.items():
        if key.startswith("log_") or key in _SKIP_KEYS:
            continue
        context[key] = value
    return context


def to_record(event: Mapping[str, Any]) -> dict[str, Any]:
    """The Pino-shaped dictionary for one Twisted log event."""
    level = PINO_LEVEL.get(event.get("log_level", LogLevel.info), 30)
    record: dict[str, Any] = _context(event)
    # The Pino fields win over any context key of the same name.
    record |= {
        "level": level,
        "time": int(event.get("log_time", time.time()) * 1000),
        "pid": os.getpid(),
        "name": event.get("log_namespace", IDENTIFIER),
        "msg": formatEvent(dict(event)) if event.get("log_format") is not None else "",
    }
    if tracing.TRACER is not None and "span_id" not in record:
        _add_span(record)
    failure = event.get("log_failure")
    if failure is not None:
        record["err"] = {
            "type": failure.type.__name__ if failure.type else "Error",
            "message": str(failure.value),
            "stack": failure.getTraceback(),
        }
        if not record["msg"]:
            record["msg"] = str(failure.value)
    return record


def _add_span(record: dict[str, Any]) -> None:
    """With tracing on, a line logged within a span names it beside its trace (``span_id``);
    a line that names another trace (a request's, logged elsewhere) is left alone."""
    span = tracing.current()
    if span is None:
        return
    trace_id, span_id = tracing.hex_ids(span)
    if not record.get("trace_id"):
        record["trace_id"] = trace_id
    if record["trace_id"] == trace_id:
        record["span_id"] = span_id


def _journal_field(key: str) -> str:
    name = _FIELD_UNSAFE.sub("_", _CAMEL.sub("_", key).upper()).lstrip("_")
    return name[:64] or "FIELD"


def _journal_entry(record: Mapping[str, Any]) -> bytes:
    fields: dict[str, str] = {
        "MESSAGE": record["msg"],
        "PRIORITY": str(SYSLOG_PRIORITY.get(record["level"], 6)),
        "SYSLOG_IDENTIFIER": IDENTIFIER,
        "LOGGER_NAME": str(record["name"]),
    }
    for key, value in record.items():
        if key in ("msg", "level", "time", "name", "pid"):
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        fields[_journal_field(key)] = text
    chunks = []
    for name, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            chunks.append(name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            chunks.append(name.encode() + b"=" + data + b"\n")
    return b"".join(chunks)


def stdout_is_journal(environ: Mapping[str, str] = os.environ, stream: IO[str] | None = None) -> bool:
    """systemd sets JOURNAL_STREAM=<dev>:<inode> of the stream it connected to the journal."""
    value = environ.get("JOURNAL_STREAM", "")
    if ":" not in value:
        return False
    try:
        device, inode = (int(part) for part in value.split(":", 1))
        stat = os.fstat((stream or sys.stdout).fileno())
    except (ValueError, OSError):
        return False
    return stat.st_dev == device and stat.st_ino == inode


def print_problems(lines: Iterable[str], stream: IO[str] | None = None) -> None:
    """Why the daemon refuses to run, one line each on stderr — at priority "err" when stderr
    is the journal, so that ``journalctl -p err -u director`` shows it next to the unit's
    failure (a plain stream line would be "info")."""
    stream = stream or sys.stderr
    prefix = JOURNAL_ERR_PREFIX if stdout_is_journal(stream=stream) else ""
    for line in lines:
        print(prefix + line, file=stream)


@implementer(ILogObserver)
class DirectorLogObserver:
    """Filters by level and writes each event as JSON, or to journald when asked to."""

    def __init__(self, level: str = "info", stream: IO[str] | None = None,
                 journal_socket: str | None = None) -> None:
        self.threshold = THRESHOLD.get(level, 30)
        self.stream = stream or sys.stdout
        self._journal: socket.socket | None = None
        self._journal_address = journal_socket
        if journal_socket:
            self._journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def __call__(self, event: Mapping[str, Any]) -> None:
        if PINO_LEVEL.get(event.get("log_level", LogLevel.info), 30) < self.threshold:
            return
        record = to_record(event)
        if self._journal is not None and self._send_to_journal(record):
            return
        try:
            self.stream.write(json.dumps(record, default=str, ensure_ascii=False) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stdout gone (closed pipe): nowhere left to complain to

    def _send_to_journal(self, record: Mapping[str, Any]) -> bool:
        assert self._journal is not None and self._journal_address is not None
        entry = _journal_entry(record)
        try:
            self._journal.sendto(entry, self._journal_address)
            return True
        except OSError:
            return self._send_large_to_journal(entry)

    def _send_large_to_journal(self, entry: bytes) -> bool:
        """Entries above the datagram limit travel as a sealed memfd (journald's protocol)."""
        import fcntl

        try:
            fd = os.memfd_create("journal-entry", os.MFD_ALLOW_SEALING)
        except (AttributeError, OSError):
            return False
        try:
            os.write(fd, entry)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                        | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            assert self._journal is not None and self._journal_address is not None
            self._journal.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        struct.pack("i", fd))], 0, self._journal_address)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)


class _StdlibToTwisted(logging.Handler):
    """Routes stdlib ``logging`` (psycopg2, cryptography, …) into the same output."""

    def emit(self, record: logging.LogRecord) -> None:
        from twisted.logger import Logger

        level = (LogLevel.critical if record.levelno >= logging.CRITICAL
                 else LogLevel.error if record.levelno >= logging.ERROR
                 else LogLevel.warn if record.levelno >= logging.WARNING
                 else LogLevel.info if record.levelno >= logging.INFO else LogLevel.debug)
        Logger(namespace=record.name).emit(level, "{text}", text=record.getMessage())


def observer() -> DirectorLogObserver:
    """twistd ``--logger`` factory: level from LOG_LEVEL, journald when stdout is the journal."""
    level = os.environ.get("LOG_LEVEL", "").strip().lower() or "info"
    socket_path = os.environ.get(JOURNAL_SOCKET_VARIABLE) or JOURNAL_SOCKET
    journal = socket_path if stdout_is_journal() and os.path.exists(socket_path) else None
    root = logging.getLogger()
    if not any(isinstance(handler, _StdlibToTwisted) for handler in root.handlers):
        root.addHandler(_StdlibToTwisted())
        root.setLevel(logging.WARNING)
    return DirectorLogObserver(level, journal_socket=journal)
