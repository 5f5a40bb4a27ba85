"""The Studio's pure parts: the page writer's escaping, tool results, tool arguments typed by
their schema, install links."""

from __future__ import annotations

import base64
import json
import urllib.parse

import pytest
from twisted.web.template import flatten, tags

from director.accounts.validation import ValidationFailed
from director.studio.forms import Form, tool_arguments
from director.studio.pages.connect import cursor_link, vscode_link
from director.studio.pages.tools import render_content, render_result
from director.studio.templates.layout import render

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16).decode()


def html(node: object) -> str:
    return render(node).decode()


def test_the_writer_escapes_like_twisteds_flattener() -> None:
    node = tags.div(tags.a('<b>"x" & y</b>', href='/a?b="c"&d=<e>', title="it's"),
                    tags.input(type="text", value="</script><script>alert(1)</script>"),
                    ["list ", ("of", " <parts>")], tags.textarea(""), class_="c&d")
    parts: list[bytes] = []
    flatten(None, node, parts.append)
    assert render(node) == b"<!DOCTYPE html>\n" + b"".join(parts)
    assert "<script>" not in html(node)
    with pytest.raises(TypeError):
        render(tags.div(42))
    with pytest.raises(TypeError):
        render(tags.div(title=b"bytes"))


def test_images_become_data_urls_only_when_they_are_images_in_base64() -> None:
    image = html(render_content({"type": "image", "mimeType": "image/png", "data": PNG}, 0))
    assert f'src="data:image/png;base64,{PNG}"' in image and "Image 1 returned" in image
    for bad in ({"type": "image", "mimeType": "text/html", "data": PNG},
                {"type": "image", "mimeType": 'image/png" onerror="x', "data": PNG},
                {"type": "image", "mimeType": "image/png", "data": "not base64!"}):
        assert "<img" not in html(render_content(bad, 0))


def test_resource_links_are_links_only_for_web_addresses() -> None:
    web = html(render_content({"type": "resource_link", "uri": "https://example.com/x",
                               "name": "x"}, 0))
    assert 'href="https://example.com/x"' in web
    script = html(render_content({"type": "resource_link", "uri": "javascript:alert(1)"}, 0))
    assert "href" not in script and "<code>javascript:alert(1)</code>" in script
    embedded = html(render_content({"type": "resource", "resource": {
        "uri": "file:///notes.txt", "mimeType": "text/plain", "text": "<notes>"}}, 0))
    assert "&lt;notes&gt;" in embedded


def test_results_and_errors_read_plainly() -> None:
    failed = html(render_result({"jsonrpc": "2.0", "id": 1, "error": {
        "code": -32602, "message": "unknown tool: x"}}, [], 0.01))
    assert "The call failed" in failed and "unknown tool: x (JSON-RPC error -32602)" in failed
    reported = html(render_result({"jsonrpc": "2.0", "id": 1, "result": {
        "isError": True, "content": [{"type": "text", "text": "boom"}],
        "structuredContent": {"a": [1, 2]}}}, [{"method": "notifications/progress"}], 0.2))
    assert "The tool reported an error." in reported and "boom" in reported
    assert "Structured content" in reported and "Notifications during the call (1)" in reported


SCHEMA = {"type": "object", "required": ["text", "count", "flag"], "properties": {
    "text": {"type": "string"}, "count": {"type": "integer"}, "ratio": {"type": "number"},
    "flag": {"type": "boolean"}, "mode": {"enum": ["fast", "careful", 3]},
    "tags": {"type": "array", "items": {"type": "string"}},
    "maybe": {"type": ["string", "null"]}, "note": {"type": "string"}}}


def form(**values: str) -> Form:
    return Form({f"arg.{name}": [value] for name, value in values.items()})


def test_tool_arguments_are_typed_by_the_schema() -> None:
    assert tool_arguments(SCHEMA, form(text="", count="3", flag="false", ratio="2.5",
                                       mode=json.dumps(3), tags='["a", "b"]', maybe="x",
                                       note="")) == {
        "text": "", "count": 3, "flag": False, "ratio": 2.5, "mode": 3, "tags": ["a", "b"],
        "maybe": "x"}
    assert tool_arguments(SCHEMA, form(text="t", count="-7", flag="true", ratio="4")) == {
        "text": "t", "count": -7, "flag": True, "ratio": 4}
    with pytest.raises(ValidationFailed) as failed:
        tool_arguments(SCHEMA, form(count="2.5", flag="", ratio="nan", mode='"slow"',
                                    tags="[1,"))
    assert failed.value.fields == {
        "count": "must be a whole number", "flag": "choose true or false",
        "ratio": "must be a finite number", "mode": "must be one of the listed choices",
        "tags": "is not valid JSON: Expecting value: line 1 column 4 (char 3)"}
    assert tool_arguments({"type": "object"}, form()) == {}
    assert tool_arguments("not a schema", form(x="1")) == {}


def test_install_links_carry_the_documented_forms() -> None:
    url, key = "https://d.example.com/playbooks/tools/mcp", "dk_" + "a" * 64
    vscode = vscode_link("tools", url, key)
    assert vscode.startswith("vscode:mcp/install?")
    assert json.loads(urllib.parse.unquote(vscode.split("?", 1)[1])) == {
        "name": "tools", "type": "http", "url": url, "headers": {"x-api-key": key}}
    cursor = urllib.parse.urlsplit(cursor_link("tools", url, key))
    assert (cursor.scheme, cursor.netloc, cursor.path) == (
        "cursor", "anysphere.cursor-deeplink", "/mcp/install")
    query = urllib.parse.parse_qs(cursor.query)
    assert query["name"] == ["tools"]
    assert json.loads(base64.b64decode(query["config"][0])) == {
        "url": url, "headers": {"x-api-key": key}}
