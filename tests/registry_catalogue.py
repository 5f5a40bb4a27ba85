"""The catalogue the tests' local registry serves: a real npm server in two versions, a remote,
and odd and hostile entries (missing fields, a huge description, unknown package types,
injection attempts in arguments, versions that are not versions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EVERYTHING = "io.github.modelcontextprotocol/everything"
EVERYTHING_PACKAGE = "@modelcontextprotocol/server-everything"
OLD, NEW = "2026.8.18", "2026.8.31"
OFFICIAL = "io.modelcontextprotocol.registry/official"


def _everything(version: str, latest: bool) -> dict[str, Any]:
    return {"server": {
        "$schema": "https://static.modelcontextprotocol.io/schemas/2025-09-29/server.schema.json",
        "name": EVERYTHING, "title": "Everything", "version": version,
        "description": "MCP server that exercises all the features of the MCP protocol",
        "repository": {"url": "https://github.com/modelcontextprotocol/servers",
                       "source": "github"},
        "packages": [{
            "registryType": "npm", "registryBaseUrl": "https://registry.npmjs.org",
            "identifier": EVERYTHING_PACKAGE, "version": version,
            "transport": {"type": "stdio"},
            "packageArguments": [{"type": "positional", "valueHint": "transport",
                                  "value": "stdio"}],
            "environmentVariables": [
                {"name": "EVERYTHING_TOKEN", "description": "A token (ignored)",
                 "isRequired": True, "isSecret": True},
                {"name": "EVERYTHING_MODE", "description": "A choice", "default": "calm",
                 "choices": ["calm", "busy"]},
            ]}],
    }, "_meta": {OFFICIAL: {"status": "active", "isLatest": latest,
                            "publishedAt": "2026-08-31T00:00:00Z"}}}


def _server(name: str, **fields: Any) -> dict[str, Any]:
    return {"server": {"name": name, "version": "1.0.0", "description": name, **fields}}


def _npm(identifier: str = "left-pad", version: str = "1.3.0", **extra: Any) -> dict[str, Any]:
    return {"registryType": "npm", "identifier": identifier, "version": version,
            "transport": {"type": "stdio"}, **extra}


HOSTILE = [
    {"server": {"description": "no name at all", "version": "1.0.0"}},
    {"server": {"name": "io.example/no-version", "description": "no version"}},
    {"server": {"name": "not a name; rm -rf /", "version": "1.0.0"}},
    "not even an object",
    _server("io.example/huge", description="A" * 1_000_000),
    _server("io.example/container", packages=[{
        "registryType": "oci", "identifier": "docker.io/example/server", "version": "1.0.0",
        "transport": {"type": "stdio"}}]),
    _server("io.example/bogus-type", packages=[_npm() | {"registryType": "bogus"}]),
    _server("io.example/flag-injection", packages=[_npm(packageArguments=[
        {"type": "named", "name": "--x; rm -rf /", "value": "1"}])]),
    _server("io.example/identifier-injection", packages=[_npm("--registry=http://evil")]),
    _server("io.example/latest", packages=[_npm(version="latest")]),
    _server("io.example/range", packages=[_npm(version="^1.0.0")]),
    _server("io.example/runtime-args", packages=[_npm(runtimeArguments=[
        {"type": "named", "name": "--registry", "value": "http://evil"}])]),
    _server("io.example/other-npm", packages=[_npm(registryBaseUrl="https://npm.evil.example")]),
    _server("io.example/no-packages"),
    _server("io.example/metadata-service", remotes=[
        {"type": "streamable-http", "url": "http://169.254.169.254/latest/meta-data"}]),
    # A value with a shell metacharacter is passed as one argument, never through a shell.
    _server("io.example/shell-arguments", packages=[_npm(packageArguments=[
        {"type": "positional", "valueHint": "path", "isRequired": True,
         "format": "filepath"}])]),
]

REMOTE = _server("io.example/weather", remotes=[{
    "type": "streamable-http", "url": "https://{tenant}.weather.example/mcp",
    "variables": {"tenant": {"description": "Your tenant", "isRequired": True}},
    "headers": [{"name": "Authorization", "value": "Bearer {token}", "isRequired": True,
                 "variables": {"token": {"isSecret": True, "isRequired": True}}}]}])


def catalogue(latest: str = NEW) -> dict[str, Any]:
    versions = [_everything(OLD, latest == OLD)] + ([_everything(NEW, True)]
                                                    if latest == NEW else [])
    return {"servers": [*versions, REMOTE, *HOSTILE]}


def write(path: Path, latest: str = NEW) -> Path:
    path.write_text(json.dumps(catalogue(latest)))
    path.chmod(0o644)
    return path
