"""OpenTelemetry tracing end to end: a real daemon exports to a real OTLP/HTTP receiver started
here (a small HTTP server decoding ``ExportTraceServiceRequest`` with ``opentelemetry-proto``),
and real upstream servers (stdio, Streamable HTTP, a 2026-07-28 HTTP server) report the trace
context they received."""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from mcp import Client, types
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from twisted.internet import reactor

from director import tracing
from director.cli.doctor.network import check_tracing
from director.cli.doctor.result import FAIL, OK
from director.config import load_settings
from director.mcp.upstream.base import UpstreamError
from director.mcp.upstream.connect import CheckedEndpoints
from director.mcp.upstream.http_plumbing import new_pool
from director.mcp.upstream.streamable import StreamableHttpUpstream
from tests.accounts_helpers import call, sign_up
from tests.harness import Daemon, free_port, local_servers
from tests.test_mcp_gateway import ACCEPT, INIT, parse_response, reference_server, run
from tests.test_mcp_modern import META, VERSION
from tests.test_upstream_http import call as call_tool
from tests.test_upstream_http import posts, reference

StartDaemon = Callable[..., Daemon]
FIXTURES = Path(__file__).parent / "fixtures"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
SECRET = "sup3r-s3cret-argument-value"
SERVER, CLIENT = 2, 3  # Span.SpanKind
#: The server span of an MCP POST: named after the route that answered, never the raw path.
MCP_POST = "POST /playbooks/{playbook_id}/mcp"
ERROR = 2  # Status.StatusCode


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class Collector:
    """An OTLP/HTTP receiver: decodes every export, answers after ``delay`` seconds."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.requests: list[dict[str, str]] = []
        self.delay = 0.0
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                collector.requests.append({k.lower(): v for k, v in self.headers.items()})
                time.sleep(collector.delay)
                exported = ExportTraceServiceRequest()
                exported.ParseFromString(body)
                for resource in exported.resource_spans:
                    service = {a.key: _value(a.value) for a in resource.resource.attributes}
                    for scope in resource.scope_spans:
                        for span in scope.spans:
                            collector.spans.append({
                                "name": span.name, "kind": span.kind,
                                "trace": span.trace_id.hex(), "id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex(),
                                "status": span.status.code, "service": service,
                                "attributes": {a.key: _value(a.value) for a in span.attributes},
                                "status_message": span.status.message,
                                "events": [(e.name, {a.key: _value(a.value) for a in e.attributes})
                                           for e in span.events]})
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, wanted: Callable[[list[dict[str, Any]]], bool],
                 timeout: float = 15.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = list(self.spans)
            if wanted(spans):
                return spans
            time.sleep(0.05)
        raise AssertionError("the spans wanted never came; got:\n" + "\n".join(
            f"{s['name']} {s['trace'][:8]} {s['id']} <- {s['parent']}" for s in self.spans))


@pytest.fixture
def collector() -> Iterator[Collector]:
    receiver = Collector()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def http_upstreams() -> Iterator[dict[str, int]]:
    """A Streamable HTTP server (both eras), a 2026-07-28-only one and a handshake-only one."""
    ports = {"http": free_port(), "modern": free_port(), "legacy": free_port()}
    with local_servers([
            [sys.executable, str(FIXTURES / "http_reference_server.py"), "--transport",
             "streamable-http", "--port", str(ports["http"])],
            *([sys.executable, str(FIXTURES / "modern_http_server.py"), "--era", era,
               "--port", str(ports[era])] for era in ("modern", "legacy"))],
            list(ports.values())):
        yield ports


class Traced:
    def __init__(self, daemon: Daemon, key: str) -> None:
        self.daemon, self.key = daemon, key

    def post(self, message: dict[str, Any], headers: dict[str, str] | None = None
             ) -> tuple[int, dict[str, str], dict[str, Any]]:
        status, answer_headers, body = self.daemon.request(
            "POST", "/playbooks/ref/mcp", json.dumps(message).encode(),
            {"accept": ACCEPT, "content-type": "application/json", "x-api-key": self.key,
             **(headers or {})})
        return status, answer_headers, parse_response(body) if body else {}

    def session(self) -> str:
        status, headers, _ = self.post(INIT)
        assert status == 200
        assert self.post({"jsonrpc": "2.0", "method": "notifications/initialized"},
                         {"mcp-session-id": headers["mcp-session-id"]})[0] == 202
        return headers["mcp-session-id"]

    def legacy_call(self, session: str, tool: str, arguments: dict[str, Any],
                    traceparent: str | None = None) -> tuple[dict[str, str], dict[str, Any]]:
        headers = {"mcp-session-id": session}
        if traceparent:
            headers["traceparent"] = traceparent
        status, answer_headers, body = self.post({
            "jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments}}, headers)
        assert status == 200, body
        return answer_headers, body

    def modern_call(self, tool: str, arguments: dict[str, Any],
                    traceparent: str | None = None) -> tuple[dict[str, str], dict[str, Any]]:
        headers = {"mcp-protocol-version": VERSION, "mcp-method": "tools/call",
                   "mcp-name": tool}
        if traceparent:
            headers["traceparent"] = traceparent
        status, answer_headers, body = self.post({
            "jsonrpc": "2.0", "id": 8, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments, "_meta": META}}, headers)
        assert status == 200, body
        return answer_headers, body


def start_traced(start_daemon: StartDaemon, migrated_url: str, endpoint: str | None,
                 http_upstreams: dict[str, int] | None = None, **env: str) -> Traced:
    if endpoint is not None:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    daemon = start_daemon(DATABASE_URL=migrated_url, OTEL_BSP_SCHEDULE_DELAY="100",
                          DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS="true",
                          DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS="true", **env)
    daemon.wait_healthy()
    owner = sign_up(daemon, "tracing@example.com")
    assert call(daemon, "POST", "/api/v1/playbooks", {"name": "Ref"}, key=owner.key)[0] == 201
    servers = [reference_server(prefix="s_")]
    if http_upstreams is not None:
        servers += [{"name": "web", "type": "http", "prefix": "h_",
                     "url": f"http://127.0.0.1:{http_upstreams['http']}/mcp"},
                    {"name": "modern", "type": "http", "prefix": "m_",
                     "url": f"http://127.0.0.1:{http_upstreams['modern']}/mcp"},
                    {"name": "old", "type": "http", "prefix": "l_",
                     "url": f"http://127.0.0.1:{http_upstreams['legacy']}/mcp"}]
    for server in servers:
        status, _, body = call(daemon, "POST", "/api/v1/playbooks/ref/servers", server,
                               key=owner.key)
        assert status == 201, body
    return Traced(daemon, owner.key)


def debug(port: int) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/log", timeout=5) as answer:
        return json.loads(answer.read())  # type: ignore[no-any-return]


async def sampled(context: Any, params: types.CreateMessageRequestParams) -> Any:
    """A client's sampling callback."""
    return types.CreateMessageResult(role="assistant", model="m",
                                     content=types.TextContent(type="text", text="sampled"))


def text_of(body: dict[str, Any]) -> str:
    return str(body["result"]["content"][0]["text"])


def tree(spans: list[dict[str, Any]], trace: str) -> dict[str, dict[str, Any]]:
    return {span["id"]: span for span in spans if span["trace"] == trace}


def one(spans: dict[str, dict[str, Any]], name: str, **attributes: Any) -> dict[str, Any]:
    found = [s for s in spans.values() if s["name"] == name and all(
        s["attributes"].get(k) == v for k, v in attributes.items())]
    assert len(found) == 1, (name, [(s["name"], s["attributes"]) for s in spans.values()])
    return found[0]


def rooted(spans: list[dict[str, Any]], span_id: str) -> bool:
    """Whether the span and every ancestor up to its trace's first span here were exported
    (a parent ends, and is exported, after its children)."""
    by_id = {s["id"]: s for s in spans}
    span = by_id.get(span_id)
    while span is not None:
        if span["parent"] in ("", CLIENT_SPAN):
            return True
        span = by_id.get(span["parent"])
    return False


def chain(spans: dict[str, dict[str, Any]], leaf: dict[str, Any]) -> list[str]:
    """The names from the trace's root down to ``leaf``."""
    names = []
    span: dict[str, Any] | None = leaf
    while span is not None:
        names.append(span["name"])
        span = spans.get(span["parent"])
    return names[::-1]


def test_a_call_is_one_trace_from_the_client_into_each_upstream(
        start_daemon: StartDaemon, migrated_url: str, collector: Collector,
        http_upstreams: dict[str, int]) -> None:
    gateway = start_traced(start_daemon, migrated_url, collector.endpoint, http_upstreams,
                           OTEL_SERVICE_NAME="director-test")
    session = gateway.session()

    # Handshake era, stdio upstream: the client's traceparent is continued, and the server
    # receives, in params._meta, the context of the gateway's client span for its call.
    parent = f"00-{TRACE}-{CLIENT_SPAN}-01"
    headers, body = gateway.legacy_call(session, "s_trace_meta", {}, parent)
    assert headers["x-trace-id"] == TRACE
    received = json.loads(text_of(body))
    assert received["traceparent"].startswith(f"00-{TRACE}-")
    stdio_parent = received["traceparent"].split("-")[2]

    spans = tree(collector.wait_for(lambda spans: rooted(spans, stdio_parent)), TRACE)
    upstream = spans[stdio_parent]
    assert upstream["name"] == "tools/call trace_meta" and upstream["kind"] == CLIENT
    assert upstream["attributes"]["director.server.name"] == "reference"
    assert upstream["attributes"]["director.upstream.transport"] == "stdio"
    assert upstream["attributes"]["network.transport"] == "pipe"
    assert chain(spans, upstream) == [MCP_POST, "tools/call s_trace_meta",
                                      "tools/call trace_meta"]
    request = one(spans, MCP_POST)
    assert request["parent"] == CLIENT_SPAN and request["kind"] == SERVER
    assert request["attributes"]["http.response.status_code"] == 200
    assert request["attributes"]["http.route"] == "/playbooks/{playbook_id}/mcp"
    assert "url.path" not in request["attributes"]
    assert request["service"]["service.name"] == "director-test"
    method = one(spans, "tools/call s_trace_meta")
    assert method["kind"] == SERVER
    assert method["attributes"]["mcp.method.name"] == "tools/call"
    assert method["attributes"]["gen_ai.tool.name"] == "s_trace_meta"
    assert method["attributes"]["mcp.session.id"] == session[:8]
    assert method["attributes"]["director.mcp.transport"] == "streamable"
    route = one(spans, "route")
    assert route["parent"] == method["id"]
    assert route["attributes"]["director.server.name"] == "reference"
    authenticate = one(spans, "authenticate")
    assert authenticate["parent"] == request["id"]
    assert one(spans, "rate limit")["parent"] == authenticate["id"]

    # A trace the client did not sample is not exported, but its context still travels.
    _, body = gateway.legacy_call(session, "s_trace_meta", {}, f"00-{'5' * 32}-{CLIENT_SPAN}-00")
    received = json.loads(text_of(body))["traceparent"]
    assert received.startswith(f"00-{'5' * 32}-") and received.endswith("-00")

    # Handshake era, Streamable HTTP upstream: the traceparent header of the POST that
    # carried the call names the gateway's client span.
    second = f"00-{TRACE[::-1]}-{CLIENT_SPAN}-01"
    _, body = gateway.legacy_call(session, "h_echo", {"text": "hello"}, second)
    assert text_of(body) == "hello"
    posted = [entry for entry in debug(http_upstreams["http"]) if isinstance(entry["body"], dict)
              and entry["body"].get("method") == "tools/call"]
    header = posted[-1]["headers"]["traceparent"]
    assert header.startswith(f"00-{TRACE[::-1]}-")
    spans = tree(collector.wait_for(lambda spans: rooted(spans, header.split("-")[2])),
                 TRACE[::-1])
    upstream = spans[header.split("-")[2]]
    assert chain(spans, upstream) == [MCP_POST, "tools/call h_echo", "tools/call echo"]
    assert upstream["attributes"]["director.upstream.transport"] == "streamable-http"
    assert upstream["attributes"]["server.address"] == "127.0.0.1"

    # The 2026-07-28 era, from the client to the stdio server and to a modern HTTP server.
    third = f"00-{'1' * 32}-{CLIENT_SPAN}-01"
    headers, body = gateway.modern_call("s_trace_meta", {}, third)
    assert headers["x-trace-id"] == "1" * 32
    received = json.loads(text_of(body))
    assert received["traceparent"].startswith(f"00-{'1' * 32}-")
    stdio_parent = received["traceparent"].split("-")[2]
    fourth = f"00-{'2' * 32}-{CLIENT_SPAN}-01"
    _, body = gateway.modern_call("m_echo", {"text": "modern"}, fourth)
    assert text_of(body) == "modern"
    sent = [entry["traceparent"] for entry in debug(http_upstreams["modern"])
            if entry["rpc"] == "tools/call"]
    assert sent[-1].startswith(f"00-{'2' * 32}-")
    spans = tree(collector.wait_for(lambda spans: rooted(spans, stdio_parent)), "1" * 32)
    assert chain(spans, spans[stdio_parent]) == [MCP_POST, "tools/call s_trace_meta",
                                                 "tools/call trace_meta"]
    assert one(spans, "tools/call s_trace_meta")["attributes"]["director.mcp.transport"] == \
        "modern"
    spans = tree(collector.wait_for(lambda spans: rooted(spans, sent[-1].split("-")[2])),
                 "2" * 32)
    modern_upstream = spans[sent[-1].split("-")[2]]
    assert chain(spans, modern_upstream) == [MCP_POST, "tools/call m_echo", "tools/call echo"]
    assert modern_upstream["attributes"]["director.upstream.transport"] == "modern"

    assert not any(span["trace"] == "5" * 32 for span in collector.spans)

    # A 2026-07-28 client's call whose handshake-only server asks for sampling mid-call: the
    # request is bridged to input_required, and relayed in the call's trace.
    async def asking() -> str:
        url = f"{gateway.daemon.base}/playbooks/ref/mcp?key={gateway.key}"
        async with Client(url, mode="auto", sampling_callback=sampled) as client:
            asked = await client.call_tool("l_sample", {"prompt": "p"})
            return str(asked.content[0].text)

    assert "sampled" in run(asking())
    spans = collector.wait_for(lambda spans: any(
        s["name"] == "sampling/createMessage" and rooted(spans, s["id"]) for s in spans))
    by_id = {s["id"]: s for s in spans}
    relayed = next(s for s in spans if s["name"] == "sampling/createMessage")
    assert by_id[relayed["parent"]]["name"] == "tools/call l_sample"
    assert by_id[relayed["parent"]]["attributes"]["director.mcp.transport"] == "modern"

    # Database work done for a traced request (the API calls that set the playbook up) is in
    # its trace, named by its statement's first word; starting an upstream is a span too.
    spans = collector.wait_for(lambda spans: any(s["name"].startswith("db ") for s in spans))
    database = [s for s in spans if s["name"].startswith("db ")]
    assert all(s["parent"] for s in database)
    assert all(set(s["attributes"]) == {"db.system.name", "db.operation.name"} for s in database)
    starts = [s for s in spans if s["name"] == "upstream start"]
    assert {s["attributes"]["director.server.name"] for s in starts} >= {"reference", "web"}

    # The log lines of a traced request carry its span beside its trace.
    access = [r for r in gateway.daemon.records() if r.get("trace_id") == TRACE
              and r.get("status") == 200]
    assert access and all(r.get("span_id") == request["id"] for r in access)
    # Every span made current was left in the context it was entered in (Twisted resumes a
    # coroutine in the context it started with); OpenTelemetry logs an error otherwise.
    assert not [r for r in gateway.daemon.records() if r.get("level", 0) >= 50], \
        [r["msg"] for r in gateway.daemon.records() if r.get("level", 0) >= 50]


def test_failures_mark_their_spans_and_no_secret_is_exported(
        start_daemon: StartDaemon, migrated_url: str, collector: Collector) -> None:
    gateway = start_traced(start_daemon, migrated_url, collector.endpoint)
    session = gateway.session()
    _, body = gateway.legacy_call(session, "s_refuse", {"secret": SECRET},
                                  f"00-{TRACE}-{CLIENT_SPAN}-01")
    assert body["result"]["isError"] is True and SECRET in text_of(body)
    _, body = gateway.legacy_call(session, "s_crash", {"code": 3},
                                  f"00-{'3' * 32}-{CLIENT_SPAN}-01")
    assert "error" in body
    _, body = gateway.legacy_call(session, "s_no_such_tool", {"secret": SECRET},
                                  f"00-{'4' * 32}-{CLIENT_SPAN}-01")
    assert body["error"]["code"] == -32602

    # A sampling request the server makes mid-call is relayed in the call's trace. (Handshake
    # era only: to a 2026-07-28 client, this stdio server speaks that era itself, where the
    # SDK's `ctx.session.create_message` has no back-channel.)
    async def asking() -> None:
        url = f"{gateway.daemon.base}/playbooks/ref/mcp?key={gateway.key}"
        async with Client(url, mode="legacy", sampling_callback=sampled) as client:
            asked = await client.call_tool("s_ask", {"question": SECRET})
            assert asked.content[0].text == "sampled"

    run(asking())

    spans = collector.wait_for(lambda spans: {"3" * 32, "4" * 32, TRACE} <= {
        s["trace"] for s in spans if s["name"] == MCP_POST} and any(
        s["name"] == "upstream restart" for s in spans) and any(
        s["name"] == "sampling/createMessage" and rooted(spans, s["id"]) for s in spans))
    by_id = {s["id"]: s for s in spans}
    for relayed in (s for s in spans if s["name"] == "sampling/createMessage"):
        assert relayed["kind"] == CLIENT
        assert by_id[relayed["parent"]]["name"] == "tools/call s_ask"
    refused = tree(spans, TRACE)
    upstream = one(refused, "tools/call refuse")
    assert upstream["status"] == ERROR and upstream["attributes"]["error.type"] == "tool_error"
    method = one(refused, "tools/call s_refuse")
    assert method["status"] == ERROR and method["attributes"]["error.type"] == "tool_error"
    assert one(refused, MCP_POST)["status"] != ERROR  # the HTTP exchange itself went well
    crashed = tree(spans, "3" * 32)
    upstream = one(crashed, "tools/call crash")
    assert upstream["status"] == ERROR and upstream["attributes"]["error.type"] == "UpstreamError"
    method = one(crashed, "tools/call s_crash")
    assert method["status"] == ERROR and isinstance(
        method["attributes"]["rpc.jsonrpc.error_code"], int)
    unknown = one(tree(spans, "4" * 32), "tools/call s_no_such_tool")
    assert unknown["attributes"]["rpc.jsonrpc.error_code"] == -32602
    assert unknown["attributes"]["error.type"] == "-32602"
    # The stdio server's restart after the crash is a trace of its own.
    restart = next(s for s in spans if s["name"] == "upstream restart")
    assert restart["parent"] == "" and restart["attributes"]["director.server.name"] == "reference"

    # Nothing a client sent as an argument or a credential, nor an upstream's error text, is in
    # any exported attribute, event or status.
    exported = json.dumps(spans)
    for secret in (SECRET, gateway.key, gateway.key[:12]):
        assert secret not in exported
    assert not any("detach" in str(r.get("msg")) for r in gateway.daemon.records())
    assert all("authorization" not in str(r) for r in collector.requests)


def metric(port: int, series: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        lines = [line for line in answer.read().decode().splitlines()
                 if line.startswith(series + " ")]
    return float(lines[0].split()[-1]) if lines else 0.0


def twenty_calls(gateway: Traced) -> float:
    """Seconds 20 calls took (after a first one that starts the server)."""
    session = gateway.session()
    gateway.legacy_call(session, "s_echo", {"text": "warm"})
    started = time.monotonic()
    for index in range(20):
        _, body = gateway.legacy_call(session, "s_echo", {"text": str(index)})
        assert text_of(body) == str(index)
    return time.monotonic() - started


def test_a_collector_down_changes_nothing_for_clients_and_is_logged_once(
        start_daemon: StartDaemon, migrated_url: str) -> None:
    metrics = free_port()
    down = f"http://127.0.0.1:{free_port()}"
    gateway = start_traced(start_daemon, migrated_url, down,
                           METRICS_LISTEN=f"127.0.0.1:{metrics}")
    assert twenty_calls(gateway) < 5
    gateway.daemon.wait_for_log("did not take", timeout=20)
    twenty_calls(gateway)
    time.sleep(1.0)  # more batches fail meanwhile: still one line
    assert sum("did not take" in r.get("msg", "") for r in gateway.daemon.records()) == 1
    assert metric(metrics, 'director_tracing_spans_dropped_total{reason="export_failed"}') > 0


def test_a_slow_collector_changes_nothing_for_clients(
        start_daemon: StartDaemon, migrated_url: str, collector: Collector) -> None:
    collector.delay = 3.0
    gateway = start_traced(start_daemon, migrated_url, collector.endpoint)
    assert twenty_calls(gateway) < 5
    collector.wait_for(lambda spans: len(spans) > 0)


def test_tracing_off_exports_nothing_and_passes_no_context(
        start_daemon: StartDaemon, migrated_url: str, collector: Collector) -> None:
    gateway = start_traced(start_daemon, migrated_url, None,
                           OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=collector.endpoint + "/v1/traces",
                           OTEL_SDK_DISABLED="true")
    session = gateway.session()
    headers, body = gateway.legacy_call(session, "s_trace_meta", {},
                                        f"00-{TRACE}-{CLIENT_SPAN}-01")
    assert headers["x-trace-id"] == TRACE  # the trace id is still honoured and logged
    assert json.loads(text_of(body)) == {"traceparent": None, "tracestate": None}
    time.sleep(0.5)
    assert collector.requests == []
    assert not any("span_id" in record for record in gateway.daemon.records())


def test_doctor_checks_the_collector(collector: Collector) -> None:
    assert check_tracing(load_settings({})) is None
    found = check_tracing(load_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
                                         "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=t1"}))
    assert found is not None and found.status == OK, found
    assert collector.requests[-1]["x-tenant"] == "t1"
    found = check_tracing(load_settings(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"}))
    assert found is not None and found.status == FAIL and "cannot be reached" in found.summary


# --- in process: what a daemon test cannot reach easily ------------------------------------


@pytest.fixture
def memory_tracer() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, its spans kept in memory (the SDK's own exporter)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider.get_tracer("test"))
    yield exporter
    tracing.install(None)
    provider.shutdown()


@pytest_twisted.ensureDeferred
async def test_an_http_session_reinitialised_is_a_span_of_the_call_that_found_it_gone(
        memory_tracer: InMemorySpanExporter) -> None:
    server = reference()
    pool = new_pool(reactor, endpoints=CheckedEndpoints(reactor, allow_insecure=True))
    session = StreamableHttpUpstream("ref", f"{server.base}/mcp", {}, reactor, pool)
    try:
        server.wait_ready()
        await session.start()
        server.stop()
        with pytest.raises(UpstreamError):  # what the pooled connection learns it from
            await call_tool(session, "echo", text="while down")
        server.launch()  # a new process: it forgot the session
        server.wait_ready()
        await pool.closeCachedConnections()  # none kept to the process that is gone
        with tracing.span("call") as parent:
            assert await call_tool(session, "echo", text="after") == "after"
        assert parent is not None
        renewed = next(s for s in memory_tracer.get_finished_spans()
                       if s.name == "upstream reinitialize")
        assert renewed.parent is not None
        assert renewed.parent.span_id == parent.get_span_context().span_id
        assert renewed.attributes is not None
        assert renewed.attributes["director.server.name"] == "ref"
        trace_id = format(parent.get_span_context().trace_id, "032x")
        for sent in (posts(server.log(), "initialize")[-1], posts(server.log(), "tools/call")[-1]):
            assert sent["headers"]["traceparent"].split("-")[1] == trace_id
    finally:
        await session.close()
        await pool.closeCachedConnections()
        server.stop()


def test_an_oauth_refresh_is_a_span_of_the_call_that_needed_it(
        start_daemon: StartDaemon, migrated_url: str, collector: Collector) -> None:
    from tests.test_upstream_oauth import authorized_session, echo, echoed, started
    from tests.upstream_oauth_helpers import protected_server

    with protected_server() as server:
        daemon = started(start_daemon, migrated_url, OTEL_BSP_SCHEDULE_DELAY="100",
                         OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint)
        owner, session = authorized_session(daemon, server, "refresh@example.com")
        assert echoed(echo(daemon, owner, session, "one")) == "one"
        server.post("/debug/expire")  # the server no longer takes the token Director holds
        assert echoed(echo(daemon, owner, session, "again")) == "again"
    spans = collector.wait_for(lambda spans: any(
        s["name"] == "oauth refresh" and rooted(spans, s["id"]) for s in spans))
    by_id = {s["id"]: s for s in spans}
    refresh = next(s for s in spans if s["name"] == "oauth refresh")
    assert chain(by_id, refresh) == [MCP_POST, "tools/call echo", "tools/call echo",
                                     "oauth refresh"]  # client, method, upstream call, refresh
    assert by_id[refresh["parent"]]["kind"] == CLIENT
    assert set(refresh["attributes"]) == {"director.oauth.generation"}
