"""The upstream MCP server that ``@modelcontextprotocol/conformance``'s server scenarios expect,
on the ``mcp`` SDK (``MCPServer``, with a few low-level handlers where the scenarios want
exact wire shapes).

    python tests/conformance/fixture_server.py                 # stdio (inside a playbook)
    python tests/conformance/fixture_server.py --port N        # Streamable HTTP, 127.0.0.1:N/mcp

Every name and payload below is the one the suite's scenarios ask for (``test_simple_text``,
``test://static-text``, ``test_prompt_with_arguments``, ...); their expectations are the
``description`` texts of the scenario classes in the package's ``dist/index.js``. Over HTTP the
server keeps an in-memory event store (streams carry event ids, ``test_reconnection`` can cut
its stream and the client resumes with ``Last-Event-ID``) and the SDK's DNS-rebinding
protection for a loopback host.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import weakref
from typing import Annotated, Any

import anyio
import mcp_types as types
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.prompts.base import UserMessage
from mcp.server.mcpserver.resolve import Elicit, ListRoots, Resolve, Sample
from mcp.server.streamable_http import EventMessage, EventStore
from pydantic import BaseModel

# A 1x1 red PNG and a tiny WAV (RIFF header, two bytes of samples).
PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIA"
       "X8jx0gAAAABJRU5ErkJggg==")
WAV = "UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAIA+AAACABAAZGF0YQIAAAAAAA=="
LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")

server = MCPServer("conformance-fixture", version="1.0.0", log_level="WARNING",
                   instructions="The conformance suite's expectations, for Director's tests.")

# Per connection (one per stdio process, one per HTTP session): the level set by the client
# and the URIs it subscribed to.
SESSION_LEVELS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
SUBSCRIPTIONS: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def connection(session: Any) -> Any:
    """The connection behind a (per-request) ``ServerSession``."""
    return session._connection


async def log(ctx: Context, level: types.LoggingLevel, data: Any) -> None:
    """A log notification, unless the client asked for a higher level."""
    threshold = SESSION_LEVELS.get(connection(ctx.session), "debug")
    if LEVELS.index(level) >= LEVELS.index(threshold):
        await ctx.session.send_log_message(level=level, data=data, logger="fixture",
                                           related_request_id=ctx.request_id)


def text(value: str) -> types.TextContent:
    return types.TextContent(type="text", text=value)


# --- tools -------------------------------------------------------------------------------


@server.tool(description="Returns a simple text response.")
def test_simple_text() -> types.CallToolResult:
    return types.CallToolResult(content=[text("This is a simple text response for testing.")])


@server.tool(description="Returns an image (a 1x1 PNG).")
def test_image_content() -> types.CallToolResult:
    return types.CallToolResult(content=[
        types.ImageContent(type="image", data=PNG, mime_type="image/png")])


@server.tool(description="Returns audio (a tiny WAV).")
def test_audio_content() -> types.CallToolResult:
    return types.CallToolResult(content=[
        types.AudioContent(type="audio", data=WAV, mime_type="audio/wav")])


@server.tool(description="Returns an embedded text resource.")
def test_embedded_resource() -> types.CallToolResult:
    return types.CallToolResult(content=[types.EmbeddedResource(
        type="resource", resource=types.TextResourceContents(
            uri="test://embedded-resource", mime_type="text/plain",
            text="This is an embedded resource content."))])


@server.tool(description="Returns text, an image and an embedded resource.")
def test_multiple_content_types() -> types.CallToolResult:
    return types.CallToolResult(content=[
        text("Multiple content types test:"),
        types.ImageContent(type="image", data=PNG, mime_type="image/png"),
        types.EmbeddedResource(type="resource", resource=types.TextResourceContents(
            uri="test://mixed-content-resource", mime_type="application/json",
            text=json.dumps({"test": "data", "value": 123}, separators=(",", ":"))))])


@server.tool(description="Sends three info log notifications while it runs.")
async def test_tool_with_logging(ctx: Context) -> str:
    await log(ctx, "info", "Tool execution started")
    await anyio.sleep(0.05)
    await log(ctx, "info", "Tool processing data")
    await anyio.sleep(0.05)
    await log(ctx, "info", "Tool execution completed")
    return "Tool with logging executed successfully"


@server.tool(description="Reports progress 0, 50 and 100 out of 100.")
async def test_tool_with_progress(ctx: Context) -> str:
    for step in (0, 50, 100):
        if step:
            await anyio.sleep(0.05)
        await ctx.report_progress(step, 100, f"Completed step {step} of 100")
    return "Tool with progress executed successfully"


@server.tool(description="Always fails.")
def test_error_handling() -> types.CallToolResult:
    return types.CallToolResult(
        content=[text("This tool intentionally returns an error for testing")], is_error=True)


@server.tool(description="Asks the client's model (sampling/createMessage).")
async def test_sampling(prompt: str, ctx: Context) -> str:
    result = await ctx.session.create_message(
        [types.SamplingMessage(role="user", content=text(prompt))], max_tokens=100,
        related_request_id=ctx.request_id)
    content = result.content
    return f"LLM response: {content.text if isinstance(content, types.TextContent) else content}"


async def elicit(ctx: Context, message: str, schema: dict[str, Any]) -> types.ElicitResult:
    return await ctx.session.elicit_form(message, schema, related_request_id=ctx.request_id)


@server.tool(description="Asks the user (elicitation/create) for a username and an email.")
async def test_elicitation(message: str, ctx: Context) -> str:
    result = await elicit(ctx, message, {
        "type": "object",
        "properties": {
            "username": {"type": "string", "description": "User's response"},
            "email": {"type": "string", "description": "User's email address"},
        },
        "required": ["username", "email"],
    })
    return f"User response: action={result.action}, content={json.dumps(result.content or {})}"


@server.tool(description="Elicitation whose schema has a default for every primitive type.")
async def test_elicitation_sep1034_defaults(ctx: Context) -> str:
    result = await elicit(ctx, "Please review and update the form fields with defaults", {
        "type": "object",
        "properties": {
            "name": {"type": "string", "description": "User name", "default": "John Doe"},
            "age": {"type": "integer", "description": "User age", "default": 30},
            "score": {"type": "number", "description": "User score", "default": 95.5},
            "status": {"type": "string", "description": "User status",
                       "enum": ["active", "inactive", "pending"], "default": "active"},
            "verified": {"type": "boolean", "description": "Verification status",
                         "default": True},
        },
        "required": [],
    })
    return (f"Elicitation completed: action={result.action}, "
            f"content={json.dumps(result.content or {})}")


@server.tool(description="Elicitation with the five enum schema variants.")
async def test_elicitation_sep1330_enums(ctx: Context) -> str:
    result = await elicit(ctx, "Please select options from the enum fields", {
        "type": "object",
        "properties": {
            "untitledSingle": {"type": "string", "description": "Untitled single-select",
                               "enum": ["option1", "option2", "option3"]},
            "titledSingle": {"type": "string", "description": "Titled single-select",
                             "oneOf": [{"const": "value1", "title": "First Option"},
                                       {"const": "value2", "title": "Second Option"},
                                       {"const": "value3", "title": "Third Option"}]},
            "legacyEnum": {"type": "string", "description": "Legacy titled enum",
                           "enum": ["opt1", "opt2", "opt3"],
                           "enumNames": ["Option One", "Option Two", "Option Three"]},
            "untitledMulti": {"type": "array", "description": "Untitled multi-select",
                              "items": {"type": "string",
                                        "enum": ["option1", "option2", "option3"]}},
            "titledMulti": {"type": "array", "description": "Titled multi-select",
                            "items": {"anyOf": [{"const": "value1", "title": "First Choice"},
                                                {"const": "value2", "title": "Second Choice"},
                                                {"const": "value3", "title": "Third Choice"}]}},
        },
        "required": [],
    })
    return (f"Elicitation completed: action={result.action}, "
            f"content={json.dumps(result.content or {})}")


@server.tool(description="Closes its own SSE stream mid-call (HTTP), then answers.")
async def test_reconnection(ctx: Context) -> str:
    await log(ctx, "info", "Before disconnect")
    await ctx.close_sse_stream()
    await anyio.sleep(0.2)
    await log(ctx, "info", "After reconnect")
    return "Reconnection test completed"


@server.tool(name="json_schema_2020_12_tool", description="Tool with JSON Schema 2020-12 features")
def json_schema_2020_12_tool(name: str = "", address: dict[str, Any] | None = None) -> str:
    return f"{name} {json.dumps(address)}"


# The declared input schema, verbatim (the signature above only receives the arguments).
server._tool_manager.get_tool("json_schema_2020_12_tool").parameters = {  # type: ignore[union-attr]
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {"address": {"$anchor": "addressDef", "type": "object",
                          "properties": {"street": {"type": "string"},
                                         "city": {"type": "string"}}}},
    "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/address"},
                   "contactMethod": {"type": "string", "enum": ["phone", "email"]},
                   "phone": {"type": "string"}, "email": {"type": "string"}},
    # SEP-2106's broader vocabulary (the 0.2 suite checks that it is preserved).
    "allOf": [{"anyOf": [{"required": ["phone"]}, {"required": ["email"]}]}],
    "if": {"properties": {"contactMethod": {"const": "phone"}}, "required": ["contactMethod"]},
    "then": {"required": ["phone"]},
    "else": {"required": ["email"]},
    "additionalProperties": False,
}


@server.tool(description="Mirrors its 'region' argument into the Mcp-Param-Region header "
             "(x-mcp-header, SEP-2243; 2026-07-28).")
def test_custom_header(region: str) -> str:
    return f"region={region}"


server._tool_manager.get_tool("test_custom_header").parameters = {  # type: ignore[union-attr]
    "type": "object",
    "properties": {"region": {"type": "string", "x-mcp-header": "Region"}},
    "required": ["region"],
}


# --- multi round-trip requests (SEP-2322, 2026-07-28) --------------------------------------
# Written with the SDK's resolvers, which speak both eras: on 2026-07-28 a question becomes an
# InputRequiredResult (its key is the resolver's module:qualname, its requestState sealed by the
# SDK), on the handshake era (how Director talks to an upstream for handshake-era clients) a
# server-to-client request sent during the call. The keys the suite's descriptions show
# ("user_name", ...) are examples: the scenarios answer whatever keys they are given.


class Name(BaseModel):
    name: str


class Confirm(BaseModel):
    ok: bool


class Color(BaseModel):
    color: str


def user_name() -> Elicit[Name]:
    return Elicit("What is your name?", Name)


def capital_question() -> Sample:
    return Sample([types.SamplingMessage(role="user", content=text(
        "What is the capital of France?"))], max_tokens=100)


def greeting() -> Sample:
    return Sample([types.SamplingMessage(role="user", content=text("Generate a greeting"))],
                  max_tokens=50)


def client_roots() -> ListRoots:
    return ListRoots()


def confirm() -> Elicit[Confirm]:
    return Elicit("Please confirm", Confirm)


def step1() -> Elicit[Name]:
    return Elicit("Step 1: What is your name?", Name)


def step2(first: Annotated[Name, Resolve(step1)]) -> Elicit[Color]:
    return Elicit("Step 2: What is your favorite color?", Color)


def sampled_text(result: types.CreateMessageResult) -> str:
    content = result.content
    return content.text if isinstance(content, types.TextContent) else str(content)


NAME_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


@server.tool(description="SEP-2322: asks for the user's name (elicitation).")
async def test_input_required_result_elicitation(
        ctx: Context) -> types.CallToolResult | types.InputRequiredResult:
    # By hand rather than with a resolver: the scenarios insist on the key "user_name".
    if ctx.protocol_version != "2026-07-28":
        result = await elicit(ctx, "What is your name?", NAME_SCHEMA)
        content = result.content or {}
    else:
        answer = (ctx.input_responses or {}).get("user_name")
        content = getattr(answer, "content", None)
        if getattr(answer, "action", None) != "accept" or not isinstance(content, dict) \
                or not isinstance(content.get("name"), str):
            return types.InputRequiredResult(input_requests={
                "user_name": types.ElicitRequest(params=types.ElicitRequestFormParams(
                    message="What is your name?", requested_schema=NAME_SCHEMA))})
    return types.CallToolResult(content=[text(f"Hello, {content.get('name')}!")])


@server.tool(description="SEP-2322: asks the client's model (sampling).")
def test_input_required_result_sampling(
        answer: Annotated[types.CreateMessageResult, Resolve(capital_question)]) -> str:
    return f"The model answered: {sampled_text(answer)}"


@server.tool(description="SEP-2322: asks for the client's roots.")
def test_input_required_result_list_roots(
        roots: Annotated[types.ListRootsResult, Resolve(client_roots)]) -> str:
    return "Roots: " + ", ".join(str(root.uri) for root in roots.roots)


@server.tool(description="SEP-2322: a confirmation whose answer rides the sealed requestState.")
def test_input_required_result_request_state(
        confirmed: Annotated[Confirm, Resolve(confirm)]) -> str:
    return f"state-ok (confirmed={confirmed.ok})"


@server.tool(description="SEP-2322: elicitation, sampling and roots in one round.")
def test_input_required_result_multiple_inputs(
        person: Annotated[Name, Resolve(user_name)],
        answer: Annotated[types.CreateMessageResult, Resolve(greeting)],
        roots: Annotated[types.ListRootsResult, Resolve(client_roots)]) -> str:
    return (f"All inputs received: {person.name}, {sampled_text(answer)}, "
            f"{len(roots.roots)} root(s)")


@server.tool(description="SEP-2322: two questions, one per round, then the answer.")
def test_input_required_result_multi_round(
        person: Annotated[Name, Resolve(step1)],
        color: Annotated[Color, Resolve(step2)]) -> str:
    return f"{person.name} likes {color.color}"


@server.tool(description="SEP-2322: a round whose requestState is sealed (tampering is refused).")
def test_input_required_result_tampered_state(
        confirmed: Annotated[Confirm, Resolve(confirm)]) -> str:
    return f"confirmed={confirmed.ok}"


def name_if_elicitable(ctx: Context) -> Elicit[Name] | Name:
    capabilities = ctx.client_capabilities
    if capabilities is not None and capabilities.elicitation is not None:
        return Elicit("What is your name?", Name)
    return Name(name="(not asked: no elicitation capability)")


def greeting_if_samplable(ctx: Context) -> Sample | str:
    capabilities = ctx.client_capabilities
    if capabilities is not None and capabilities.sampling is not None:
        return greeting()
    return "(not asked: no sampling capability)"


@server.tool(description="SEP-2322: asks only what the client declared it can answer.")
def test_input_required_result_capabilities(
        person: Annotated[Name, Resolve(name_if_elicitable)],
        answer: Annotated[Any, Resolve(greeting_if_samplable)]) -> str:
    said = sampled_text(answer) if isinstance(answer, types.CreateMessageResult) else answer
    return f"{person.name} / {said}"


@server.tool(description="Needs sampling: a client that did not declare it gets -32021 (SEP-2575).")
def test_missing_capability(
        answer: Annotated[types.CreateMessageResult, Resolve(greeting)]) -> str:
    return sampled_text(answer)


# --- the 2026-07-28 suite's other diagnostic tools -----------------------------------------
# server-stateless (SEP-2575) calls these two and reads the frames of the call's response: no
# independent request (test_streaming_elicitation, called with clientCapabilities
# {elicitation: {}}) and no notifications/message when _meta carries no logLevel
# (test_logging_tool).


@server.tool(description="SEP-2575: asks the user (elicitation) mid-call. On 2026-07-28 the "
             "question rides an InputRequiredResult, never an independent request on the "
             "call's response stream; on the handshake era it is an elicitation/create sent "
             "during the call.")
def test_streaming_elicitation(person: Annotated[Name, Resolve(user_name)]) -> str:
    return f"Hello, {person.name}!"


@server.tool(description="SEP-2575: sends an info log notification while it runs. On 2026-07-28 "
             "only if the request's _meta carries io.modelcontextprotocol/logLevel (the SDK "
             "drops it otherwise); on the handshake era subject to logging/setLevel.")
async def test_logging_tool(ctx: Context) -> str:
    await log(ctx, "info", "test_logging_tool ran")
    return "Logging tool executed"


# The tasks extension's scenarios (SEP-2663) list these in their "Required server fixtures".
# The fixture does not implement the extension (those scenarios are unscored): both tools are
# plain synchronous tools, which is what the scenarios' non-task checks (a sync call, a call
# from a client without the extension, a legacy `task` param ignored, seconds: 0) exercise.


@server.tool(description="Sync-only: returns 'Hello, {name}!'.")
def greet(name: str) -> str:
    return f"Hello, {name}!"


# The scenarios' 60-second calls only hold a task open to poll or cancel it; synchronously they
# would hold the call until the suite's 10-second client timeout (five of them: +50 s a run),
# so the sleep is capped. Every shorter duration the scenarios ask for (0, 1, 2 s) is honoured.
SLOW_COMPUTE_CAP = 2.0


@server.tool(description="Sleeps `seconds` seconds (at most 2 here), then returns a result: the "
             "tasks scenarios' task-supporting tool, synchronous (no tasks extension here).")
async def slow_compute(seconds: float, label: str = "") -> str:
    slept = min(max(seconds, 0.0), SLOW_COMPUTE_CAP)
    await anyio.sleep(slept)
    return f"slow_compute {label or '(no label)'}: done after {slept:g}s"


# --- resources -----------------------------------------------------------------------------


@server.resource("test://static-text", name="static-text", mime_type="text/plain",
                 description="A static text resource")
def static_text() -> str:
    return "This is the content of the static text resource."


@server.resource("test://static-binary", name="static-binary", mime_type="image/png",
                 description="A static binary resource (a PNG)")
def static_binary() -> bytes:
    return base64.b64decode(PNG)


@server.resource("test://template/{id}/data", name="template", mime_type="application/json",
                 description="A resource template with an id parameter")
def template(id: str) -> str:
    return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"},
                      separators=(",", ":"))


@server.resource("test://watched-resource", name="watched-resource", mime_type="text/plain",
                 description="A resource clients can subscribe to")
def watched() -> str:
    return "Watched resource content"


async def subscribe(ctx: Any, params: types.SubscribeRequestParams) -> types.EmptyResult:
    SUBSCRIPTIONS.setdefault(connection(ctx.session), set()).add(str(params.uri))
    return types.EmptyResult()


async def unsubscribe(ctx: Any, params: types.UnsubscribeRequestParams) -> types.EmptyResult:
    SUBSCRIPTIONS.setdefault(connection(ctx.session), set()).discard(str(params.uri))
    return types.EmptyResult()


async def set_level(ctx: Any, params: types.SetLevelRequestParams) -> types.EmptyResult:
    SESSION_LEVELS[connection(ctx.session)] = params.level
    return types.EmptyResult()


lowlevel = server._lowlevel_server
lowlevel.add_request_handler("resources/subscribe", types.SubscribeRequestParams, subscribe)
lowlevel.add_request_handler("resources/unsubscribe", types.UnsubscribeRequestParams, unsubscribe)
lowlevel.add_request_handler("logging/setLevel", types.SetLevelRequestParams, set_level)


# --- prompts and completions ---------------------------------------------------------------


@server.prompt(description="A simple prompt without arguments")
def test_simple_prompt() -> list[UserMessage]:
    return [UserMessage(text("This is a simple prompt for testing."))]


@server.prompt(description="A prompt with two required arguments")
def test_prompt_with_arguments(arg1: str, arg2: str) -> list[UserMessage]:
    return [UserMessage(text(f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"))]


@server.prompt(description="A prompt that embeds a resource")
def test_prompt_with_embedded_resource(resourceUri: str) -> list[UserMessage]:
    return [
        UserMessage(types.EmbeddedResource(type="resource", resource=types.TextResourceContents(
            uri=resourceUri, mime_type="text/plain",
            text="Embedded resource content for testing."))),
        UserMessage(text("Please process the embedded resource above.")),
    ]


@server.prompt(description="A prompt with an image")
def test_prompt_with_image() -> list[UserMessage]:
    return [
        UserMessage(types.ImageContent(type="image", data=PNG, mime_type="image/png")),
        UserMessage(text("Please analyze the image above.")),
    ]


@server.prompt(description="SEP-2322: asks (elicitation) which context to use")
async def test_input_required_result_prompt(ctx: Context) -> Any:
    message = "What context should the prompt use?"
    schema = {"type": "object", "properties": {"context": {"type": "string"}},
              "required": ["context"]}
    if ctx.protocol_version == "2026-07-28":
        answer = (ctx.input_responses or {}).get("user_context")
        if answer is None:
            return types.InputRequiredResult(input_requests={
                "user_context": types.ElicitRequest(params=types.ElicitRequestFormParams(
                    message=message, requested_schema=schema))})
        content = getattr(answer, "content", None) or {}
    else:
        result = await elicit(ctx, message, schema)
        content = result.content or {}
    return [UserMessage(text(f"Use this context: {content.get('context', '')}"))]


CANDIDATES = {"arg1": ["paris", "park", "party", "test-value"], "arg2": ["alpha", "beta"],
              "id": ["123", "456"]}


@server.completion()
async def complete(ref: Any, argument: types.CompletionArgument,
                   context: Any) -> types.Completion:
    values = [value for value in CANDIDATES.get(argument.name, [])
              if value.startswith(argument.value)]
    return types.Completion(values=values, total=len(values), has_more=False)


# --- transports ----------------------------------------------------------------------------


class MemoryEventStore(EventStore):
    """Every event of every stream, so a cut stream can be resumed with Last-Event-ID."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []
        self.ids = itertools.count(1)

    async def store_event(self, stream_id: str, message: Any) -> str:
        event_id = str(next(self.ids))
        self.events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id: str, send_callback: Any) -> str | None:
        index = next((i for i, (event_id, _, _) in enumerate(self.events)
                      if event_id == last_event_id), None)
        if index is None:
            return None
        stream_id = self.events[index][1]
        for event_id, stream, message in self.events[index + 1:]:
            if stream == stream_id and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, help="serve Streamable HTTP on 127.0.0.1:PORT/mcp "
                        "(default: stdio)")
    arguments = parser.parse_args()
    if arguments.port is None:
        server.run("stdio")
        return
    import uvicorn

    app = server.streamable_http_app(event_store=MemoryEventStore(), retry_interval=100)
    uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=arguments.port,
                                  log_level="warning", lifespan="on")).run()


if __name__ == "__main__":
    main()
