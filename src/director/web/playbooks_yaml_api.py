"""Playbooks as YAML documents over the API (see ``director.playbooks.documents``):

* ``GET /api/v1/playbooks/{id}/export`` answers the document (``application/yaml``); secret
  values only with ``?include_secrets=true``.
* ``POST /api/v1/playbooks/import`` takes a document (``application/yaml`` or ``text/yaml``)
  and creates the caller's playbook of that id (201) or makes it exactly the document (200,
  ``result`` saying ``updated`` or ``unchanged``; an identical document writes nothing and
  keeps the version). ``?dry_run=true`` checks everything and reports what would change
  without writing. An invalid document is a 400 whose ``details.fields`` name each problem by
  path and ``details.locations`` give its line and column. The security rails apply to every
  server, as when adding one.

Parsing and rendering run in a thread: a large document must not stall the reactor.
``OPENAPI_PATHS`` describes both operations (paths relative to ``/api/v1``).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, threads
from twisted.web.server import Request

from director.playbooks import documents, rails, store
from director.playbooks.documents import DocumentInvalid, DocumentTooLarge, ParsedPlaybook
from director.registry.client import RegistryClient, RegistryError
from director.web.api import api
from director.web.errors import ApiError, Conflict, UnsupportedMediaType, write_json
from director.web.openapi_parts import COMMON_ERRORS, SECURITY, error_answer
from director.web.playbooks_api import PlaybookRoutes, _flag

YAML_TYPES = (b"application/yaml", b"text/yaml")


def _read_yaml(request: Request) -> bytes:
    """The body of a YAML request (415 for any other type, or a charset other than UTF-8)."""
    header = (request.getHeader(b"content-type") or b"").decode("latin-1")
    media_type, *parameters = (part.strip() for part in header.split(";"))
    charsets = [value.strip('"').lower() for name, _, value in
                (parameter.partition("=") for parameter in parameters)
                if name.strip().lower() == "charset"]
    if media_type.lower().encode() not in YAML_TYPES or any(
            charset not in ("utf-8", "utf8") for charset in charsets):
        raise UnsupportedMediaType(
            "send the document as application/yaml (or text/yaml), in UTF-8",
            details={"content_type": header})
    if request.content is None:
        return b""
    return bytes(request.content.read(documents.MAX_DOCUMENT_BYTES + 1))


def _refusal(invalid: DocumentInvalid) -> ApiError:
    if isinstance(invalid, DocumentTooLarge):
        return ApiError(invalid.fields[documents.ROOT], status=413, code="payload_too_large",
                        details={"limit": documents.MAX_DOCUMENT_BYTES})
    return ApiError(f"the document is invalid: {invalid.summary()}", code="validation_failed",
                    details=invalid.details())


class PlaybookYamlRoutes(PlaybookRoutes):
    """Routes for playbook documents; reuses the playbook routes' lookups and rendering."""

    registry: RegistryClient

    @api.route("/playbooks/<playbook_id>/export", methods=["GET"])
    async def export_playbook(self, request: Request, playbook_id: str) -> bytes:
        principal = await self.auth.authenticate(request)
        playbook = self._owned(principal, playbook_id)
        include_secrets = _flag(request, "include_secrets")
        text = await threads.deferToThread(documents.export_document, playbook,
                                           include_secrets)
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/yaml; charset=utf-8")
        request.setHeader(b"content-disposition",
                          f'attachment; filename="{playbook.id}.yaml"'.encode())
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"etag", f'"{playbook.version}"'.encode())
        return text.encode("utf-8")

    async def _with_registry(self, parsed: ParsedPlaybook, existing: Any) -> ParsedPlaybook:
        """Registry servers made whole from REGISTRY_URL's entries (or the stored ones)."""
        entries: dict[tuple[str, str], Any] = {}
        for name, version in parsed.registry_lookups(existing):
            try:
                entries[(name, version)] = await self.registry.version(name, version)
            except RegistryError as error:
                entries[(name, version)] = str(error)
        return parsed.with_registry(existing, self.registry.url, entries)

    async def _check_rails(self, parsed: ParsedPlaybook) -> None:
        """Every server against the rails at once; all refusals reported together."""

        async def check(path: str, server: Any) -> dict[str, str]:
            try:
                await rails.check_server(self.settings, server, path)
            except rails.RailViolation as violation:
                return violation.fields
            return {}

        found = await defer.gatherResults(
            [defer.ensureDeferred(check(path, server))
             for path, server in documents.iter_rail_paths(parsed)], consumeErrors=True)
        problems = {path: message for fields in found for path, message in fields.items()}
        if problems:
            raise parsed.invalid(problems)

    @api.route("/playbooks/import", methods=["POST"])
    async def import_playbook(self, request: Request) -> bytes:
        principal = await self.auth.authenticate(request)
        dry_run = _flag(request, "dry_run")
        raw = _read_yaml(request)
        user_id = principal.user.id
        try:
            parsed = await threads.deferToThread(documents.parse_document, raw)
            existing = self.playbooks.get(user_id, parsed.id)
            parsed = parsed.with_stored_secrets(existing)
            parsed = await self._with_registry(parsed, existing)
            await self._check_rails(parsed)
        except DocumentInvalid as invalid:
            raise _refusal(invalid) from None
        changes = documents.describe_changes(existing, parsed)
        if dry_run:
            result = "created" if existing is None else \
                "unchanged" if parsed.same_as(existing) else "updated"
            if existing is not None:
                request.setHeader(b"etag", f'"{existing.version}"'.encode())
            return write_json(request, 200, {
                "result": result, "dry_run": True, "id": parsed.id,
                "version": existing.version if existing is not None else None,
                "changes": changes, "playbook": None})
        try:
            imported = await self.database.run(documents.import_playbook(
                self.box, user_id, parsed, existing.version if existing is not None else None,
                principal.user.email))
        except store.VersionConflict as conflict:
            raise Conflict(f"playbook {parsed.id!r} changed while it was being imported; "
                           "import again", code="version_conflict",
                           details={"current_version": conflict.current}) from None
        except (store.Duplicate, store.NoSuchPlaybook):
            raise Conflict(f"playbook {parsed.id!r} was created or deleted while it was being "
                           "imported; import again", code="version_conflict",
                           details={"current_version": None}) from None
        fresh = await self.playbooks.refresh(imported.pk)
        if fresh is None:
            raise Conflict(f"playbook {parsed.id!r} was deleted meanwhile; import again",
                           code="version_conflict", details={"current_version": None})
        request.setHeader(b"etag", f'"{fresh.version}"'.encode())
        return write_json(request, 201 if imported.result == "created" else 200, {
            "result": imported.result, "dry_run": False, "id": fresh.id,
            "version": fresh.version, "changes": changes, "playbook": self.playbook_json(fresh)})


# --- OpenAPI 3.1 -----------------------------------------------------------------------------

#: ``_flag`` reads true/false/1/0, in any case.
_FLAG = {"type": "string", "pattern": "^([Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee]|1|0)$"}


_ETAG = {"ETag": {"description": 'The playbook\'s version, e.g. "3"',
                  "schema": {"type": "string"}}}
_PARTS_CHANGED = {
    "type": "object", "required": ["added", "removed", "changed", "reordered"],
    "properties": {"added": {"type": "array", "items": {"type": "string"}},
                   "removed": {"type": "array", "items": {"type": "string"}},
                   "changed": {"type": "array", "items": {"type": "string"}},
                   "reordered": {"type": "boolean"}}}
_IMPORTED = {
    "type": "object",
    "required": ["result", "dry_run", "id", "version", "changes", "playbook"],
    "properties": {
        "result": {"enum": ["created", "updated", "unchanged"],
                   "description": "What the import did (or, with dry_run, would do)"},
        "dry_run": {"type": "boolean"},
        "id": {"type": "string"},
        "version": {"type": ["integer", "null"],
                    "description": "The playbook's version now (dry run: its current one, "
                                   "null when it does not exist)"},
        "changes": {"type": "object", "required": ["fields", "servers", "prompts"],
                    "properties": {"fields": {"type": "array", "items": {"type": "string"}},
                                   "servers": _PARTS_CHANGED, "prompts": _PARTS_CHANGED}},
        "playbook": {"type": ["object", "null"],
                     "description": "The playbook as GET /playbooks/{id} shows it (secrets "
                                    "redacted); null for a dry run"},
    },
}

OPENAPI_PATHS: dict[str, Any] = {
    "/playbooks/{playbook_id}/export": {"get": {
        "operationId": "exportPlaybook",
        "summary": "The playbook as a YAML document (secret values only on request)",
        "description": "Schema version 1; fields at their default are left out. Without "
                       "include_secrets, each secret is written {secret: true}, and importing "
                       "the document keeps the stored value.",
        "security": SECURITY,
        "parameters": [
            {"name": "playbook_id", "in": "path", "required": True,
             "schema": {"type": "string"}},
            {"name": "include_secrets", "in": "query", "schema": _FLAG,
             "description": "true to write secret values (default false)"},
        ],
        "responses": {
            "200": {"description": "The document", "headers": _ETAG,
                    "content": {"application/yaml": {"schema": documents.JSON_SCHEMA}}},
            "400": error_answer("include_secrets is not true or false"),
            "404": error_answer("No such playbook of yours"),
            **COMMON_ERRORS,
        },
    }},
    "/playbooks/import": {"post": {
        "operationId": "importPlaybook",
        "summary": "Create or replace a playbook from a YAML document",
        "description": "Creates the caller's playbook of the document's id (201), or makes it "
                       "exactly the document (200; an identical document changes nothing and "
                       "keeps the version). Everything is validated, and the security rails "
                       "applied to every server, before anything is written. An invalid "
                       "document is a 400 whose details.fields name each problem by path "
                       "(servers[0].url) and details.locations give {line, column}.",
        "security": SECURITY,
        "parameters": [{"name": "dry_run", "in": "query", "schema": _FLAG,
                        "description": "true to check and report without writing"}],
        "requestBody": {"required": True, "content": {
            "application/yaml": {"schema": documents.JSON_SCHEMA},
            "text/yaml": {"schema": documents.JSON_SCHEMA},
        }},
        "responses": {
            "200": {"description": "Updated, unchanged, or (dry run) checked", "headers": _ETAG,
                    "content": {"application/json": {"schema": _IMPORTED}}},
            "201": {"description": "Created", "headers": _ETAG,
                    "content": {"application/json": {"schema": _IMPORTED}}},
            "400": error_answer("Invalid document (details.fields and details.locations by path), "
                          "a server refused by the rails, or an invalid dry_run"),
            "409": error_answer("The playbook changed, appeared or vanished during the import"),
            "413": error_answer("Document larger than 1 MiB"),
            "415": error_answer("Body is not application/yaml or text/yaml in UTF-8"),
            **COMMON_ERRORS,
        },
    }},
}
