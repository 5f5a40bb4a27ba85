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


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_SECURITY: list[dict[str, list[str]]] = [{"apiKeyHeader": []}, {"bearer": []}, {"sessionCookie": []}]
_COMMON_ERRORS = {
    "401": _error("No credential, or a wrong, revoked or expired one"),
    "403": _error("Pending account (waitlist), or a cookie request failing the CSRF check"),
    "429": _error("Rate limit of the API key exceeded"),
    "503": _error("The database is unavailable"),
}
_BODY_ERRORS = {
    "400": _error("Malformed JSON or invalid fields (details.fields names each)"),
    "413": _error("Body too large"),
    "415": _error("Body is not application/json"),
}
_PASSWORD = {"type": "string", "minLength": 8, "maxLength": 256, "pattern": "^[^\u0000]*$"}
#: A label: no control characters, something besides white space.
_NAME = {"type": "string", "minLength": 1, "maxLength": 100,
         "pattern": "^[^\u0000-\u001f\u007f-\u009f]*[^\\s\u0000-\u001f\u007f-\u009f]"
                    "[^\u0000-\u001f\u007f-\u009f]*$"}
_KEY_ID = {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def document() -> dict[str, Any]:
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
                "NewApiKey": {"allOf": [_ref("ApiKey"), {
                    "type": "object", "required": ["key"],
                    "properties": {"key": {"type": "string", "pattern": "^dk_[A-Za-z0-9]{64}$",
                                           "description": "Shown once"}},
                }]},
            },
        },
        "paths": {
            "/auth/signup": {"post": {
                "operationId": "signup", "summary": "Create an account and sign in",
                "requestBody": _body(credentials),
                "responses": {
                    "201": _json({"type": "object", "required": ["user", "api_key"],
                                  "properties": {"user": _ref("User"),
                                                 "api_key": _ref("NewApiKey")}},
                                 "Signed up; the session cookie is set"),
                    "409": _error("The email is already registered"),
                    **_BODY_ERRORS, "503": _COMMON_ERRORS["503"],
                },
            }},
            "/auth/login": {"post": {
                "operationId": "login", "summary": "Sign in with email and password",
                "requestBody": _body(credentials),
                "responses": {
                    "200": _json({"type": "object", "required": ["user"],
                                  "properties": {"user": _ref("User")}},
                                 "Signed in; the session cookie is set"),
                    "401": _error("Wrong email or password"),
                    "403": _error("The account is disabled"),
                    "429": _error("Too many failed logins"),
                    **_BODY_ERRORS, "503": _COMMON_ERRORS["503"],
                },
            }},
            "/auth/logout": {"post": {
                "operationId": "logout", "summary": "Sign out (ends the cookie session)",
                "security": _SECURITY,
                "responses": {"204": {"description": "Signed out; the cookie is cleared"},
                              **_COMMON_ERRORS},
            }},
            "/me": {"get": {
                "operationId": "me", "summary": "The authenticated user",
                "security": _SECURITY,
                "responses": {"200": _json({"allOf": [_ref("User"), {
                    "type": "object", "required": ["authenticated_by"],
                    "properties": {"authenticated_by": {"enum": ["api_key", "session"]},
                                   "api_key": _ref("ApiKey")}}]}, "The caller"),
                    **_COMMON_ERRORS},
            }},
            "/me/password": {"post": {
                "operationId": "changePassword",
                "summary": "Change the password; every other session is signed out",
                "security": _SECURITY,
                "requestBody": _body({
                    "type": "object", "additionalProperties": False,
                    "required": ["current_password", "new_password"],
                    "properties": {"current_password": {"type": "string"},
                                   "new_password": _PASSWORD}}),
                "responses": {"204": {"description": "Changed"}, **_BODY_ERRORS,
                              **_COMMON_ERRORS},
            }},
            "/api-keys": {
                "get": {
                    "operationId": "listApiKeys", "summary": "The caller's live API keys",
                    "security": _SECURITY,
                    "parameters": [
                        {"name": "limit", "in": "query",
                         "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
                        {"name": "cursor", "in": "query", "description": "next_cursor of the "
                         "previous page", "schema": {"type": "string",
                                                     "pattern": "^[A-Za-z0-9_-]+$"}},
                    ],
                    "responses": {"200": _json({
                        "type": "object", "required": ["items", "next_cursor"],
                        "properties": {"items": {"type": "array", "items": _ref("ApiKey")},
                                       "next_cursor": {"type": ["string", "null"]}}},
                        "A page of keys, oldest first"),
                        "400": _error("Invalid limit or cursor"), **_COMMON_ERRORS},
                },
                "post": {
                    "operationId": "createApiKey", "summary": "Create a named API key",
                    "security": _SECURITY,
                    "requestBody": _body({"type": "object", "additionalProperties": False,
                                          "required": ["name"],
                                          "properties": {"name": _NAME}}),
                    "responses": {"201": _json(_ref("NewApiKey"), "Created; the key is shown once"),
                                  "409": _error("A live key of that name exists"),
                                  **_BODY_ERRORS, **_COMMON_ERRORS},
                },
            },
            "/api-keys/{key_id}": {"delete": {
                "operationId": "revokeApiKey", "summary": "Revoke a key (everywhere within a second)",
                "security": _SECURITY, "parameters": [_KEY_ID],
                "responses": {"204": {"description": "Revoked"},
                              "404": _error("No such key of yours"), **_COMMON_ERRORS},
            }},
            "/api-keys/{key_id}/regenerate": {"post": {
                "operationId": "regenerateApiKey",
                "summary": "Revoke a key and issue a new one with the same name and limits",
                "security": _SECURITY, "parameters": [_KEY_ID],
                "responses": {"200": _json(_ref("NewApiKey"), "The replacement, shown once"),
                              "404": _error("No such key of yours"), **_COMMON_ERRORS},
            }},
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
