"""From HTML forms to the REST API: read a form body, turn it into the API's JSON body, and
call the API's own route function with it.

Nothing here validates a value by itself: the JSON built from a form goes through the same
route function (``web/playbooks_api.py``, ``web/accounts_api.py``, …) and so the same model
and validation code (``playbooks/model.py``, ``accounts/validation.py``) as a request to
``/api/v1``; what it refuses comes back as ``ValidationFailed`` / ``ApiError`` and is shown
next to the form. The one exception is the try-a-tool form, whose fields are typed by the
upstream tool's JSON schema, not by Director's model (``tool_arguments``).
"""

from __future__ import annotations

import io
import json
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs

from director.accounts.validation import ValidationFailed
from director.playbooks.model import Prompt, SecretValue, Server
from director.web.errors import ApiError

FORM_TYPE = b"application/x-www-form-urlencoded"
MULTIPART_TYPE = b"multipart/form-data"
MAX_FILE_BYTES = 1024 * 1024 + 1
MAX_FIELDS = 2000


class FormError(ApiError):
    """A body that is not a form this page can read (wrong type, not UTF-8, too many fields)."""


@attrs.frozen
class Form:
    fields: Mapping[str, list[str]]
    files: Mapping[str, tuple[str, bytes]] = attrs.field(factory=dict)

    def get(self, name: str, default: str = "") -> str:
        values = self.fields.get(name)
        return values[0] if values else default

    def all(self, name: str) -> list[str]:
        return list(self.fields.get(name, ()))

    def flag(self, name: str) -> bool:
        return self.get(name) in ("on", "true", "1", "yes")


def read_form(request: Any) -> Form:
    """The body of a POST as a ``Form``: urlencoded or multipart (file uploads)."""
    header = (request.getHeader(b"content-type") or b"").decode("latin-1")
    media_type = header.split(";")[0].strip().lower().encode()
    raw = request.content.read() if request.content is not None else b""
    if media_type == FORM_TYPE:
        try:
            pairs = urllib.parse.parse_qsl(raw.decode("utf-8"), keep_blank_values=True,
                                           strict_parsing=False, max_num_fields=MAX_FIELDS)
        except UnicodeDecodeError:
            raise FormError("the form is not UTF-8 text") from None
        except ValueError:
            raise FormError("the form has too many fields") from None
        fields: dict[str, list[str]] = {}
        for name, value in pairs:
            fields.setdefault(name, []).append(value)
        return Form(fields)
    if media_type == MULTIPART_TYPE:
        return _read_multipart(header, raw)
    raise FormError("send the form as application/x-www-form-urlencoded or multipart/form-data",
                    status=415, code="unsupported_media_type")


def _read_multipart(header: str, raw: bytes) -> Form:
    import multipart  # only for file uploads: an idle daemon need not hold it (or wsgiref)

    _, options = multipart.parse_options_header(header)
    boundary = options.get("boundary")
    if not boundary:
        raise FormError("the multipart form has no boundary")
    fields: dict[str, list[str]] = {}
    files: dict[str, tuple[str, bytes]] = {}
    try:
        parser = multipart.MultipartParser(io.BytesIO(raw), boundary, len(raw),
                                           part_limit=MAX_FIELDS, spool_limit=len(raw) + 1,
                                           memory_limit=len(raw) + 1, charset="utf-8")
        for part in parser:
            if part.filename is not None:
                files[part.name] = (part.filename, part.raw[:MAX_FILE_BYTES])
            else:
                fields.setdefault(part.name, []).append(part.value)
    except (multipart.MultipartError, UnicodeDecodeError) as error:
        raise FormError(f"the multipart form cannot be read: {error}") from None
    return Form(fields, files)


# --- calling the API's route functions ---------------------------------------------------------

Route = Callable[..., Awaitable[bytes]]


async def call_api(request: Any, route: Route, *arguments: str, body: Any = None,
                   content_type: bytes = b"application/json", if_match: int | None = None,
                   query: Mapping[str, str] | None = None) -> tuple[int, Any]:
    """Run an ``/api/v1`` route function on this request with ``body`` as its JSON (or raw
    bytes of ``content_type``); returns the status and the decoded answer. Refusals raise as
    they do for the API (``ApiError``, ``ValidationFailed``)."""
    raw = body if isinstance(body, bytes) else (b"" if body is None else json.dumps(body).encode())
    request.content = io.BytesIO(raw)
    request.requestHeaders.setRawHeaders(b"content-type", [content_type])
    if if_match is not None:
        request.requestHeaders.setRawHeaders(b"if-match", [f'"{if_match}"'.encode()])
    saved_args = request.args
    request.args = {name.encode(): [value.encode()] for name, value in (query or {}).items()}
    try:
        answer = await route(request, *arguments)
    finally:
        request.args = saved_args
        request.requestHeaders.removeHeader(b"if-match")
    status = request.code
    answered_type = (request.responseHeaders.getRawHeaders(b"content-type") or [b""])[0]
    if answer and answered_type.startswith(b"application/json"):
        return status, json.loads(answer)
    return status, answer


def problems(error: Exception) -> tuple[str, dict[str, str]]:
    """What to show next to a form for a refusal: a message and the fields at fault."""
    if isinstance(error, ValidationFailed):
        return "Please correct the following.", dict(error.fields)
    if isinstance(error, ApiError):
        fields = error.details.get("fields") if isinstance(error.details, dict) else None
        return error.message, dict(fields) if isinstance(fields, dict) else {}
    return str(error), {}


# --- servers ---------------------------------------------------------------------------------


def _rows(form: Form, *names: str) -> list[tuple[str, ...]]:
    columns = [form.all(name) for name in names]
    length = max((len(column) for column in columns), default=0)
    padded = [column + [""] * (length - len(column)) for column in columns]
    return list(zip(*padded, strict=True))


def _secret_map(form: Form, prefix: str, stored: tuple[tuple[str, SecretValue], ...]
                ) -> dict[str, Any]:
    """Rows ``<prefix>_name`` / ``_value`` / ``_kind`` as the API's map. A secret row left
    empty keeps the stored value: secret values are never sent back to the browser, so an
    edit form cannot hold them."""
    kept = dict(stored)
    result: dict[str, Any] = {}
    for name, value, kind in _rows(form, f"{prefix}_name", f"{prefix}_value", f"{prefix}_kind"):
        name = name.strip()
        if not name and not value:
            continue
        secret = kind == "secret"
        if secret and value == "" and name in kept and kept[name].secret:
            value = kept[name].value
        result[name] = {"value": value, "secret": True} if secret else value
    return result


def server_body(form: Form, current: Server | None = None) -> dict[str, Any]:
    """The API body of the add/edit server form (include/exclude are the tools form's)."""
    server_type = current.type if current is not None else form.get("type", "stdio")
    body: dict[str, Any] = {"name": form.get("name").strip(), "type": server_type,
                            "prefix": form.get("prefix"), "disabled": form.flag("disabled"),
                            "expose_prompts": form.flag("expose_prompts")}
    timeout = form.get("timeout_seconds").strip()
    if timeout:
        try:
            body["timeout_seconds"] = float(timeout)
        except ValueError:
            body["timeout_seconds"] = timeout  # the model says what is wrong with it
    if server_type == "stdio":
        body["command"] = form.get("command").strip()
        body["args"] = [line for line in form.get("args").splitlines() if line.strip()]
        body["env"] = _secret_map(form, "env", current.env if current else ())
        body["cwd"] = form.get("cwd").strip() or None
        body["isolate_sessions"] = form.flag("isolate_sessions")
    else:
        body["url"] = form.get("url").strip()
        body["headers"] = _secret_map(form, "header", current.headers if current else ())
    return body


def tools_body(form: Form, server: Server, tool_names: list[str]) -> dict[str, Any]:
    """The tools form of one server: which of its tools are exposed, and its prefix. A server
    in include mode stays in include mode (its list is what is checked); otherwise the
    unchecked tools become its exclude list."""
    exposed = set(form.all("expose"))
    body: dict[str, Any] = {"prefix": form.get("prefix")}
    if server.include is not None:
        known = [name for name in server.include if name not in tool_names]  # not listed now
        body["include"] = known + [name for name in tool_names if name in exposed]
    else:
        hidden_unlisted = [name for name in (server.exclude or ()) if name not in tool_names]
        excluded = hidden_unlisted + [name for name in tool_names if name not in exposed]
        body["exclude"] = excluded or None
    return body


# --- prompts ---------------------------------------------------------------------------------


def prompt_body(form: Form) -> dict[str, Any]:
    arguments = [{"name": name.strip(), "description": description,
                  "required": required == "yes"}
                 for name, description, required in _rows(form, "arg_name", "arg_description",
                                                          "arg_required")
                 if name.strip() or description.strip()]
    return {"name": form.get("name").strip(), "title": form.get("title"),
            "description": form.get("description"), "body": form.get("body"),
            "arguments": arguments}


def prompt_values(prompt: Prompt | None) -> dict[str, Any]:
    if prompt is None:
        return {"name": "", "title": "", "description": "", "body": "", "arguments": []}
    return {"name": prompt.name, "title": prompt.title, "description": prompt.description,
            "body": prompt.body, "arguments": [attrs.asdict(a) for a in prompt.arguments]}


# --- try a tool ------------------------------------------------------------------------------


def schema_properties(schema: Any) -> tuple[dict[str, Any], set[str]]:
    """A tool's input properties and the required ones (anything malformed: none)."""
    if not isinstance(schema, dict):
        return {}, set()
    properties = schema.get("properties")
    required = schema.get("required")
    return ({name: spec if isinstance(spec, dict) else {}
             for name, spec in properties.items()} if isinstance(properties, dict) else {},
            {name for name in required if isinstance(name, str)}
            if isinstance(required, list) else set())


def field_kind(spec: Mapping[str, Any]) -> str:
    """How a property is edited: string, number, integer, boolean, enum, or json."""
    if isinstance(spec.get("enum"), list) and spec["enum"] and all(
            isinstance(v, str | int | float | bool) for v in spec["enum"]):
        return "enum"
    kind = spec.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if kind in ("string", "number", "integer", "boolean"):
        return str(kind)
    return "json"


def tool_arguments(schema: Any, form: Form) -> dict[str, Any]:
    """The ``arguments`` of a ``tools/call`` from the try-a-tool form, typed by the schema;
    an empty optional field is left out. Every problem is reported at once."""
    properties, required = schema_properties(schema)
    arguments: dict[str, Any] = {}
    fields: dict[str, str] = {}
    for name, spec in properties.items():
        kind = field_kind(spec)
        raw = form.get("arg." + name)
        if kind == "boolean":
            choice = form.get("arg." + name)
            if choice in ("true", "false"):
                arguments[name] = choice == "true"
            elif name in required:
                fields[name] = "choose true or false"
            continue
        if raw == "" and kind != "string":
            if name in required:
                fields[name] = "is required"
            continue
        if raw == "" and kind == "string" and name not in required:
            continue
        try:
            arguments[name] = _typed(kind, raw, spec)
        except ValueError as error:
            fields[name] = str(error)
    if fields:
        raise ValidationFailed(fields)
    return arguments


def _typed(kind: str, raw: str, spec: Mapping[str, Any]) -> Any:
    if kind == "string":
        return raw
    if kind == "integer":
        try:
            return int(raw.strip(), 10)
        except ValueError:
            raise ValueError("must be a whole number") from None
    if kind == "number":
        try:
            number = float(raw.strip())
        except ValueError:
            raise ValueError("must be a number") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError("must be a finite number")
        return int(number) if number.is_integer() and "." not in raw and "e" not in raw.lower() \
            else number
    if kind == "enum":
        for option in spec["enum"]:
            if json.dumps(option) == raw:
                return option
        raise ValueError("must be one of the listed choices")
    try:
        return json.loads(raw)
    except ValueError as error:
        raise ValueError(f"is not valid JSON: {error}") from None
