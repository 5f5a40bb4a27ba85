"""The OpenAPI description of the registry routes (``registry_api``): their paths and schemas,
merged into ``openapi.document``."""

from __future__ import annotations

from typing import Any

from director.registry.install import FORMATS
from director.web.openapi_parts import COMMON_ERRORS, SECURITY, error_answer, json_answer, ref

_JSON = "application/json"


_COMMON = {
    **COMMON_ERRORS,
    "502": error_answer("The registry is down, slow or answered nonsense (code "
                        "registry_unavailable); nothing was changed"),
}
_BODY = {"413": error_answer("Body too large"),
         "415": error_answer("Body is not application/json")}
_TEXT = {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[^\u0000-\u001f]+$"}
_REGISTRY_NAME = {"type": "string", "maxLength": 200,
                  "pattern": "^[a-zA-Z0-9.-]{1,200}/[a-zA-Z0-9._-]{1,200}$"}
_PLAYBOOK_ID = {"name": "playbook_id", "in": "path", "required": True,
                "schema": {"type": "string", "pattern": "^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$"}}
_SERVER_NAME = {"name": "name", "in": "path", "required": True, "description": "Server name",
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"}}
_IF_MATCH = {"name": "If-Match", "in": "header",
             "description": "The playbook's ETag as last read (409 version_conflict if stale)",
             "schema": {"type": "string", "pattern": '^(?:W/)?"[0-9]+"$'}}
_ETAG = {"ETag": {"required": True, "description": "The playbook's version, quoted",
                  "schema": {"type": "string", "pattern": '^"[0-9]+"$'}}}
_INPUTS = {"type": ["object", "null"], "maxProperties": 100,
           "additionalProperties": {"type": ["string", "null"], "maxLength": 8192},
           "description": "Field id (env.NAME, header.NAME, arg.KEY, url.NAME, or ID.VARIABLE) "
                          "-> value; the entry's options list the fields. An update keeps the "
                          "values not given"}
_SECRET_OUT = {"anyOf": [
    {"type": "string"},
    {"type": "object", "required": ["secret", "value"],
     "properties": {"secret": {"const": True}, "value": {"type": ["string", "null"]}}}]}
_NULLABLE_TEXT = {"type": ["string", "null"]}

SCHEMAS: dict[str, Any] = {
    "RegistryEntry": {"type": "object", "required": [
        "name", "version", "title", "description", "website_url", "repository_url",
        "is_latest", "status", "published_at"], "properties": {
        "name": {"type": "string"}, "version": {"type": "string"},
        "title": {"type": "string"},
        "description": {"type": "string", "description": "Cut to 1000 characters"},
        "website_url": _NULLABLE_TEXT, "repository_url": _NULLABLE_TEXT,
        "is_latest": {"type": ["boolean", "null"]}, "status": _NULLABLE_TEXT,
        "published_at": _NULLABLE_TEXT}},
    "RegistryPage": {"type": "object", "required": ["registry", "items", "next_cursor",
                                                    "skipped"], "properties": {
        "registry": {"type": "string", "description": "REGISTRY_URL"},
        "items": {"type": "array", "items": ref("RegistryEntry")},
        "next_cursor": _NULLABLE_TEXT,
        "skipped": {"type": "integer", "minimum": 0,
                    "description": "Entries of the registry's page that were not servers"}}},
    "RegistryField": {"type": "object", "required": [
        "id", "label", "description", "required", "secret", "default", "choices", "format",
        "placeholder"], "properties": {
        "id": {"type": "string"}, "label": {"type": "string"},
        "description": {"type": "string"}, "required": {"type": "boolean"},
        "secret": {"type": "boolean", "description": "Sealed at rest, hidden in answers"},
        "default": _NULLABLE_TEXT,
        "choices": {"type": ["array", "null"], "items": {"type": "string"}},
        "format": {"enum": list(FORMATS)}, "placeholder": _NULLABLE_TEXT}},
    "RegistryOption": {"type": "object", "required": ["choice", "label", "installable",
                                                      "problem"], "properties": {
        "choice": {"type": "string", "description": "package:N or remote:N"},
        "label": {"type": "string"}, "installable": {"type": "boolean"},
        "problem": {**_NULLABLE_TEXT, "description": "Why it cannot be installed"},
        "runtime": {**_NULLABLE_TEXT, "description": "npx, uvx, or null for a remote"},
        "fields": {"type": "array", "items": ref("RegistryField")}}},
    "RegistryEntryDetails": {"allOf": [ref("RegistryEntry"), {
        "type": "object", "required": ["versions", "options"], "properties": {
            "versions": {"type": "array", "items": {"type": "string"},
                         "description": "Newest first"},
            "options": {"type": "array", "items": ref("RegistryOption")}}}]},
    "RegistryInstall": {"type": "object", "additionalProperties": False, "required": ["name"],
                        "properties": {
        "name": _REGISTRY_NAME,
        "version": {**_TEXT, "type": ["string", "null"], "description": "Default: latest"},
        "choice": {"type": ["string", "null"], "minLength": 1, "maxLength": 32,
                   "pattern": "^[^\u0000-\u001f]+$",
                   "description": "package:N or remote:N; default: the first installable"},
        "server_name": {"type": ["string", "null"],
                        "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                        "description": "Default: the registry name's last part"},
        "inputs": _INPUTS}},
    "RegistryUpdate": {"type": "object", "additionalProperties": False, "properties": {
        "version": {**_TEXT, "type": ["string", "null"], "description": "Default: latest"},
        "inputs": _INPUTS}},
    "ServerProvenance": {"type": "object", "readOnly": True,
                         "required": ["registry", "name", "version", "inputs"],
                         "description": "Where a registry server comes from; its command, "
                                        "args, env, url and headers derive from it",
                         "properties": {"registry": {"type": "string"},
                                        "name": {"type": "string"},
                                        "version": {"type": "string"},
                                        "inputs": {"type": "object",
                                                   "additionalProperties": _SECRET_OUT}}},
    "RegistryState": {"allOf": [ref("ServerProvenance"), {
        "type": "object", "required": ["latest_version", "update_available", "problem"],
        "properties": {"latest_version": _NULLABLE_TEXT,
                       "update_available": {"type": "boolean"},
                       "problem": {**_NULLABLE_TEXT,
                                   "description": "Why the registry could not say"}}}]},
}


def _op(operation_id: str, summary: str, parameters: list[dict[str, Any]],
        responses: dict[str, Any], body: str | None = None) -> dict[str, Any]:
    operation: dict[str, Any] = {"operationId": operation_id, "summary": summary,
                                 "security": SECURITY, "parameters": parameters,
                                 "responses": {**_COMMON, **responses}}
    if body is not None:
        operation["requestBody"] = {"required": True,
                                    "content": {_JSON: {"schema": ref(body)}}}
    return operation


_WRITE_400 = error_answer("Invalid fields or inputs (details.fields names each, e.g. "
                    "inputs.env.API_KEY), an option Director cannot install, a server the "
                    "rails or the trust setting (REGISTRY_TRUST) refuse, or a bad If-Match")

PATHS: dict[str, Any] = {
    "/registry/servers": {"get": _op(
        "searchRegistry", "Servers of REGISTRY_URL (their latest versions), a page", [
            {"name": "q", "in": "query", "schema": {"type": "string", "maxLength": 200}},
            {"name": "limit", "in": "query",
             "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
            {"name": "cursor", "in": "query", "description": "next_cursor of the last page",
             "schema": {"type": "string", "maxLength": 1024}}],
        {"200": json_answer(ref("RegistryPage"), "A page"),
         "400": error_answer("Invalid q, limit or cursor")})},
    "/registry/servers/{namespace}/{name}": {"get": _op(
        "showRegistryEntry", "One registry entry: versions, installable options, inputs", [
            {"name": "namespace", "in": "path", "required": True,
             "schema": {"type": "string", "pattern": "^[a-zA-Z0-9.-]{1,200}$"}},
            {"name": "name", "in": "path", "required": True,
             "schema": {"type": "string", "pattern": "^[a-zA-Z0-9._-]{1,200}$"}},
            {"name": "version", "in": "query", "description": "Default: latest",
             "schema": {"type": "string", "maxLength": 255}}],
        {"200": json_answer(ref("RegistryEntryDetails"), "The entry"),
         "404": error_answer("No such server or version in the registry (code not_in_registry)")})},
    "/playbooks/{playbook_id}/servers/from-registry": {"post": _op(
        "installFromRegistry", "Install a registry entry as a server of the playbook",
        [_PLAYBOOK_ID, _IF_MATCH],
        {"201": {**json_answer(ref("Server"), "Installed"), "headers": _ETAG}, **_BODY,
         "400": _WRITE_400,
         "404": error_answer("No such playbook of yours, or no such entry (code not_in_registry)"),
         "409": error_answer("A server of that name exists (code conflict), or If-Match is stale "
                       "(code version_conflict)")}, body="RegistryInstall")},
    "/playbooks/{playbook_id}/servers/{name}/registry": {"get": _op(
        "serverRegistryState", "A registry server's provenance and whether an update exists",
        [_PLAYBOOK_ID, _SERVER_NAME],
        {"200": json_answer(ref("RegistryState"), "Provenance and the latest version"),
         "404": error_answer("No such playbook or server, or a server not from a registry")})},
    "/playbooks/{playbook_id}/servers/{name}/registry-update": {"post": _op(
        "updateFromRegistry", "Move a registry server to another version, keeping its inputs",
        [_PLAYBOOK_ID, _SERVER_NAME, _IF_MATCH],
        {"200": {**json_answer(ref("Server"), "Updated"), "headers": _ETAG}, **_BODY,
         "400": _WRITE_400,
         "404": error_answer("No such playbook, server or version (code not_in_registry)"),
         "409": error_answer("If-Match is stale (code version_conflict)")}, body="RegistryUpdate")},
}


def extend(document: dict[str, Any]) -> None:
    """Add the registry's paths and schemas; a server answer may carry its provenance."""
    document["paths"] |= PATHS
    schemas = document["components"]["schemas"]
    schemas |= SCHEMAS
    for variant in ("StdioServer", "HttpServer"):
        schemas[variant]["properties"]["registry"] = ref("ServerProvenance")
