"""Where a playbook document's problems are: ``DocumentInvalid`` (each path's problem, and its
line and column in the text) and the ``Locator`` that records where every part of a document is.

Shared by ``director.playbooks.documents`` (the schema) and ``director.playbooks.yaml_text``
(the YAML text, which documents imports only when a document is read or written).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs

from director.accounts.validation import ValidationFailed

ROOT = "$"  # the path naming the document as a whole (syntax errors, size, encoding)


@attrs.frozen
class Problem:
    path: str
    message: str
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based

    def where(self) -> str:
        return "" if self.line is None else f"{self.line}:{self.column}"


class DocumentInvalid(ValidationFailed):
    """Problems with a document: ``fields`` maps each path to its problem (as every
    ``ValidationFailed`` does) and ``locations`` each path to its ``(line, column)``."""

    def __init__(self, fields: dict[str, str],
                 locations: Mapping[str, tuple[int, int]] | None = None) -> None:
        super().__init__(fields)
        self.locations = dict(locations or {})

    def problems(self) -> list[Problem]:
        found = [Problem(path, message, *self.locations.get(path, (None, None)))
                 for path, message in self.fields.items()]
        return sorted(found, key=lambda p: (p.line or 0, p.column or 0, p.path))

    def lines(self, source: str) -> list[str]:
        """``source:line:column: path: message``, one per problem, in document order."""
        lines = []
        for problem in self.problems():
            where = f"{source}:{problem.where()}:" if problem.line is not None else f"{source}:"
            what = problem.message if problem.path == ROOT else f"{problem.path}: {problem.message}"
            lines.append(f"{where} {what}")
        return lines

    def summary(self) -> str:
        """Every problem on one line: ``servers[0].url (line 5, column 10): must be …``."""
        return "; ".join(
            (problem.message if problem.path == ROOT else f"{problem.path}: {problem.message}")
            if problem.line is None else
            (f"line {problem.line}, column {problem.column}: {problem.message}"
             if problem.path == ROOT else
             f"{problem.path} (line {problem.line}, column {problem.column}): "
             f"{problem.message}")
            for problem in self.problems())

    def details(self) -> dict[str, Any]:
        """The ``details`` of a 400 answer: ``fields`` and ``locations`` keyed by path."""
        return {"fields": dict(self.fields),
                "locations": {path: {"line": line, "column": column}
                              for path, (line, column) in self.locations.items()
                              if path in self.fields}}


class Locator:
    """Path → (line, column) of every value and mapping key of the document, 1-based."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[int, int]] = {}
        self.keys: dict[str, tuple[int, int]] = {}
        self.unquoted: dict[str, tuple[str, str]] = {}  # plain scalars YAML did not read as text
        self.typed: list[tuple[str, Any]] = []  # scalars to convert (numbers, dates, …)

    def locate(self, path: str, message: str) -> tuple[int, int] | None:
        if path in self.keys and (message in _KEY_PROBLEMS or path not in self.values
                                  or self.values[path][0] > self.keys[path][0]):
            return self.keys[path]  # about the key, or a block value that starts below it
        while True:
            if path in self.values:
                return self.values[path]
            if path == ROOT:
                return None
            path = _parent(path)

    def invalid(self, fields: Mapping[str, str]) -> DocumentInvalid:
        explained = {path: self._explain(path, message) for path, message in fields.items()}
        located = {path: where for path in fields
                   if (where := self.locate(path, fields[path])) is not None}
        return DocumentInvalid(explained, located)

    def _explain(self, path: str, message: str) -> str:
        """``yes``, ``010`` or ``2024-01-01`` unquoted are not text in YAML: say so."""
        if message == "must be a string" and path in self.unquoted:
            text, tag = self.unquoted[path]
            kind = _KINDS.get(tag.rsplit(":", 1)[-1], "something else")
            return f"must be a string (YAML reads the unquoted {text!r} as {kind}: quote it)"
        return message


#: Problems with a mapping key rather than its value: located at the key.
_KEY_PROBLEMS = {"is not a known field", "must be an environment variable name",
                 "must be an HTTP header name", "the name must not end with a line break"}
_KINDS = {"bool": "a boolean", "int": "a number", "float": "a number", "null": "null",
          "timestamp": "a date"}


def _parent(path: str) -> str:
    match = re.fullmatch(r"(.+?)(?:\[\d+\]|\.[^.\[\]]*)", path)
    return match[1] if match else ROOT


def child_path(path: str, key: str) -> str:
    return key if path == ROOT else f"{path}.{key}"
