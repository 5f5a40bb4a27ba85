"""The playbook router: one MCP server made of a playbook's upstream servers and prompts.

Lists are aggregated in the playbook's server order (then each upstream's own order), so they
are deterministic. Tool names pass through verbatim unless the server has a prefix (used as
given, no separator added); ``include``/``exclude`` filter on the upstream's own names. When
two servers expose the same name, the earlier server wins and the shadowed entries are
reported in the list result's ``_meta`` (``director/shadowed``) and in the log — never
silently. Disabled servers and upstreams that cannot be reached contribute nothing.

Everything an upstream returns (schemas, contents, ``_meta``) is passed through untouched;
only tool names are rewritten when a prefix applies.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from director.mcp.jsonrpc import INVALID_PARAMS, RESOURCE_NOT_FOUND, ProtocolError, error_of
from director.mcp.upstream.base import UpstreamError, UpstreamRequestError
from director.mcp.upstreams import Upstream
from director.playbooks.model import Prompt, Server
from director.playbooks.store import Playbook

log = Logger(namespace="mcp.router")

SHADOWED_META = "director/shadowed"
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_.-]+)\s*\}\}")

#: ``fetch(server) -> the upstream, started`` (None when unavailable).
Fetch = Callable[[Server], Awaitable[Upstream | None]]


@attrs.frozen
class Routes:
    """Exposed name -> (server, upstream name), per kind, as of the last list."""

    tools: dict[str, tuple[str, str]] = attrs.field(factory=dict)
    prompts: dict[str, str] = attrs.field(factory=dict)
    resources: dict[str, str] = attrs.field(factory=dict)
    templates: list[tuple[re.Pattern[str], str, str]] = attrs.field(factory=list)


def enabled_servers(playbook: Playbook) -> list[Server]:
    return [server for server in playbook.servers if not server.disabled]


def tool_visible(server: Server, name: str) -> bool:
    if server.include is not None:
        return name in server.include
    return server.exclude is None or name not in server.exclude


def render_prompt(prompt: Prompt, arguments: dict[str, Any]) -> dict[str, Any]:
    """``prompts/get`` of a playbook prompt: its body, arguments substituted, as one message."""
    missing = [a.name for a in prompt.arguments if a.required and a.name not in arguments]
    if missing:
        raise ProtocolError(INVALID_PARAMS, f"missing required argument(s): {', '.join(missing)}")
    text = _PLACEHOLDER.sub(
        lambda match: str(arguments.get(match[1], match[0])), prompt.body)
    result: dict[str, Any] = {"messages": [{"role": "user",
                                            "content": {"type": "text", "text": text}}]}
    if prompt.description:
        result["description"] = prompt.description
    return result


def prompt_entry(prompt: Prompt) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": prompt.name}
    if prompt.title:
        entry["title"] = prompt.title
    if prompt.description:
        entry["description"] = prompt.description
    if prompt.arguments:
        entry["arguments"] = [
            {"name": a.name, **({"description": a.description} if a.description else {}),
             "required": a.required} for a in prompt.arguments]
    return entry


def template_pattern(template: str) -> re.Pattern[str]:
    """A regex for an RFC 6570 URI template (simple ``{var}`` and ``{+var}`` expressions)."""
    parts = re.split(r"(\{[^}]+\})", template)
    regex = "".join(
        ("(.+)" if part.startswith("{+") else "([^/]+)") if part.startswith("{")
        else re.escape(part) for part in parts)
    return re.compile(f"^{regex}$")


class Aggregator:
    """Builds the aggregated lists for one downstream session and remembers the routes."""

    def __init__(self, fetch: Fetch, list_request: Callable[[Upstream, str],
                                                            Awaitable[list[dict[str, Any]]]]):
        self.fetch = fetch
        self.list_request = list_request
        self.routes = Routes()

    async def _lists(self, playbook: Playbook, method: str,
                     wanted: Callable[[Server, Upstream], bool]) -> list[tuple[Server,
                                                                                list[Any]]]:
        servers = enabled_servers(playbook)

        async def one(server: Server) -> tuple[Server, list[Any]]:
            upstream = await self.fetch(server)
            if upstream is None or not wanted(server, upstream):
                return server, []
            try:
                return server, await self.list_request(upstream, method)
            except UpstreamError as failure:
                log.warn("{method} failed: {error}", method=method, error=str(failure),
                         server=server.name)
                return server, []

        try:
            results = await defer.gatherResults(
                [defer.ensureDeferred(one(server)) for server in servers], consumeErrors=True)
        except defer.FirstError as first:
            first.subFailure.raiseException()  # e.g. the client cancelled: say so, not "FirstError"
        return list(results)

    async def tools(self, playbook: Playbook) -> dict[str, Any]:
        lists = await self._lists(playbook, "tools/list",
                                  lambda s, u: "tools" in u.capabilities)
        tools: list[dict[str, Any]] = []
        routes: dict[str, tuple[str, str]] = {}
        shadowed = []
        for server, entries in lists:
            for tool in entries:
                original = tool.get("name")
                if not isinstance(original, str) or not tool_visible(server, original):
                    continue
                exposed = server.prefix + original
                if exposed in routes:
                    shadowed.append({"name": exposed, "server": server.name,
                                     "shadowed_by": routes[exposed][0]})
                    continue
                routes[exposed] = (server.name, original)
                tools.append(dict(tool, name=exposed) if server.prefix else tool)
        self.routes = attrs.evolve(self.routes, tools=routes)
        return _with_shadowed({"tools": tools}, shadowed, "tools")

    async def prompts(self, playbook: Playbook) -> dict[str, Any]:
        prompts = [prompt_entry(p) for p in playbook.prompts]
        routes: dict[str, str] = {p.name: "" for p in playbook.prompts}  # "" = the playbook's
        shadowed = []
        lists = await self._lists(playbook, "prompts/list",
                                  lambda s, u: s.expose_prompts and "prompts" in u.capabilities)
        for server, entries in lists:
            for prompt in entries:
                name = prompt.get("name")
                if not isinstance(name, str):
                    continue
                if name in routes:
                    shadowed.append({"name": name, "server": server.name,
                                     "shadowed_by": routes[name] or "playbook"})
                    continue
                routes[name] = server.name
                prompts.append(prompt)
        self.routes = attrs.evolve(self.routes, prompts=routes)
        return _with_shadowed({"prompts": prompts}, shadowed, "prompts")

    async def resources(self, playbook: Playbook) -> dict[str, Any]:
        lists = await self._lists(playbook, "resources/list",
                                  lambda s, u: "resources" in u.capabilities)
        resources, routes, shadowed = [], dict(self.routes.resources), []
        seen: dict[str, str] = {}
        for server, entries in lists:
            for resource in entries:
                uri = resource.get("uri")
                if not isinstance(uri, str):
                    continue
                if uri in seen:
                    shadowed.append({"name": uri, "server": server.name,
                                     "shadowed_by": seen[uri]})
                    continue
                seen[uri] = routes[uri] = server.name
                resources.append(resource)
        self.routes = attrs.evolve(self.routes, resources=routes)
        return _with_shadowed({"resources": resources}, shadowed, "resources")

    async def templates(self, playbook: Playbook) -> dict[str, Any]:
        lists = await self._lists(playbook, "resources/templates/list",
                                  lambda s, u: "resources" in u.capabilities)
        templates, routes = [], []
        for server, entries in lists:
            for template in entries:
                uri = template.get("uriTemplate")
                if isinstance(uri, str):
                    templates.append(template)
                    routes.append((template_pattern(uri), uri, server.name))
        self.routes = attrs.evolve(self.routes, templates=routes)
        return {"resourceTemplates": templates}

    # --- routing ------------------------------------------------------------------------

    async def tool_route(self, playbook: Playbook, name: str) -> tuple[Server, str]:
        if name not in self.routes.tools:
            await self.tools(playbook)  # first call without a list, or the list changed
        route = self.routes.tools.get(name)
        server = playbook.server(route[0]) if route else None
        if route is None or server is None or server.disabled:
            raise ProtocolError(INVALID_PARAMS, f"unknown tool: {name}")
        return server, route[1]

    async def prompt_route(self, playbook: Playbook, name: str) -> Server | None:
        """None: the playbook's own prompt."""
        if playbook.prompt(name) is not None:
            return None
        if name not in self.routes.prompts:
            await self.prompts(playbook)
        server_name = self.routes.prompts.get(name)
        server = playbook.server(server_name) if server_name else None
        if server is None or server.disabled or not server.expose_prompts:
            raise ProtocolError(INVALID_PARAMS, f"unknown prompt: {name}")
        return server

    async def resource_route(self, playbook: Playbook, uri: str) -> Server:
        server_name = self.routes.resources.get(uri) or self._template_server(uri)
        if server_name is None:
            await self.resources(playbook)
            await self.templates(playbook)
            server_name = self.routes.resources.get(uri) or self._template_server(uri)
        server = playbook.server(server_name) if server_name else None
        if server is None or server.disabled:
            raise ProtocolError(RESOURCE_NOT_FOUND, f"resource not found: {uri}",
                                {"uri": uri})
        return server

    def _template_server(self, uri: str) -> str | None:
        for pattern, _, server_name in self.routes.templates:
            if pattern.match(uri):
                return server_name
        return None

    async def template_route(self, playbook: Playbook, template: str) -> Server:
        for _, uri, server_name in self.routes.templates:
            if uri == template:
                server = playbook.server(server_name)
                if server is not None:
                    return server
        await self.templates(playbook)
        for _, uri, server_name in self.routes.templates:
            if uri == template:
                server = playbook.server(server_name)
                if server is not None:
                    return server
        raise ProtocolError(INVALID_PARAMS, f"unknown resource template: {template}")


def _with_shadowed(result: dict[str, Any], shadowed: list[dict[str, str]],
                   kind: str) -> dict[str, Any]:
    if shadowed:
        for entry in shadowed:
            log.warn("{kind} {name!r} of server {server!r} is shadowed by {shadowed_by!r}",
                     kind=kind[:-1], **entry)
        result["_meta"] = {SHADOWED_META: shadowed}
    return result


def upstream_error(failure: UpstreamError) -> ProtocolError:
    """An upstream's own JSON-RPC error passes through; anything else becomes -32603."""
    if isinstance(failure, UpstreamRequestError):
        return error_of(failure.error)
    return ProtocolError(-32603, str(failure))

