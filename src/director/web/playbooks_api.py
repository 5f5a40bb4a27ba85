"""``/api/v1/playbooks`` routes: playbooks, their servers, prompts, tool settings, connection
snippets and history. Reads come from the cache; writes go to the database and refresh the
cache before answering, so a client always reads its own writes.

Optimistic concurrency: every playbook answer carries ``ETag: "<version>"``; a write sent with
``If-Match`` is refused with 409 ``version_conflict`` when the playbook changed meanwhile.
"""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

from twisted.web.server import Request

from director.accounts.validation import ValidationFailed
from director.config import Settings
from director.crypto import SecretBox
from director.db.database import Database
from director.db.interactions import Interaction
from director.oauth.client.routes import connect_url
from director.playbooks import model, rails, store
from director.playbooks.cache import PlaybookCache
from director.playbooks.store import Playbook
from director.web.api import (
    api,
    encode_cursor,
    is_number,
    numeric_cursor,
    page_size,
    reject_unknown_fields,
    require_field,
)
from director.web.auth import Authenticator, Principal
from director.web.errors import Conflict, NotFound, read_json_object, write_json


def _expected_version(request: Request) -> int | None:
    raw = request.getHeader(b"if-match")
    if raw is None:
        return None
    text = raw.decode("latin-1").strip().removeprefix("W/").strip('"')
    if text == "*":
        return None  # any version
    if not is_number(text):
        raise ValidationFailed({"If-Match": 'must be the ETag of the playbook, e.g. "3"'})
    return int(text)


def _flag(request: Request, name: str) -> bool:
    value = request.args.get(name.encode(), [b"false"])[0].decode("latin-1").lower()
    if value not in ("true", "false", "1", "0"):
        raise ValidationFailed({name: "must be true or false"})
    return value in ("true", "1")


class PlaybookRoutes:
    settings: Settings
    database: Database
    auth: Authenticator
    playbooks: PlaybookCache
    box: SecretBox
    #: ``director.oauth.client``'s ``UpstreamAuthorizations`` (None: not wired, as in tests).
    oauth: Any

    # --- shared ---------------------------------------------------------------------------

    def urls(self, playbook_id: str) -> dict[str, str]:
        base = self.settings.base_url
        return {"streamable_http": f"{base}/playbooks/{playbook_id}/mcp",
                "sse": f"{base}/playbooks/{playbook_id}/sse"}

    def server_json(self, server: model.Server, reveal_secrets: bool = False,
                    playbook: Playbook | None = None) -> dict[str, Any]:
        """A server as the API shows it: with its read-only ``status`` under the current
        configuration (the same on every instance that shares it), and for an HTTP server
        behind OAuth its owner's ``authorization`` (``director.oauth.client``)."""
        status = rails.server_status(self.settings, server)
        if self.oauth is not None and playbook is not None:
            authorization = self.oauth.status(playbook.user_id, server, connect_url(
                self.settings.base_url, playbook.id, server.name))
            if authorization is not None:
                status["authorization"] = authorization
        return model.server_json(server, reveal_secrets) | {"status": status}

    def playbook_json(self, playbook: Playbook, reveal_secrets: bool = False,
                      summary: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": playbook.id, "name": playbook.name, "description": playbook.description,
            "position": playbook.position, "version": playbook.version,
            "created_at": playbook.created_at.isoformat(),
            "updated_at": playbook.updated_at.isoformat(), "urls": self.urls(playbook.id)}
        if summary:
            data |= {"servers": len(playbook.servers), "prompts": len(playbook.prompts)}
        else:
            data |= {"servers": [self.server_json(s, reveal_secrets, playbook)
                                 for s in playbook.servers],
                     "prompts": [model.prompt_json(p) for p in playbook.prompts]}
        return data

    def _answer(self, request: Request, status: int, playbook: Playbook,
                payload: Any) -> bytes:
        request.setHeader(b"etag", f'"{playbook.version}"'.encode())
        if status == 204:
            request.setResponseCode(204)
            return b""
        return write_json(request, status, payload)

    def _owned(self, principal: Principal, playbook_id: str) -> Playbook:
        playbook = self.playbooks.get(principal.user.id, playbook_id)
        if playbook is None:
            raise NotFound(f"no playbook {playbook_id!r}")
        return playbook

    async def _write(self, pk: UUID, interaction: Interaction[Any]) -> Playbook:
        try:
            await self.database.run(interaction)
        except store.NoSuchPlaybook:
            raise NotFound("the playbook no longer exists") from None
        except store.VersionConflict as conflict:
            raise Conflict(str(conflict) + "; read it again and retry",
                           code="version_conflict",
                           details={"current_version": conflict.current}) from None
        fresh = await self.playbooks.refresh(pk)
        if fresh is None:
            raise NotFound("the playbook no longer exists")
        return fresh

    # --- playbooks --------------------------------------------------------------------------

    @api.route("/playbooks", methods=["GET"])
    async def list_playbooks(self, request: Request) -> bytes:
        principal = await self.auth.authenticate(request)
        limit = page_size(request)
        offset = numeric_cursor(request) or 0
        mine = self.playbooks.of_user(principal.user.id)
        page = mine[offset:offset + limit]
        return write_json(request, 200, {
            "items": [self.playbook_json(p, summary=True) for p in page],
            "next_cursor": encode_cursor(str(offset + limit)) if offset + limit < len(mine)
            else None})

    @api.route("/playbooks", methods=["POST"])
    async def create_playbook(self, request: Request) -> bytes:
        principal = await self.auth.authenticate(request)
        body = read_json_object(request)
        fields = model.parse_playbook_fields(body)
        playbook_id = model.playbook_id_from(body, fields.name)
        try:
            pk = await self.database.run(store.create(self.box, principal.user.id, playbook_id,
                                                      fields, principal.user.email))
        except store.Duplicate:
            raise Conflict(f"you already have a playbook {playbook_id!r}; choose another name "
                           "or give an explicit id",
                           details={"fields": {"id": "is already in use"}}) from None
        playbook = await self.playbooks.refresh(pk)
        assert playbook is not None
        return self._answer(request, 201, playbook, self.playbook_json(playbook))

    @api.route("/playbooks/<playbook_id>", methods=["GET"])
    async def get_playbook(self, request: Request, playbook_id: str) -> bytes:
        principal = await self.auth.authenticate(request)
        playbook = self._owned(principal, playbook_id)
        return self._answer(request, 200, playbook, self.playbook_json(
            playbook, reveal_secrets=_flag(request, "reveal_secrets")))

    @api.route("/playbooks/<playbook_id>", methods=["PATCH"])
    async def update_playbook(self, request: Request, playbook_id: str) -> bytes:
        principal = await self.auth.authenticate(request)
        playbook = self._owned(principal, playbook_id)
        body = read_json_object(request)
        fields = model.parse_playbook_fields(body, playbook.fields, partial=True)
        if "id" in body:
            raise ValidationFailed({"id": "cannot change (it is part of every client's URL)"})
        expected = _expected_version(request)
        if body.get("version") is not None:
            # The body's version is the same optimistic check as If-Match, for clients that
            # cannot set headers.
            version = body["version"]
            if not isinstance(version, int) or isinstance(version, bool):
                raise ValidationFailed({"version": "must be the playbook's version, a number"})
            if expected is not None and expected != version:
                raise Conflict("If-Match and the body's version disagree; at most one of them "
                               "is current", code="version_conflict",
                               details={"current_version": playbook.version})
            expected = version
        fresh = await self._write(playbook.pk, store.update_fields(
            playbook.pk, fields, expected, principal.user.email))
        return self._answer(request, 200, fresh, self.playbook_json(fresh))

    @api.route("/playbooks/<playbook_id>", methods=["DELETE"])
    async def delete_playbook(self, request: Request, playbook_id: str) -> bytes:
        principal = await self.auth.authenticate(request)
        playbook = self._owned(principal, playbook_id)
        try:
            await self.database.run(store.delete(playbook.pk, _expected_version(request),
                                                 principal.user.email))
        except store.VersionConflict as conflict:
            raise Conflict(str(conflict), code="version_conflict",
                           details={"current_version": conflict.current}) from None
        except store.NoSuchPlaybook:
            raise NotFound(f"no playbook {playbook_id!r}") from None
        await self.playbooks.refresh(playbook.pk)
        request.setResponseCode(204)
        return b""

    # --- servers --------------------------------------------------------------------------

    @api.route("/playbooks/<playbook_id>/servers", methods=["GET"])
    async def list_servers(self, request: Request, playbook_id: str) -> bytes:
        principal = await self.auth.authenticate(request)
        playbook = self._owned(principal, playbook_id)
        reveal = _flag(request, "reveal_secrets")
        return self._answer(request, 200, playbook, {
            "items": [self.server_json(s, reveal, playbook) for s in playbook.servers]})

    @api.route("/playbooks/<playbook_id>/servers", methods=["POST"])
    async def add_server(self, request: Request, playbook_id: str) -> bytes:
        principal = await self.auth.authenticate(request)
        playbook = self._owned(principal, playbook_id)
        server = model.parse_server(read_json_object(request))
        await rails.check_server(self.settings, server)
        try:
            fresh = await self._write(playbook.pk, store.add_server(
                self.box, playbook.pk, server, _expected_version(request),
                principal.user.email))
        except store.Duplicate:
            raise Conflict(f"the playbook already has a server named {server.name!r}",
                           details={"fields": {"name": "is already in use"}}) from None
        created = fresh.server(server.name)
        assert created is not None
        return self._answer(request, 201, fresh, self.server_json(created, playbook=fresh))

    def _server_of(self, playbook: Playbook, name: str) -> model.Server:
        server = playbook.server(name)
        if server is None:
            raise NotFound(f"playbook {playbook.id!r} has no server {name!r}")
        return server

    @api.route("/playbooks/<playbook_id>/servers/<name>", methods=["GET"])
    async def get_server(self, request: Request, playbook_id: str, name: str) -> bytes:
        principal = await self.auth.authenticate(request)
        playbook = self._owned(principal, playbook_id)
        server = self._server_of(playbook, name)
        return self._answer(request, 200, playbook, self.server_json(
            server, _flag(request, "reveal_secrets"), playbook))

    @api.route("/playbooks/<playbook_id>/servers/<name>", methods=["PATCH"])
    async def update_server(self, request: Request, playbook_id: str, name: str) -> bytes:
        principal = await self.auth.authenticate(request)
        playbook = self._owned(principal, playbook_id)
        current = self._server_of(playbook, name)
        changed = model.parse_server(read_json_object(request), base=current)
        await rails.check_server(self.settings, changed)
        try:
            fresh = await self._write(playbook.pk, store.replace_servers(
                self.box, playbook.pk, [(name, changed)], _expected_version(request),
                principal.user.email))
        except store.Duplicate:
            raise Conflict(f"the playbook already has a server named {changed.name!r}") \
                from None
        except store.NoSuchPart:
            raise NotFound(f"playbook {playbook_id!r} has no server {name!r}") from None
        updated = fresh.server(changed.name)
        assert updated is not None
        return self._answer(request, 200, fresh, self.server_json(updated, playbook=fresh))

    @api.route("/playbooks/<playbook_id>/servers/<name>", methods=["DELETE"])
    async def remove_server(self, request: Request, playbook_id: str, name: str) -> bytes:
        principal = await self.auth.authenticate(request)
        playbook = self._owned(principal, playbook_id)
        try:
            fresh = await self._write(playbook.pk, store.remove_server(
                playbook.pk, name, _expected_version(request), principal.user.email))
        except store.NoSuchPart:
            raise NotFound(f"playbook {playbook_id!r} has no server {name!r}") from None
        return self._answer(request, 204, fresh, None)

    # --- tool settings ----------------------------------------------------------------------

    @api.route("/playbooks/<playbook_id>/tools", methods=["PATCH"])
    async def update_tools(self, request: Request, playbook_id: str) -> bytes:
        """Batch: ``{"tools": [{"server", "name", "disabled"}]}`` edits include/exclude lists."""
        principal = await self.auth.authenticate(request)
        playbook = self._owned(principal, playbook_id)
        body = read_json_object(request)
        reject_unknown_fields(body, {"tools"})
        changes = require_field(body, "tools")
        if not isinstance(changes, list) or not changes or len(changes) > 1000:
            raise ValidationFailed({"tools": "must be a list of 1 to 1000 changes"})
        servers: dict[str, model.Server] = {}
        for index, change in enumerate(changes):
            where = f"tools[{index}]"
            if not isinstance(change, dict):
                raise ValidationFailed({where: "must be an object"})
            model.reject_unknown(change, {"server", "name", "disabled"}, f"{where}.")
            server_name, tool = change.get("server"), change.get("name")
            disabled = change.get("disabled")
            if not isinstance(tool, str) or not tool or len(tool) > 256 or "\x00" in tool or \
                    any(0xD800 <= ord(c) <= 0xDFFF for c in tool):
                raise ValidationFailed({f"{where}.name": "must be a tool name"})
            if not isinstance(disabled, bool):
                raise ValidationFailed({f"{where}.disabled": "must be true or false"})
            if not isinstance(server_name, str) or playbook.server(server_name) is None:
                raise ValidationFailed({f"{where}.server": "must name a server of the playbook"})
            current = servers.get(server_name) or playbook.server(server_name)
            assert current is not None
            servers[server_name] = _with_tool(current, tool, disabled)
        fresh = await self._write(playbook.pk, store.replace_servers(
            self.box, playbook.pk, list(servers.items()), _expected_version(request),
            principal.user.email, action="update_tools"))
        return self._answer(request, 200, fresh, self.playbook_json(fresh))

    # --- prompts --------------------------------------------------------------------------

    @api.route("/playbooks/<playbook_id>/prompts", methods=["GET"])
    async def list_prompts(self, request: Request, playbook_id: str) -> bytes:
        principal = await self.auth.authenticate(request)
        playbook = self._owned(principal, playbook_id)
        return self._answer(request, 200, playbook, {
            "items": [model.prompt_json(p) for p in playbook.prompts]})

    @api.route("/playbooks/<playbook_id>/prompts", methods=["POST"])
    async def add_prompt(self, request: Request, playbook_id: str) -> bytes:
        principal = await self.auth.authenticate(request)
        playbook = self._owned(principal, playbook_id)
        prompt = model.parse_prompt(read_json_object(request))
        try:
            fresh = await self._write(playbook.pk, store.add_prompt(
                playbook.pk, prompt, _expected_version(request), principal.user.email))
        except store.Duplicate:
            raise Conflict(f"the playbook already has a prompt named {prompt.name!r}",
                           details={"fields": {"name": "is already in use"}}) from None
        created = fresh.prompt(prompt.name)
        assert created is not None
        return self._answer(request, 201, fresh, model.prompt_json(created))

    def _prompt_of(self, playbook: Playbook, name: str) -> model.Prompt:
        prompt = playbook.prompt(name)
        if prompt is None:
            raise NotFound(f"playbook {playbook.id!r} has no prompt {name!r}")
        return prompt

    @api.route("/playbooks/<playbook_id>/prompts/<name>", methods=["GET"])
    async def get_prompt(self, request: Request, playbook_id: str, name: str) -> bytes:
        principal = await self.auth.authenticate(request)
        playbook = self._owned(principal, playbook_id)
        return self._answer(request, 200, playbook,
                            model.prompt_json(self._prompt_of(playbook, name)))

    @api.route("/playbooks/<playbook_id>/prompts/<name>", methods=["PATCH"])
    async def update_prompt(self, request: Request, playbook_id: str, name: str) -> bytes:
        principal = await self.auth.authenticate(request)
        playbook = self._owned(principal, playbook_id)
        changed = model.parse_prompt(read_json_object(request),
                                     base=self._prompt_of(playbook, name))
        try:
            fresh = await self._write(playbook.pk, store.replace_prompt(
                playbook.pk, name, changed, _expected_version(request), principal.user.email))
        except store.Duplicate:
            raise Conflict(f"the playbook already has a prompt named {changed.name!r}") \
                from None
        except store.NoSuchPart:
            raise NotFound(f"playbook {playbook_id!r} has no prompt {name!r}") from None
        updated = fresh.prompt(changed.name)
        assert updated is not None
        return self._answer(request, 200, fresh, model.prompt_json(updated))

    @api.route("/playbooks/<playbook_id>/prompts/<name>", methods=["DELETE"])
    async def remove_prompt(self, request: Request, playbook_id: str, name: str) -> bytes:
        principal = await self.auth.authenticate(request)
        playbook = self._owned(principal, playbook_id)
        try:
            fresh = await self._write(playbook.pk, store.remove_prompt(
                playbook.pk, name, _expected_version(request), principal.user.email))
        except store.NoSuchPart:
            raise NotFound(f"playbook {playbook_id!r} has no prompt {name!r}") from None
        return self._answer(request, 204, fresh, None)

    # --- connection and history -------------------------------------------------------------

    @api.route("/playbooks/<playbook_id>/connection", methods=["GET"])
    async def connection(self, request: Request, playbook_id: str) -> bytes:
        principal = await self.auth.authenticate(request)
        playbook = self._owned(principal, playbook_id)
        # Keys are stored hashed: only a key the caller presents can be pasted in for them.
        key = (request.getHeader(b"x-api-key") or b"").decode("latin-1") \
            if principal.key is not None else ""
        if not key and principal.key is not None:
            key = (request.getHeader(b"authorization") or b"").decode("latin-1").split()[-1]
        return write_json(request, 200, connection_snippets(
            playbook.id, self.urls(playbook.id), key or "<YOUR_DIRECTOR_API_KEY>"))

    @api.route("/playbooks/<playbook_id>/history", methods=["GET"])
    async def history(self, request: Request, playbook_id: str) -> bytes:
        principal = await self.auth.authenticate(request)
        playbook = self._owned(principal, playbook_id)
        limit = page_size(request)
        before = numeric_cursor(request)
        entries = await self.database.run(store.history(playbook.pk, limit + 1, before))
        next_cursor = encode_cursor(str(entries[limit - 1]["seq"])) \
            if len(entries) > limit else None
        return write_json(request, 200, {"items": entries[:limit], "next_cursor": next_cursor})


def _with_tool(server: model.Server, tool: str, disabled: bool) -> model.Server:
    import attrs

    if server.include is not None:
        include = [t for t in server.include if t != tool] + ([] if disabled else [tool])
        return attrs.evolve(server, include=tuple(include))
    exclude = [t for t in (server.exclude or ()) if t != tool] + ([tool] if disabled else [])
    return attrs.evolve(server, exclude=tuple(exclude) if exclude else None)


def connection_snippets(playbook_id: str, urls: dict[str, str], key: str) -> dict[str, Any]:
    """Ready-to-paste client configuration for the playbook's MCP endpoint."""
    url = urls["streamable_http"]
    headers = {"x-api-key": key}
    return {
        "playbook_id": playbook_id,
        "urls": urls,
        "headers": headers,
        "clients": {
            # Claude Desktop's config file starts local commands only: bridge with mcp-remote.
            "claude_desktop": {"mcpServers": {playbook_id: {
                "command": "npx",
                "args": ["-y", "mcp-remote", url, "--header", "x-api-key:${DIRECTOR_API_KEY}"],
                "env": {"DIRECTOR_API_KEY": key}}}},
            "claude_code": {"command": (
                f"claude mcp add --transport http {playbook_id} {url} "
                f"--header {json.dumps('x-api-key: ' + key)}")},
            "cursor": {"mcpServers": {playbook_id: {"url": url, "headers": headers}}},
            "vscode": {"servers": {playbook_id: {"type": "http", "url": url,
                                                 "headers": headers}}},
        },
    }
