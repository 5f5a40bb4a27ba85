"""The OpenAPI 3.1 description of ``/api/v1``, served at ``/api/v1/openapi.json``.

Written by hand next to the routes it describes; ``tests/test_openapi.py`` drives the running
daemon from this document with schemathesis, so a route that answers something the document
does not promise fails the suite.
"""

from __future__ import annotations

from typing import Any

from twisted.web.server import Request

from director import __version__
from director.web.api import api
from director.web.errors import write_json
from director.web.openapi_parts import (
    COMMON_ERRORS,
    NON_BLANK,
    SECURITY,
    error_answer,
    json_answer,
    ref,
)

_BODY_ERRORS = {
    "400": error_answer("Malformed JSON or invalid fields (details.fields names each)"),
    "413": error_answer("Body too large"),
    "415": error_answer("Body is not application/json"),
}
_PASSWORD = {"type": "string", "minLength": 8, "maxLength": 256, "pattern": "^[^\u0000]*$"}
#: A label: no control characters, something besides white space.
_NAME = {"type": "string", "minLength": 1, "maxLength": 100,
         "pattern": "^[^\u0000-\u001f\u007f-\u009f]*[^\\s\u0000-\u001f\u007f-\u009f]"
                    "[^\u0000-\u001f\u007f-\u009f]*$"}
_KEY_ID = {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


# --- playbooks ------------------------------------------------------------------------------
# Lengths and patterns mirror director.playbooks.model exactly, so that what the document calls
# valid the server accepts. Rules JSON Schema cannot state are in the descriptions.

_NO_NUL = "^[^\u0000]*$"
_PART_NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_PLAYBOOK_ID_PATTERN = "^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$"
#: An https URL naming a host by a dotted name whose last label starts with a letter (so never
#: an IP address), an optional port from 0 to 65535, then a path, query or fragment.
_HTTPS_URL_PATTERN = (
    "^https://(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\\.)+"
    "[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\\.?"
    "(?::(?:[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?"
    "(?:[/?#][^\\s\u0000]*)?$")


def _text(limit: int, *, nullable: bool = False, **extra: Any) -> dict[str, Any]:
    return {"type": ["string", "null"] if nullable else "string", "maxLength": limit,
            "pattern": _NO_NUL, **extra}


def _non_blank(limit: int, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": limit, "pattern": NON_BLANK,
            **extra}


def _absent(description: str) -> dict[str, Any]:
    return {"type": "null", "description": description}


_PART_NAME = {"type": "string", "pattern": _PART_NAME_PATTERN}
_PLAYBOOK_ID = {"name": "playbook_id", "in": "path", "required": True,
                "schema": {"type": "string", "pattern": _PLAYBOOK_ID_PATTERN}}
_SERVER_NAME = {"name": "name", "in": "path", "required": True, "description": "Server name",
                "schema": _PART_NAME}
_PROMPT_NAME = {"name": "name", "in": "path", "required": True, "description": "Prompt name",
                "schema": _PART_NAME}
_REVEAL_SECRETS = {
    "name": "reveal_secrets", "in": "query",
    "description": "Show the values of secret env/header entries (otherwise null); "
                   "1 and 0 are accepted too",
    "schema": {"type": "boolean", "default": False}}
_IF_MATCH = {
    "name": "If-Match", "in": "header",
    "description": "The playbook's ETag as last read: the write is refused with 409 "
                   "version_conflict if the playbook changed since",
    "schema": {"type": "string", "pattern": '^(?:W/)?"[0-9]+"$'}}
_PAGE = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
    {"name": "cursor", "in": "query", "description": "next_cursor of the previous page",
     "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$"}},
]
_ETAG = {"ETag": {"required": True, "description": "The playbook's version, quoted",
                  "schema": {"type": "string", "pattern": '^"[0-9]+"$'}}}
_NOT_FOUND = error_answer("No such playbook of yours (or no such server / prompt in it)")
_VERSION_CONFLICT = error_answer("If-Match is stale: code version_conflict, details.current_version")
_BAD_IF_MATCH = error_answer("If-Match is not an ETag (details.fields)")


def _with_etag(response: dict[str, Any]) -> dict[str, Any]:
    return {**response, "headers": _ETAG}


def _items(schema: dict[str, Any], description: str, paged: bool = False) -> dict[str, Any]:
    properties: dict[str, Any] = {"items": {"type": "array", "items": schema}}
    required = ["items"]
    if paged:
        properties["next_cursor"] = {"type": ["string", "null"]}
        required.append("next_cursor")
    return json_answer({"type": "object", "required": required, "properties": properties},
                 description)


def _playbook_schemas() -> dict[str, Any]:
    secret_in = {"anyOf": [
        _text(8192),
        {"type": "object", "additionalProperties": False, "required": ["value"],
         "properties": {"value": _text(8192), "secret": {"type": "boolean", "default": False}}},
    ], "description": 'A value, or {"value": …, "secret": true} to have it sealed at rest and '
                      "hidden in answers"}
    secret_out = {"anyOf": [
        {"type": "string"},
        {"type": "object", "required": ["secret", "value"],
         "properties": {"secret": {"const": True},
                        "value": {"type": ["string", "null"],
                                  "description": "null unless reveal_secrets"}}},
    ]}

    def secret_map(pattern: str, what: str) -> dict[str, Any]:
        return {"type": "object", "maxProperties": 200, "description": f"{what} -> value",
                "propertyNames": {"pattern": pattern}, "additionalProperties": secret_in}

    tool_list = {"type": ["array", "null"], "maxItems": 1000, "items": _text(4096)}
    common_in: dict[str, Any] = {
        "name": _PART_NAME,
        "disabled": {"type": "boolean", "default": False},
        "prefix": _text(64, nullable=True, description="Prepended to the server's tool names"),
        "include": {**tool_list, "description": "Only these tools (null: all)"},
        "exclude": {**tool_list, "description": "All tools but these (null: none excluded)"},
        "expose_prompts": {"type": "boolean", "default": False},
        "timeout_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600,
                            "default": 60},
    }
    stdio_in = {
        "type": {"const": "stdio"},
        "command": _non_blank(4096),
        "args": {"type": "array", "maxItems": 1000, "items": _text(4096)},
        "env": secret_map("^[A-Za-z_][A-Za-z0-9_]*$", "environment variable"),
        "cwd": _text(4096, nullable=True, pattern="^/[^\u0000]*$",
                     description="Absolute working directory"),
        "isolate_sessions": {"type": "boolean", "default": False},
        "url": _absent("Not for stdio servers"),
        "headers": _absent("Not for stdio servers"),
    }
    http_in = {
        "type": {"enum": ["http", "sse"]},
        "url": {"type": "string", "maxLength": 2048, "pattern": _HTTPS_URL_PATTERN,
                "description": "https and a host name that does not resolve to a loopback, "
                               "link-local or private address; an operator may allow http, "
                               "IP addresses and private networks with "
                               "DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS"},
        "headers": secret_map("^[!#$%&'*+.^_`|~0-9A-Za-z-]+$", "HTTP header"),
        **{name: _absent("Only for stdio servers")
           for name in ("command", "args", "env", "cwd", "isolate_sessions")},
    }
    #: include and exclude are alternatives: at most one of them may be a list.
    one_tool_filter = {"not": {"required": ["include", "exclude"],
                               "properties": {"include": {"type": "array"},
                                              "exclude": {"type": "array"}}}}

    def server_in(specific: dict[str, Any], required: list[str]) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "object", "additionalProperties": False,
                                  "properties": {**common_in, **specific}, **one_tool_filter}
        if required:
            schema["required"] = required
        return schema

    common_out = {
        "name": {"type": "string"}, "disabled": {"type": "boolean"},
        "prefix": {"type": "string"}, "include": {"type": ["array", "null"],
                                                  "items": {"type": "string"}},
        "exclude": {"type": ["array", "null"], "items": {"type": "string"}},
        "expose_prompts": {"type": "boolean"}, "timeout_seconds": {"type": "number"},
        "status": ref("ServerStatus"),
    }
    stdio_out = {"type": {"const": "stdio"}, "command": {"type": "string"},
                 "args": {"type": "array", "items": {"type": "string"}},
                 "env": {"type": "object", "additionalProperties": secret_out},
                 "cwd": {"type": ["string", "null"]}, "isolate_sessions": {"type": "boolean"}}
    http_out = {"type": {"enum": ["http", "sse"]}, "url": {"type": "string"},
                "headers": {"type": "object", "additionalProperties": secret_out}}
    argument_in = {"type": "object", "additionalProperties": False, "required": ["name"],
                   "properties": {"name": _PART_NAME, "description": _text(10_000, nullable=True),
                                  "required": {"type": "boolean", "default": False}}}
    prompt_in = {"name": _PART_NAME, "title": _text(10_000, nullable=True),
                 "description": _text(10_000, nullable=True), "body": _non_blank(100_000),
                 "arguments": {"type": "array", "maxItems": 50, "items": argument_in,
                               "description": "Argument names must differ"}}
    urls = {"type": "object", "required": ["streamable_http", "sse"],
            "properties": {"streamable_http": {"type": "string", "format": "uri"},
                           "sse": {"type": "string", "format": "uri"}}}
    playbook_fields = ["id", "name", "description", "position", "version", "created_at",
                       "updated_at", "urls", "servers", "prompts"]
    playbook_common = {
        "id": {"type": "string", "pattern": _PLAYBOOK_ID_PATTERN,
               "description": "Part of the MCP URLs; never changes"},
        "name": {"type": "string"}, "description": {"type": "string"},
        "position": {"type": "integer"},
        "version": {"type": "integer", "minimum": 1, "description": "Also the ETag"},
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"}, "urls": urls}
    playbook_name = {**_non_blank(200), "description": "Surrounding white space is dropped"}
    return {
        "ServerStatus": {
            "readOnly": True,
            "description": "Whether the current configuration lets this server run, computed "
                           "on every answer (so every instance agrees). A refused server was "
                           "stored while an operator's DANGEROUSLY_* flag allowed it: it is "
                           "never started or connected to, and its tools, prompts and "
                           "resources are absent from the playbook's MCP endpoint until the "
                           "flag is set again or the server is changed to pass the rules",
            "oneOf": [
                {"type": "object", "additionalProperties": False, "required": ["state"],
                 "properties": {"state": {"const": "allowed"},
                                "authorization": ref("ServerAuthorization")}},
                {"type": "object", "additionalProperties": False,
                 "required": ["state", "reason"],
                 "properties": {"state": {"const": "refused"},
                                "reason": {"type": "string",
                                           "description": "refused by configuration: what "
                                                          "needs which flag"},
                                "authorization": ref("ServerAuthorization")}}]},
        "StdioServer": {"type": "object", "required": [*common_out, *stdio_out],
                        "properties": {**common_out, **stdio_out}},
        "HttpServer": {"type": "object", "required": [*common_out, *http_out],
                       "properties": {**common_out, **http_out}},
        "Server": {"oneOf": [ref("StdioServer"), ref("HttpServer")],
                   "discriminator": {"propertyName": "type", "mapping": {
                       "stdio": "#/components/schemas/StdioServer",
                       "http": "#/components/schemas/HttpServer",
                       "sse": "#/components/schemas/HttpServer"}}},
        "NewStdioServer": {
            **server_in(stdio_in, ["name", "type", "command"]),
            "description": "Runs a command on the gateway host: refused (400) unless an "
                           "operator set DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS"},
        "NewHttpServer": server_in(http_in, ["name", "type", "url"]),
        "NewServer": {"oneOf": [ref("NewStdioServer"), ref("NewHttpServer")],
                      "discriminator": {"propertyName": "type", "mapping": {
                          "stdio": "#/components/schemas/NewStdioServer",
                          "http": "#/components/schemas/NewHttpServer",
                          "sse": "#/components/schemas/NewHttpServer"}}},
        "StdioServerChange": server_in(stdio_in, []),
        "HttpServerChange": server_in(http_in, []),
        "ServerChange": {
            "anyOf": [ref("StdioServerChange"), ref("HttpServerChange")],
            "description": "The fields to change. type cannot change, and a field of the other "
                           "type's variant is refused; setting include (exclude) needs the "
                           "other null, as stored or in the same change"},
        "PromptArgument": {"type": "object", "required": ["name", "description", "required"],
                           "properties": {"name": {"type": "string"},
                                          "description": {"type": "string"},
                                          "required": {"type": "boolean"}}},
        "Prompt": {"type": "object",
                   "required": ["name", "title", "description", "body", "arguments"],
                   "properties": {"name": {"type": "string"}, "title": {"type": "string"},
                                  "description": {"type": "string"}, "body": {"type": "string"},
                                  "arguments": {"type": "array",
                                                "items": ref("PromptArgument")}}},
        "NewPrompt": {"type": "object", "additionalProperties": False,
                      "required": ["name", "body"], "properties": prompt_in},
        "PromptChange": {"type": "object", "additionalProperties": False,
                         "properties": prompt_in},
        "Playbook": {"type": "object", "required": playbook_fields, "properties": {
            **playbook_common, "servers": {"type": "array", "items": ref("Server")},
            "prompts": {"type": "array", "items": ref("Prompt")}}},
        "PlaybookSummary": {"type": "object", "required": playbook_fields, "properties": {
            **playbook_common, "servers": {"type": "integer", "minimum": 0},
            "prompts": {"type": "integer", "minimum": 0}}},
        "NewPlaybook": {
            "type": "object", "additionalProperties": False, "required": ["name"],
            "properties": {
                "name": playbook_name,
                "description": _text(10_000, nullable=True),
                "position": {"type": "integer", "minimum": -1_000_000, "maximum": 1_000_000,
                             "default": 0, "description": "Lists sort by position, then name"},
                "id": {"type": ["string", "null"], "pattern": _PLAYBOOK_ID_PATTERN,
                       "description": "Default: derived from the name (lower-cased, runs of "
                                      "other characters made '-')"}},
            # Without an explicit id the name must yield one: a letter or digit.
            "anyOf": [{"required": ["id"], "properties": {"id": {"type": "string"}}},
                      {"properties": {"name": {
                          "pattern": "^[^\u0000]*[A-Za-z0-9][^\u0000]*$"}}}]},
        "PlaybookChange": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "name": playbook_name,
                "description": _text(10_000, nullable=True),
                "position": {"type": "integer", "minimum": -1_000_000, "maximum": 1_000_000},
                "version": {"type": "integer",
                            "description": "Accepted and ignored: send If-Match instead"}}},
        "ToolChanges": {
            "type": "object", "additionalProperties": False, "required": ["tools"],
            "properties": {"tools": {"type": "array", "minItems": 1, "maxItems": 1000, "items": {
                "type": "object", "additionalProperties": False,
                "required": ["server", "name", "disabled"],
                "properties": {
                    "server": {**_PART_NAME, "description": "A server of the playbook"},
                    "name": {"type": "string", "minLength": 1, "maxLength": 256,
                             "pattern": _NO_NUL, "description": "Tool name"},
                    "disabled": {"type": "boolean"}}}}},
            "description": "Enables or disables tools by editing each server's include "
                           "(if it has one) or exclude list"},
        "HistoryEntry": {
            "type": "object", "required": ["seq", "at", "actor", "action", "detail", "version"],
            "properties": {
                "seq": {"type": "integer"}, "at": {"type": "string", "format": "date-time"},
                "actor": {"type": "string", "description": "Email of who made the change"},
                "action": {"type": "string", "description": "create, update, delete, "
                           "add_server, update_server, remove_server, update_tools, "
                           "add_prompt, update_prompt, remove_prompt, import"},
                "detail": {"type": "object"},
                "version": {"type": "integer", "description": "The version it produced"}}},
        "Connection": {
            "type": "object", "required": ["playbook_id", "urls", "headers", "clients"],
            "properties": {
                "playbook_id": {"type": "string"}, "urls": urls,
                "headers": {"type": "object", "required": ["x-api-key"], "properties": {
                    "x-api-key": {"type": "string", "description": "The key the request was "
                                  "made with, or a placeholder (keys are stored hashed)"}}},
                "clients": {
                    "type": "object",
                    "required": ["claude_desktop", "claude_code", "cursor", "vscode"],
                    "properties": {
                        "claude_desktop": {"type": "object"},
                        "claude_code": {"type": "object", "required": ["command"],
                                        "properties": {"command": {"type": "string"}}},
                        "cursor": {"type": "object"}, "vscode": {"type": "object"}}}}},
    }


def _playbook_paths() -> dict[str, Any]:
    base = [_PLAYBOOK_ID]
    write = {**COMMON_ERRORS, "400": _BAD_IF_MATCH, "404": _NOT_FOUND,
             "409": _VERSION_CONFLICT}
    body_write = {**write, **_BODY_ERRORS,
                  "400": error_answer("Malformed JSON, invalid fields (details.fields names each) "
                                "or a bad If-Match")}
    read = {**COMMON_ERRORS, "404": _NOT_FOUND}
    read_secrets = {**read, "400": error_answer("reveal_secrets is not true or false")}

    def op(operation_id: str, summary: str, parameters: list[dict[str, Any]],
           responses: dict[str, Any], body: str | None = None) -> dict[str, Any]:
        operation: dict[str, Any] = {"operationId": operation_id, "summary": summary,
                                     "security": SECURITY, "parameters": parameters,
                                     "responses": responses}
        if body is not None:
            operation["requestBody"] = _body(ref(body))
        return operation

    # The playbook itself comes after its parts: tools that walk the document in order (the
    # schemathesis test) then create before they delete.
    return {
        "/playbooks": {
            "get": op("listPlaybooks", "The caller's playbooks, by position then name", _PAGE, {
                "200": _items(ref("PlaybookSummary"), "A page of playbooks", paged=True),
                "400": error_answer("Invalid limit or cursor"), **COMMON_ERRORS}),
            "post": op("createPlaybook", "Create a playbook", [], {
                "201": _with_etag(json_answer(ref("Playbook"), "Created")),
                "409": error_answer("The id is already one of your playbooks'"),
                **_BODY_ERRORS, **COMMON_ERRORS}, body="NewPlaybook"),
        },
        "/playbooks/{playbook_id}/servers": {
            "get": op("listServers", "The playbook's upstream servers", [*base, _REVEAL_SECRETS],
                      {"200": _with_etag(_items(ref("Server"), "Servers, in order")),
                       **read_secrets}),
            "post": op("addServer", "Add an upstream server", [*base, _IF_MATCH], {
                "201": _with_etag(json_answer(ref("Server"), "Added")),
                **body_write,
                "400": error_answer("Malformed JSON, invalid fields (details.fields names each), a "
                              "server the security rails refuse, or a bad If-Match"),
                "409": error_answer("A server of that name exists (code conflict), or If-Match is "
                              "stale (code version_conflict)")}, body="NewServer"),
        },
        "/playbooks/{playbook_id}/tools": {
            "patch": op("updateTools", "Enable or disable tools, several at once",
                        [*base, _IF_MATCH],
                        {"200": _with_etag(json_answer(ref("Playbook"), "Changed")), **body_write},
                        body="ToolChanges"),
        },
        "/playbooks/{playbook_id}/servers/{name}": {
            "get": op("getServer", "One upstream server", [*base, _SERVER_NAME, _REVEAL_SECRETS],
                      {"200": _with_etag(json_answer(ref("Server"), "The server")),
                       **read_secrets}),
            "patch": op("updateServer", "Change (or rename) an upstream server",
                        [*base, _SERVER_NAME, _IF_MATCH], {
                            "200": _with_etag(json_answer(ref("Server"), "Changed")), **body_write,
                            "400": error_answer("Malformed JSON, invalid fields (details.fields "
                                          "names each), a server the security rails refuse, "
                                          "or a bad If-Match"),
                            "409": error_answer("Renamed to a name in use (code conflict), or "
                                          "If-Match is stale (code version_conflict)")},
                        body="ServerChange"),
            "delete": op("removeServer", "Remove an upstream server",
                         [*base, _SERVER_NAME, _IF_MATCH],
                         {"204": {"description": "Removed", "headers": _ETAG}, **write}),
        },
        "/playbooks/{playbook_id}/prompts": {
            "get": op("listPrompts", "The playbook's prompts", base,
                      {"200": _with_etag(_items(ref("Prompt"), "Prompts, in order")), **read}),
            "post": op("addPrompt", "Add a prompt", [*base, _IF_MATCH], {
                "201": _with_etag(json_answer(ref("Prompt"), "Added")), **body_write,
                "409": error_answer("A prompt of that name exists (code conflict), or If-Match is "
                              "stale (code version_conflict)")}, body="NewPrompt"),
        },
        "/playbooks/{playbook_id}/prompts/{name}": {
            "get": op("getPrompt", "One prompt", [*base, _PROMPT_NAME],
                      {"200": _with_etag(json_answer(ref("Prompt"), "The prompt")), **read}),
            "patch": op("updatePrompt", "Change (or rename) a prompt",
                        [*base, _PROMPT_NAME, _IF_MATCH], {
                            "200": _with_etag(json_answer(ref("Prompt"), "Changed")), **body_write,
                            "409": error_answer("Renamed to a name in use (code conflict), or "
                                          "If-Match is stale (code version_conflict)")},
                        body="PromptChange"),
            "delete": op("removePrompt", "Remove a prompt", [*base, _PROMPT_NAME, _IF_MATCH],
                         {"204": {"description": "Removed", "headers": _ETAG}, **write}),
        },
        "/playbooks/{playbook_id}/connection": {
            "get": op("playbookConnection", "Ready-to-paste MCP client configuration", base,
                      {"200": json_answer(ref("Connection"), "Snippets per client"), **read}),
        },
        "/playbooks/{playbook_id}/history": {
            "get": op("playbookHistory", "Every change to the playbook, newest first",
                      [*base, *_PAGE], {
                          "200": _items(ref("HistoryEntry"), "A page of changes", paged=True),
                          "400": error_answer("Invalid limit or cursor"), **read}),
        },
        "/playbooks/{playbook_id}": {
            "get": op("getPlaybook", "A playbook with its servers and prompts",
                      [*base, _REVEAL_SECRETS],
                      {"200": _with_etag(json_answer(ref("Playbook"), "The playbook")),
                       **read_secrets}),
            "patch": op("updatePlaybook", "Change a playbook's name, description or position",
                        [*base, _IF_MATCH],
                        {"200": _with_etag(json_answer(ref("Playbook"), "Changed")), **body_write},
                        body="PlaybookChange"),
            "delete": op("deletePlaybook", "Delete a playbook (its history is kept)",
                         [*base, _IF_MATCH], {"204": {"description": "Deleted"}, **write}),
        },
    }


def document() -> dict[str, Any]:
    """The whole document: the paths below plus those of the YAML routes, of the registry, of
    Connected apps (``director.oauth.server.connected``) and of upstream OAuth."""
    from director.oauth.client.routes import OPENAPI_SCHEMAS, UPSTREAM_OAUTH_PATHS
    from director.oauth.server.connected import OPENAPI_PATHS as CONNECTED_APPS
    from director.web import registry_openapi
    from director.web.playbooks_yaml_api import OPENAPI_PATHS

    described = _document()
    described["paths"] |= OPENAPI_PATHS | CONNECTED_APPS | UPSTREAM_OAUTH_PATHS
    described["components"]["schemas"] |= OPENAPI_SCHEMAS
    registry_openapi.extend(described)
    return described


def _document() -> dict[str, Any]:
    credentials = {
        "type": "object", "additionalProperties": False, "required": ["email", "password"],
        "properties": {
            "email": {"type": "string", "format": "email", "maxLength": 254},
            "password": _PASSWORD,
            "name": {"type": "string", "description": "Accepted and ignored (old clients)"},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Director management API", "version": __version__},
        "servers": [{"url": "/api/v1"}],
        "components": {
            "securitySchemes": {
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "dk_…"},
                "sessionCookie": {"type": "apiKey", "in": "cookie", "name": "director_session"},
            },
            "schemas": {
                "Error": {
                    "type": "object", "required": ["error"],
                    "properties": {"error": {
                        "type": "object", "required": ["code", "message", "details"],
                        "properties": {"code": {"type": "string"},
                                       "message": {"type": "string"},
                                       "details": {"type": "object"}},
                    }},
                },
                "User": {
                    "type": "object", "required": ["id", "email", "status", "created_at"],
                    "properties": {
                        "id": {"type": "string", "format": "uuid"},
                        "email": {"type": "string"},
                        "status": {"enum": ["active", "pending", "disabled"]},
                        "created_at": {"type": "string", "format": "date-time"},
                    },
                },
                "ApiKey": {
                    "type": "object", "required": ["id", "name", "prefix", "created_at"],
                    "properties": {
                        "id": {"type": "string", "format": "uuid"},
                        "name": {"type": "string"},
                        "prefix": {"type": "string", "description": "First characters of the key"},
                        "created_at": {"type": "string", "format": "date-time"},
                        "rate_limit": {"type": "object", "properties": {
                            "window_seconds": {"type": ["integer", "null"]},
                            "max_requests": {"type": ["integer", "null"]}}},
                    },
                },
                "NewApiKey": {"allOf": [ref("ApiKey"), {
                    "type": "object", "required": ["key"],
                    "properties": {"key": {"type": "string", "pattern": "^dk_[A-Za-z0-9]{64}$",
                                           "description": "Shown once"}},
                }]},
                **_playbook_schemas(),
            },
        },
        "paths": {
            "/auth/signup": {"post": {
                "operationId": "signup", "summary": "Create an account and sign in",
                "requestBody": _body(credentials),
                "responses": {
                    "201": json_answer({"type": "object", "required": ["user", "api_key"],
                                  "properties": {"user": ref("User"),
                                                 "api_key": ref("NewApiKey")}},
                                 "Signed up; the session cookie is set"),
                    "409": error_answer("The email is already registered"),
                    "429": error_answer("Too many sign-ups from this address "
                                  "(SIGNUP_RATE_LIMIT_PER_HOUR; Retry-After)"),
                    **_BODY_ERRORS, "503": COMMON_ERRORS["503"],
                },
            }},
            "/auth/login": {"post": {
                "operationId": "login", "summary": "Sign in with email and password",
                "requestBody": _body(credentials),
                "responses": {
                    "200": json_answer({"type": "object", "required": ["user"],
                                  "properties": {"user": ref("User")}},
                                 "Signed in; the session cookie is set"),
                    "401": error_answer("Wrong email or password"),
                    "403": error_answer("The account is disabled"),
                    "429": error_answer("Too many failed logins"),
                    **_BODY_ERRORS, "503": COMMON_ERRORS["503"],
                },
            }},
            "/auth/logout": {"post": {
                "operationId": "logout", "summary": "Sign out (ends the cookie session)",
                "security": SECURITY,
                "responses": {"204": {"description": "Signed out; the cookie is cleared"},
                              **COMMON_ERRORS},
            }},
            "/me": {"get": {
                "operationId": "me", "summary": "The authenticated user",
                "security": SECURITY,
                "responses": {"200": json_answer({"allOf": [ref("User"), {
                    "type": "object", "required": ["authenticated_by"],
                    "properties": {"authenticated_by": {"enum": ["api_key", "session"]},
                                   "api_key": ref("ApiKey")}}]}, "The caller"),
                    **COMMON_ERRORS},
            }},
            "/me/password": {"post": {
                "operationId": "changePassword",
                "summary": "Change the password; every other session is signed out",
                "security": SECURITY,
                "requestBody": _body({
                    "type": "object", "additionalProperties": False,
                    "required": ["current_password", "new_password"],
                    "properties": {"current_password": {"type": "string"},
                                   "new_password": _PASSWORD}}),
                "responses": {"204": {"description": "Changed"}, **_BODY_ERRORS,
                              **COMMON_ERRORS},
            }},
            "/api-keys": {
                "get": {
                    "operationId": "listApiKeys", "summary": "The caller's live API keys",
                    "security": SECURITY,
                    "parameters": [
                        {"name": "limit", "in": "query",
                         "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
                        {"name": "cursor", "in": "query", "description": "next_cursor of the "
                         "previous page", "schema": {"type": "string",
                                                     "pattern": "^[A-Za-z0-9_-]+$"}},
                    ],
                    "responses": {"200": json_answer({
                        "type": "object", "required": ["items", "next_cursor"],
                        "properties": {"items": {"type": "array", "items": ref("ApiKey")},
                                       "next_cursor": {"type": ["string", "null"]}}},
                        "A page of keys, oldest first"),
                        "400": error_answer("Invalid limit or cursor"), **COMMON_ERRORS},
                },
                "post": {
                    "operationId": "createApiKey", "summary": "Create a named API key",
                    "security": SECURITY,
                    "requestBody": _body({"type": "object", "additionalProperties": False,
                                          "required": ["name"],
                                          "properties": {"name": _NAME}}),
                    "responses": {"201": json_answer(ref("NewApiKey"), "Created; the key is shown once"),
                                  "409": error_answer("A live key of that name exists"),
                                  **_BODY_ERRORS, **COMMON_ERRORS},
                },
            },
            "/api-keys/{key_id}": {"delete": {
                "operationId": "revokeApiKey", "summary": "Revoke a key (everywhere within a second)",
                "security": SECURITY, "parameters": [_KEY_ID],
                "responses": {"204": {"description": "Revoked"},
                              "404": error_answer("No such key of yours"), **COMMON_ERRORS},
            }},
            "/api-keys/{key_id}/regenerate": {"post": {
                "operationId": "regenerateApiKey",
                "summary": "Revoke a key and issue a new one with the same name and limits",
                "security": SECURITY, "parameters": [_KEY_ID],
                "responses": {"200": json_answer(ref("NewApiKey"), "The replacement, shown once"),
                              "404": error_answer("No such key of yours"), **COMMON_ERRORS},
            }},
            **_playbook_paths(),
            "/openapi.json": {"get": {
                "operationId": "openapi", "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3.1",
                                      "content": {"application/json": {}}}},
            }},
        },
    }


class OpenApiRoutes:
    @api.route("/openapi.json", methods=["GET"])
    def openapi(self, request: Request) -> bytes:
        return write_json(request, 200, document())
