"""``WWW-Authenticate`` challenges (RFC 9110 §11.6.1), as an MCP server's 401 and 403 carry them.

Only the ``Bearer`` challenge matters here (RFC 6750 §3; RFC 9728 §5.1 adds
``resource_metadata``). Header values are parsed leniently, but nothing beyond the grammar is
guessed: several challenges may share one value, separated by commas, so a new challenge
starts at a token that is not followed by ``=``.
"""

from __future__ import annotations

import re

import attrs

#: A header value longer than this is not parsed (a server's mistake or an attack).
MAX_CHALLENGE_CHARS = 8192

_NAME = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAMETER = re.compile(
    rf'\s*({_NAME})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|({_NAME}=*))\s*(?:,|$)')
_SCHEME = re.compile(rf"\s*,?\s*({_NAME})(?:\s+|\s*$|\s*,)")


@attrs.frozen
class Challenge:
    """One challenge: its scheme (lower case) and its parameters (names lower case)."""

    scheme: str
    parameters: dict[str, str]

    @property
    def resource_metadata(self) -> str | None:
        return self.parameters.get("resource_metadata") or None

    @property
    def scope(self) -> str | None:
        return self.parameters.get("scope") or None

    @property
    def error(self) -> str | None:
        return self.parameters.get("error") or None


def parse(values: list[str]) -> list[Challenge]:
    """Every challenge of the ``WWW-Authenticate`` header values, in order."""
    found: list[Challenge] = []
    for value in values:
        if len(value) <= MAX_CHALLENGE_CHARS:
            found.extend(_challenges(value))
    return found


def bearer(values: list[str]) -> Challenge | None:
    """The first ``Bearer`` challenge, if any."""
    return next((c for c in parse(values) if c.scheme == "bearer"), None)


def _challenges(value: str) -> list[Challenge]:
    challenges: list[Challenge] = []
    position = 0
    while position < len(value):
        scheme = _SCHEME.match(value, position)
        if scheme is None:
            break
        position = scheme.end()
        parameters: dict[str, str] = {}
        while position < len(value):
            parameter = _PARAMETER.match(value, position)
            if parameter is None:
                break
            name, quoted, bare = parameter.groups()
            text = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
            parameters.setdefault(name.lower(), text)
            position = parameter.end()
        challenges.append(Challenge(scheme[1].lower(), parameters))
        if position < len(value) and _SCHEME.match(value, position) is None:
            break  # token68 or garbage: nothing more can be read reliably
    return challenges
