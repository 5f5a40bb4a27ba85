"""The playbook router: one MCP server made of a playbook's upstream servers and prompts.

Lists are aggregated in the playbook's server order (then each upstream's own order), so they
are deterministic. Tool names pass through verbatim unless the server has a prefix (used as
given, no separator added); ``include``/``exclude`` filter on the upstream's own names. When
two servers expose the same name, the earlier server wins and the shadowed entries are
reported in the list result's ``_meta`` (``director/shadowed``) and in the log — never
silently. Disabled servers and upstreams that cannot be reached contribute nothing.

A list never waits long for a slow server: it answers with the servers whose entries are in
within ``wait`` seconds (``MCP_LIST_WAIT_SECONDS``; a started server's list is cached, so that
is immediate); the
others — still starting, or still answering the list — are named in the result's ``_meta``
(``director/pending``) and go on in the background, and when one of them brings entries the
session is told ``notifications/…/list_changed`` (``on_late``). A server that fails is left
out as always. A route (``tools/call``, ``prompts/get``, ``resources/read``…) for a name that
no listed server has waits for the servers the list left out before answering "unknown":
the router cannot know which server owns a name before it has listed them, except that a
tool name must fit a server's prefix and include/exclude filters. Each such wait is bounded by
that server's own ``timeout_seconds`` (the start, then the list request).

Everything an upstream returns (schemas, contents, ``_meta``) is passed through untouched;
only tool names are rewritten when a prefix applies.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, cast

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from director.mcp.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    RESOURCE_NOT_FOUND,
    ProtocolError,
    error_of,
)
from director.mcp.upstream.base import UpstreamError, UpstreamRequestError
from director.mcp.upstreams import Upstream
from director.playbooks.model import Prompt, Server
from director.playbooks.store import Playbook

log = Logger(namespace="mcp.router")

SHADOWED_META = "director/shadowed"
#: Names the servers a list answer left out because they were not ready yet.
PENDING_META = "director/pending"
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_.-]+)\s*\}\}")

#: ``fetch(server) -> the upstream, started`` (None when unavailable).
Fetch = Callable[[Server], Awaitable[Upstream | None]]
#: ``list_request(upstream, method) -> its entries`` (every page).
ListRequest = Callable[[Upstream, str], Awaitable[list[dict[str, Any]]]]
#: ``wanted(server, upstream)``: whether the server takes part in a list.
Wanted = Callable[[Server, Upstream], bool]


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


def may_expose_tool(server: Server, exposed: str) -> bool:
    """Whether ``exposed`` can be one of ``server``'s tools (its prefix and filters)."""
    return exposed.startswith(server.prefix) and tool_visible(server, exposed[len(server.prefix):])


def settled_within(deferreds: list[defer.Deferred[Any]], seconds: float | None,
                   clock: Any) -> defer.Deferred[None]:
    """Fires once all of ``deferreds`` have fired, or after ``seconds`` (None: no limit),
    whichever comes first. They are never cancelled (they go on, e.g. to fill a cache);
    cancelling the result cancels only the wait."""
    waiting = [d for d in deferreds if not d.called]
    if not waiting:
        return defer.succeed(None)
    timer: Any = None

    def stop(_: object = None) -> None:
        if timer is not None and timer.active():
            timer.cancel()

    done: defer.Deferred[None] = defer.Deferred(stop)
    left = len(waiting)

    def fire() -> None:
        if not done.called:
            stop()
            done.callback(None)

    def fired(result: Any) -> Any:
        nonlocal left
        left -= 1
        if left == 0:
            fire()
        return result

    for d in waiting:
        d.addBoth(fired)
    if seconds is not None and not done.called:
        timer = clock.callLater(seconds, fire)
    return done


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

    def __init__(self, fetch: Fetch, list_request: ListRequest, clock: Any, wait: float,
                 on_late: Callable[[str], object] = lambda method: None) -> None:
        self.fetch = fetch
        self.list_request = list_request
        self.clock = clock
        #: How long a list waits for the servers whose entries are not in yet.
        self.wait = wait
        #: ``on_late(list method)``: a server the last such answer left out has entries now.
        self.on_late = on_late
        self.routes = Routes()
        #: list method -> server name -> its entries still on their way, for the servers the
        #: last answer of that method left out (None until a list leaves one out).
        self._late: dict[str, dict[str, defer.Deferred[list[Any] | None]]] | None = None

    async def _entries(self, server: Server, method: str,
                       wanted: Wanted) -> list[Any] | None:
        """One server's entries; None when it is unavailable (never raises)."""
        try:
            upstream = await self.fetch(server)
            if upstream is None:
                return None
            if not wanted(server, upstream):
                return []
            return await self.list_request(upstream, method)
        except UpstreamError as failure:
            log.warn("{method} failed: {error}", method=method, error=str(failure),
                     server=server.name)
        except Exception:
            log.failure("{method} of {server} failed", method=method, server=server.name)
        return None

    async def _lists(self, playbook: Playbook, method: str, wanted: Wanted,
                     servers: list[Server] | None = None
                     ) -> tuple[list[tuple[Server, list[Any]]], list[str]]:
        """Each server's entries that are in within ``wait`` seconds, and the names of the
        servers left out because theirs are not (they are remembered in ``_late``)."""
        if servers is None:
            servers = enabled_servers(playbook)
        coming = [(server, defer.ensureDeferred(self._entries(server, method, wanted)))
                  for server in servers]
        await settled_within([entries for _, entries in coming], self.wait, self.clock)
        lists: list[tuple[Server, list[Any]]] = []
        late: dict[str, defer.Deferred[list[Any] | None]] = {}
        for server, entries in coming:
            if entries.called:
                lists.append((server, cast(list[Any] | None, entries.result) or []))
            else:
                late[server.name] = entries
                entries.addCallback(self._arrived, method, server.name, entries)
        if late or (self._late is not None and method in self._late):
            if self._late is None:
                self._late = {}
            self._late[method] = late
        if late:
            log.debug("{method} answered without {servers} (not ready yet)", method=method,
                      servers=", ".join(late))
        return lists, list(late)

    def _arrived(self, entries: list[Any] | None, method: str, server_name: str,
                 coming: defer.Deferred[list[Any] | None]) -> list[Any] | None:
        """A left-out server's entries are in: the session is told, if they are news."""
        late = self._late.get(method) if self._late is not None else None
        if late is not None and late.get(server_name) is coming:
            del late[server_name]
            if entries:
                self.on_late(method)
        return entries

    async def _late_arrivals(self, methods: tuple[str, ...],
                             which: Callable[[str], bool] = lambda server_name: True) -> bool:
        """Wait for the servers (``which``) that the last answers of ``methods`` left out,
        each within its own timeouts; False when there were none."""
        waiting = [entries for method in methods
                   for name, entries in ((self._late or {}).get(method) or {}).items()
                   if which(name)]
        if not waiting:
            return False
        await settled_within(waiting, None, self.clock)
        return True

    async def _listed(self, refresh: Callable[[], Awaitable[object]], methods: tuple[str, ...],
                      found: Callable[[], bool],
                      which: Callable[[str], bool] = lambda server_name: True) -> None:
        """List again, and if that does not find the name, once more after the servers the
        list left out (``which``) have answered."""
        await refresh()
        if not found() and await self._late_arrivals(methods, which):
            await refresh()

    async def tools(self, playbook: Playbook) -> dict[str, Any]:
        lists, pending = await self._lists(playbook, "tools/list",
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
        return _annotated({"tools": tools}, shadowed, pending, "tools")

    async def prompts(self, playbook: Playbook) -> dict[str, Any]:
        prompts = [prompt_entry(p) for p in playbook.prompts]
        routes: dict[str, str] = {p.name: "" for p in playbook.prompts}  # "" = the playbook's
        shadowed = []
        lists, pending = await self._lists(
            playbook, "prompts/list", lambda s, u: "prompts" in u.capabilities,
            [server for server in enabled_servers(playbook) if server.expose_prompts])
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
        return _annotated({"prompts": prompts}, shadowed, pending, "prompts")

    async def resources(self, playbook: Playbook) -> dict[str, Any]:
        lists, pending = await self._lists(playbook, "resources/list",
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
        return _annotated({"resources": resources}, shadowed, pending, "resources")

    async def templates(self, playbook: Playbook) -> dict[str, Any]:
        lists, pending = await self._lists(playbook, "resources/templates/list",
                                           lambda s, u: "resources" in u.capabilities)
        templates, routes = [], []
        for server, entries in lists:
            for template in entries:
                uri = template.get("uriTemplate")
                if isinstance(uri, str):
                    templates.append(template)
                    routes.append((template_pattern(uri), uri, server.name))
        self.routes = attrs.evolve(self.routes, templates=routes)
        return _annotated({"resourceTemplates": templates}, [], pending, "resource templates")

    async def all_lists(self, playbook: Playbook) -> None:
        """Every list at once (starting every server): the servers left out are owed their
        ``list_changed``, as after a client's own lists."""
        await defer.gatherResults([defer.ensureDeferred(listing(playbook)) for listing in (
            self.tools, self.prompts, self.resources, self.templates)], consumeErrors=True)

    # --- routing ------------------------------------------------------------------------

    async def tool_route(self, playbook: Playbook, name: str) -> tuple[Server, str]:
        if name not in self.routes.tools:
            # First call without a list, or the list changed.
            await self._listed(lambda: self.tools(playbook), ("tools/list",),
                               lambda: name in self.routes.tools,
                               self._may_expose(playbook, name))
        route = self.routes.tools.get(name)
        server = playbook.server(route[0]) if route else None
        if route is None or server is None or server.disabled:
            raise ProtocolError(INVALID_PARAMS, f"unknown tool: {name}")
        return server, route[1]

    async def listed_tool(self, playbook: Playbook, name: str) -> dict[str, Any] | None:
        """``name``'s entry in a fresh tools list, waiting as ``tool_route`` does."""
        listing: dict[str, Any] = {}

        async def refresh() -> None:
            listing.update(await self.tools(playbook))

        await self._listed(refresh, ("tools/list",), lambda: name in self.routes.tools,
                           self._may_expose(playbook, name))
        return next((tool for tool in listing.get("tools", []) if tool.get("name") == name),
                    None)

    @staticmethod
    def _may_expose(playbook: Playbook, name: str) -> Callable[[str], bool]:
        def may(server_name: str) -> bool:
            server = playbook.server(server_name)
            return server is not None and may_expose_tool(server, name)

        return may

    async def prompt_route(self, playbook: Playbook, name: str) -> Server | None:
        """None: the playbook's own prompt."""
        if playbook.prompt(name) is not None:
            return None
        if name not in self.routes.prompts:
            await self._listed(lambda: self.prompts(playbook), ("prompts/list",),
                               lambda: name in self.routes.prompts)
        server_name = self.routes.prompts.get(name)
        server = playbook.server(server_name) if server_name else None
        if server is None or server.disabled or not server.expose_prompts:
            raise ProtocolError(INVALID_PARAMS, f"unknown prompt: {name}")
        return server

    async def resource_route(self, playbook: Playbook, uri: str) -> Server:
        server_name = self.routes.resources.get(uri) or self._template_server(uri)
        if server_name is None:
            async def refresh() -> None:
                await self.resources(playbook)
                await self.templates(playbook)

            await self._listed(refresh, ("resources/list", "resources/templates/list"),
                               lambda: uri in self.routes.resources or
                               self._template_server(uri) is not None)
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

    def _listed_template(self, playbook: Playbook, template: str) -> Server | None:
        for _, uri, server_name in self.routes.templates:
            if uri == template:
                server = playbook.server(server_name)
                if server is not None:
                    return server
        return None

    async def template_route(self, playbook: Playbook, template: str) -> Server:
        server = self._listed_template(playbook, template)
        if server is None:
            await self._listed(lambda: self.templates(playbook), ("resources/templates/list",),
                               lambda: self._listed_template(playbook, template) is not None)
            server = self._listed_template(playbook, template)
        if server is None:
            raise ProtocolError(INVALID_PARAMS, f"unknown resource template: {template}")
        return server


def _annotated(result: dict[str, Any], shadowed: list[dict[str, str]], pending: list[str],
               kind: str) -> dict[str, Any]:
    """The result with its ``_meta``: the shadowed entries (also logged) and the servers
    left out because they were not ready yet."""
    meta: dict[str, Any] = {}
    if shadowed:
        for entry in shadowed:
            log.warn("{kind} {name!r} of server {server!r} is shadowed by {shadowed_by!r}",
                     kind=kind[:-1], **entry)
        meta[SHADOWED_META] = shadowed
    if pending:
        meta[PENDING_META] = pending
    if meta:
        result["_meta"] = meta
    return result


def upstream_error(failure: UpstreamError) -> ProtocolError:
    """An upstream's own JSON-RPC error passes through; anything else becomes -32603."""
    if isinstance(failure, UpstreamRequestError):
        return error_of(failure.error)
    return ProtocolError(INTERNAL_ERROR, str(failure))

