"""Tracing on the hot path: the spans Director makes, their attributes, and the trace context
it continues from clients and passes on to upstream servers.

Off unless an OTLP endpoint is configured (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; ``director.tracing_export`` builds the SDK's provider
and exporter then). Off, ``TRACER`` is None and every instrumented place checks that once and
does nothing else: no span object, no context, no header (the SDK is not even imported).

On, the current span travels in ``contextvars`` (OpenTelemetry's own context), which Twisted
copies into every coroutine it starts: the edge attaches the request's server span before the
application renders it, so every coroutine of that request sees it, across its awaits. What a
Deferred callback fired by the network sees is not a request's context: spans that end there
are ended through the span object kept, never through the current context.

What a span may carry is fixed here: method names, tool and prompt names, server names, the
transport, a session id's first 8 characters (as the logs show it), JSON-RPC error codes and
exception *class* names. Never an argument, a result, a header value, a URL's query, an
exception's message (an upstream's error text may repeat an argument) or a credential.

The conventions followed: OpenTelemetry's for MCP (``mcp.method.name``, ``mcp.session.id``,
``mcp.protocol.version``, ``gen_ai.tool.name``, ``gen_ai.prompt.name``,
``gen_ai.operation.name``, ``jsonrpc.request.id``, ``rpc.response.status_code``,
``network.transport``, ``error.type``) and RPC (``rpc.jsonrpc.error_code``); Director's own
under ``director.`` (``director.playbook.id``, ``director.server.name``,
``director.upstream.transport``).

The tracer is process-wide, as OpenTelemetry's context is: the service that starts tracing
installs it (``install``), and removes it when it stops.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

#: The tracer while tracing is on; None: off (the one check every instrumented place makes).
TRACER: Tracer | None = None

PROPAGATOR = TraceContextTextMapPropagator()
SERVER, CLIENT, INTERNAL = SpanKind.SERVER, SpanKind.CLIENT, SpanKind.INTERNAL


def install(tracer: Tracer | None) -> None:
    global TRACER
    TRACER = tracer


class _HeaderGetter:
    """Reads ``traceparent``/``tracestate`` from a Twisted request."""

    @staticmethod
    def get(carrier: Any, key: str) -> list[str] | None:
        values = carrier.requestHeaders.getRawHeaders(key.encode())
        return [value.decode("latin-1") for value in values] if values else None

    @staticmethod
    def keys(carrier: Any) -> list[str]:
        return []


_HEADERS = _HeaderGetter()


def hex_ids(span: Span) -> tuple[str, str]:
    """(trace id, span id) of a span, as the logs and ``X-Trace-Id`` write them."""
    context = span.get_span_context()
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def request_span(request: Any) -> Span:
    """The server span of an HTTP request, continuing the client's ``traceparent`` (and
    ``tracestate``) when valid. Not the path (a client may type anything in it): the route
    that answered names the span when it ends (``DirectorRequest.end_span``)."""
    assert TRACER is not None
    parent = PROPAGATOR.extract(request, getter=_HEADERS)  # type: ignore[arg-type]
    method = request.method.decode("latin-1")
    return TRACER.start_span(method, parent, SERVER, attributes={
        "http.request.method": method, "url.scheme": "https" if request.isSecure() else "http"})


def attach(span: Span) -> object:
    """Make ``span`` current (for the coroutines started from here); ``detach`` undoes it."""
    return otel_context.attach(trace.set_span_in_context(span))


def detach(token: object) -> None:
    otel_context.detach(token)  # type: ignore[arg-type]


def start(name: str, kind: SpanKind = INTERNAL, attributes: dict[str, Any] | None = None,
          parent: Span | None = None) -> Span:
    """A span, child of ``parent`` if given, else of the current span. Only where ``spans()``."""
    assert TRACER is not None
    context = trace.set_span_in_context(parent) if parent is not None else None
    return TRACER.start_span(name, context, kind, attributes=attributes)


def spans() -> bool:
    """Whether to make spans here: tracing is on, and the current trace (if any) is sampled.
    In a trace the sampler dropped (``OTEL_TRACES_SAMPLER_ARG``), nothing below its first
    span is made: the decision is the trace's, and its context still travels upstream (with
    its sampled flag off), so a trace that is not kept costs one span, not one per step."""
    if TRACER is None:
        return False
    span = trace.get_current_span()
    return span.is_recording() or not span.get_span_context().is_valid


def current() -> Span | None:
    """The current span when it belongs to a trace (recording or not), else None."""
    span = trace.get_current_span()
    return span if span.get_span_context().is_valid else None


@contextmanager
def span(name: str, kind: SpanKind = INTERNAL, attributes: dict[str, Any] | None = None
         ) -> Iterator[Span | None]:
    """A current span around a block (a child of the current one), ended with the block and
    failed by what it raises; no-op (yielding None) with tracing off. Off the hot path only:
    the hot path checks ``spans()`` itself."""
    if not spans():
        yield None
        return
    assert TRACER is not None
    started = TRACER.start_span(name, None, kind, attributes=attributes)
    token = attach(started)
    try:
        yield started
    except BaseException as failure:
        fail(started, failure)
        raise
    finally:
        detach(token)
        started.end()


@contextmanager
def child(name: str, kind: SpanKind = INTERNAL, attributes: dict[str, Any] | None = None
          ) -> Iterator[Span | None]:
    """``span``, but only inside a trace already (database work, refreshes): work done for no
    traced request starts no trace of its own."""
    if TRACER is None or not trace.get_current_span().is_recording():
        yield None
        return
    with span(name, kind, attributes) as started:
        yield started


def child_of_deferred(name: str, deferred: Any, attributes: dict[str, Any] | None = None
                      ) -> Any:
    """A span from now until ``deferred`` fires (failed if it fails), only inside a trace
    already (database work done for a traced request; never a trace of its own)."""
    if TRACER is None or not trace.get_current_span().is_recording():
        return deferred
    started = TRACER.start_span(name, None, INTERNAL, attributes=attributes)

    def ended(result: Any) -> Any:
        failure = getattr(result, "value", None)
        if isinstance(failure, BaseException):
            fail(started, failure)
        started.end()
        return result

    return deferred.addBoth(ended)


def fail(span: Span, failure: BaseException | None = None, *, code: Any = None,
         kind: str | None = None) -> None:
    """Mark a span failed. ``error.type`` is ``kind``, else the JSON-RPC error ``code``, else
    the exception's class — never its message."""
    if code is None:
        error = getattr(failure, "error", None)  # an upstream's JSON-RPC error object
        if isinstance(error, dict) and isinstance(error.get("code"), int):
            code = error["code"]
    if isinstance(code, int):
        span.set_attribute("rpc.jsonrpc.error_code", code)
        span.set_attribute("rpc.response.status_code", str(code))
    if kind is None:
        kind = type(failure).__name__ if failure is not None else \
            str(code) if code is not None else "error"
    span.set_attribute("error.type", kind)
    span.set_status(Status(StatusCode.ERROR))


def response_outcome(span: Span, response: Mapping[str, Any]) -> None:
    """Record a JSON-RPC response's outcome on ``span``: its error code, if any."""
    error = response.get("error")
    if isinstance(error, dict):
        fail(span, code=error.get("code"))
    else:
        result_outcome(span, response.get("result"))


def result_outcome(span: Span, result: Any) -> None:
    """A ``tools/call`` result with ``isError`` fails its span as ``tool_error`` (the MCP
    conventions), its content untold."""
    if isinstance(result, dict) and result.get("isError") is True:
        fail(span, kind="tool_error")


def mcp_attributes(method: str, params: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The span name and attributes of an MCP request, after the MCP conventions:
    ``{method} {tool or prompt}``."""
    attributes: dict[str, Any] = {"mcp.method.name": method}
    name = params.get("name") if method in ("tools/call", "prompts/get") else None
    if isinstance(name, str):
        if method == "tools/call":
            attributes["gen_ai.tool.name"] = name
            attributes["gen_ai.operation.name"] = "execute_tool"
        else:
            attributes["gen_ai.prompt.name"] = name
        return f"{method} {name}", attributes
    return method, attributes


def upstream_transport(session: Any) -> str:
    """stdio, streamable-http, sse or modern (2026-07-28 over HTTP), from the session's class
    (an ``http`` server's is known once connected: ``HttpUpstream.session``)."""
    inner = getattr(session, "session", None) or session
    kind = type(inner).__name__
    if "Stdio" in kind:
        return "stdio"
    if "Sse" in kind:
        return "sse"
    return "modern" if getattr(inner, "era", None) == "modern" else "streamable-http"


def upstream_span(server: str, session: Any, method: str,
                  params: Mapping[str, Any] | None) -> Span:
    """The client span of one request to an upstream server (a child of the current span)."""
    name, attributes = mcp_attributes(method, params or {})
    transport = upstream_transport(session)
    attributes["director.server.name"] = server
    attributes["director.upstream.transport"] = transport
    attributes["network.transport"] = "pipe" if transport == "stdio" else "tcp"
    era = getattr(session, "era", None)
    if isinstance(era, str):
        attributes["director.upstream.era"] = era
    url = getattr(session, "url", None)
    if isinstance(url, str):  # the host and port only: a URL's path or query may hold a key
        parts = urlsplit(url)
        if parts.hostname:
            attributes["server.address"] = parts.hostname
            with suppress(ValueError):
                attributes["server.port"] = parts.port or (443 if parts.scheme == "https" else 80)
    return start(name, CLIENT, attributes)


@contextmanager
def relay_span(method: str, parent: Span | None) -> Iterator[None]:
    """A server→client request (sampling, elicitation, roots) relayed to the client mid-call,
    as a child of the call it belongs to (``parent``), ended when the client answered."""
    relayed = start(method, CLIENT, {"mcp.method.name": method, "director.relayed": True},
                    parent)
    try:
        yield
    except BaseException as failure:
        fail(relayed, failure)
        raise
    finally:
        relayed.end()


def headers_with_context(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` plus the current span's ``traceparent``/``tracestate`` (HTTP upstreams)."""
    span = current()
    if span is not None:
        PROPAGATOR.inject(headers, trace.set_span_in_context(span))
    return headers


def params_with_context(params: dict[str, Any] | None) -> dict[str, Any] | None:
    """``params`` with the current span's trace context in ``_meta`` (stdio upstreams), as
    the MCP conventions put it; ``params`` itself is not changed."""
    span = current()
    meta = params.get("_meta") if params else None
    if span is None or (meta is not None and not isinstance(meta, dict)):
        return params  # a _meta that is no object passes through as the client sent it
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier, trace.set_span_in_context(span))
    return {**(params or {}), "_meta": {**(meta or {}), **carrier}}
