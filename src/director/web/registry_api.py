"""``/api/v1/registry`` (finding servers in ``REGISTRY_URL``) and installing, checking and
updating a playbook's registry servers (``/api/v1/playbooks/{id}/servers/…``).

* ``GET /registry/servers?q=&cursor=&limit=`` — a page of servers (latest versions);
* ``GET /registry/servers/{namespace}/{name}?version=`` — one entry (default: the latest), its
  versions, and each of its packages and remotes: installable or why not, and the input
  fields it asks for;
* ``POST /playbooks/{id}/servers/from-registry`` — install: ``{"name", "version"?, "choice"?,
  "server_name"?, "inputs"?}``; answers the new server (201);
* ``GET /playbooks/{id}/servers/{name}/registry`` — its provenance, the registry's latest
  version and whether an update is available;
* ``POST /playbooks/{id}/servers/{name}/registry-update`` — move it to ``version`` (default:
  the latest), keeping the user's inputs and settings; ``inputs`` given override them.

A registry that is down or answers nonsense is a 502 ``registry_unavailable``; an entry or
version it does not have a 404 ``not_in_registry``; either way nothing is written.
"""

from __future__ import annotations

from typing import Any

from twisted.web.server import Request

from director.accounts.validation import ValidationFailed
from director.playbooks import model, rails, store
from director.playbooks.store import Playbook
from director.registry import catalogue, install
from director.registry.catalogue import Entry
from director.registry.client import NotInRegistry, RegistryClient, RegistryError, parse_limit
from director.web.api import api, reject_unknown_fields, require_field
from director.web.errors import ApiError, Conflict, NotFound, read_json_object, write_json
from director.web.playbooks_api import _expected_version

INSTALL_FIELDS = {"name", "version", "choice", "server_name", "inputs"}
UPDATE_FIELDS = {"version", "inputs"}


def registry_failure(error: RegistryError) -> ApiError:
    """The API's answer to a registry that failed: 404 or 502, with the registry's story."""
    if isinstance(error, NotInRegistry):
        return NotFound(str(error), code="not_in_registry")
    return ApiError(str(error), status=502, code="registry_unavailable")


def _text_field(body: dict[str, Any], name: str, limit: int = 255) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > limit or \
            any(ord(c) < 0x20 or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise ValidationFailed({name: f"must be text of 1 to {limit} characters, without "
                                      "control characters"})
    return value


def entry_details(entry: Entry, versions: list[Entry]) -> dict[str, Any]:
    return catalogue.entry_json(entry) | {
        "versions": [version.version for version in reversed(versions)],
        "options": [install.option_json(option) for option in install.options(entry)]}


class RegistryRoutes:
    registry: RegistryClient

    # (from PlaybookRoutes)
    _owned: Any
    _write: Any
    _answer: Any
    _server_of: Any
    server_json: Any
    settings: Any
    database: Any
    box: Any
    auth: Any

    # --- finding ----------------------------------------------------------------------------

    async def registry_search(self, request: Request) -> dict[str, Any]:
        query = request.args.get(b"q", [b""])[0].decode("utf-8", "replace")
        if len(query) > 200:
            raise ValidationFailed({"q": "must be at most 200 characters"})
        try:
            limit = parse_limit(request.args.get(b"limit", [b""])[0].decode("latin-1"))
        except ValueError as error:
            raise ValidationFailed({"limit": str(error)}) from None
        cursor = request.args.get(b"cursor", [b""])[0].decode("latin-1") or None
        if cursor is not None and len(cursor) > 1024:
            raise ValidationFailed({"cursor": "is not a cursor this API returned"})
        try:
            page = await self.registry.search(query, cursor, limit)
        except RegistryError as error:
            raise registry_failure(error) from None
        return {"registry": self.registry.url,
                "items": [catalogue.entry_json(entry) for entry in page.entries],
                "next_cursor": page.next_cursor, "skipped": page.skipped}

    async def registry_entry(self, name: str, version: str) -> tuple[Entry, list[Entry]]:
        if not catalogue.valid_name(name):
            raise NotFound(f"{name[:200]!r} is not a registry server name (namespace/name)",
                           code="not_in_registry")
        try:
            versions = await self.registry.versions(name)
            entry = await self.registry.version(name, version)
        except RegistryError as error:
            raise registry_failure(error) from None
        return entry, versions

    @api.route("/registry/servers", methods=["GET"])
    async def search_registry(self, request: Request) -> bytes:
        await self.auth.authenticate(request)
        return write_json(request, 200, await self.registry_search(request))

    @api.route("/registry/servers/<namespace>/<name>", methods=["GET"])
    async def show_registry_entry(self, request: Request, namespace: str, name: str) -> bytes:
        await self.auth.authenticate(request)
        version = request.args.get(b"version", [b"latest"])[0].decode("utf-8", "replace")
        entry, versions = await self.registry_entry(f"{namespace}/{name}", version or "latest")
        return write_json(request, 200, entry_details(entry, versions))

    # --- installing -------------------------------------------------------------------------

    async def install_from_registry(self, playbook: Playbook, body: dict[str, Any],
                                    actor: str, expected: int | None) -> model.Server:
        """Fetch, check and install an entry into ``playbook``: the stored server."""
        reject_unknown_fields(body, INSTALL_FIELDS)
        name = require_field(body, "name")
        if not isinstance(name, str) or not catalogue.valid_name(name):
            raise ValidationFailed({"name": "must be a registry server name (namespace/name)"})
        version = _text_field(body, "version") or "latest"
        choice = _text_field(body, "choice", 32)
        server_name = model.server_name(body.get("server_name") or
                                        install.suggested_name(name), "server_name")
        try:
            entry = await self.registry.version(name, version)
        except RegistryError as error:
            raise registry_failure(error) from None
        server = install.installed(self.registry.url, entry, choice, server_name,
                                   body.get("inputs"))
        await rails.check_server(self.settings, server)
        try:
            fresh = await self._write(playbook.pk, store.add_server(
                self.box, playbook.pk, server, expected, actor))
        except store.Duplicate:
            raise Conflict(f"the playbook already has a server named {server.name!r}; give "
                           "another server_name",
                           details={"fields": {"server_name": "is already in use"}}) from None
        created = fresh.server(server.name)
        assert created is not None
        return created

    async def update_from_registry(self, playbook: Playbook, current: model.Server,
                                   body: dict[str, Any], actor: str,
                                   expected: int | None) -> model.Server:
        """Move ``current`` to another version of its entry, keeping its inputs."""
        reject_unknown_fields(body, UPDATE_FIELDS)
        source = current.registry
        if source is None:
            raise ValidationFailed({"name": f"{current.name} was not installed from a registry"})
        version = _text_field(body, "version") or "latest"
        try:
            entry = await self.registry.version(source.name, version)
        except RegistryError as error:
            raise registry_failure(error) from None
        server = install.updated(self.registry.url, entry, current, body.get("inputs"))
        await rails.check_server(self.settings, server)
        try:
            fresh = await self._write(playbook.pk, store.replace_servers(
                self.box, playbook.pk, [(current.name, server)], expected, actor,
                action="update_from_registry"))
        except store.NoSuchPart:
            raise NotFound(f"playbook {playbook.id!r} has no server {current.name!r}") from None
        updated = fresh.server(server.name)
        assert updated is not None
        return updated

    async def registry_state(self, server: model.Server) -> dict[str, Any]:
        """Provenance, the registry's latest version, and whether it is newer."""
        source = server.registry
        if source is None:
            raise NotFound(f"{server.name} was not installed from a registry",
                           code="not_from_registry")
        state = model.registry_json(source) | {"latest_version": None,
                                               "update_available": False, "problem": None}
        if source.registry != self.registry.url:
            state["problem"] = (f"installed from {source.registry}, which is no longer "
                                f"REGISTRY_URL ({self.registry.url})")
            return state
        try:
            latest = await self.registry.version(source.name, "latest")
        except RegistryError as error:
            state["problem"] = str(error)
            return state
        state["latest_version"] = latest.version
        state["update_available"] = (catalogue.version_key(latest.version)
                                     > catalogue.version_key(source.version))
        return state

    @api.route("/playbooks/<playbook_id>/servers/from-registry", methods=["POST"])
    async def add_server_from_registry(self, request: Request, playbook_id: str) -> bytes:
        principal = await self.auth.authenticate(request)
        playbook = self._owned(principal, playbook_id)
        body = read_json_object(request)
        created = await self.install_from_registry(playbook, body, principal.user.email,
                                                   _expected_version(request))
        fresh = self._owned(principal, playbook_id)
        return self._answer(request, 201, fresh, self.server_json(created))

    @api.route("/playbooks/<playbook_id>/servers/<name>/registry", methods=["GET"])
    async def server_registry_state(self, request: Request, playbook_id: str,
                                    name: str) -> bytes:
        principal = await self.auth.authenticate(request)
        playbook = self._owned(principal, playbook_id)
        return write_json(request, 200,
                          await self.registry_state(self._server_of(playbook, name)))

    @api.route("/playbooks/<playbook_id>/servers/<name>/registry-update", methods=["POST"])
    async def update_server_from_registry(self, request: Request, playbook_id: str,
                                          name: str) -> bytes:
        principal = await self.auth.authenticate(request)
        playbook = self._owned(principal, playbook_id)
        current = self._server_of(playbook, name)
        body = read_json_object(request)
        updated = await self.update_from_registry(playbook, current, body,
                                                  principal.user.email,
                                                  _expected_version(request))
        fresh = self._owned(principal, playbook_id)
        return self._answer(request, 200, fresh, self.server_json(updated))
