"""Stdio upstreams: the ``mcp`` SDK's reference server, the npm "everything" server, and fixture
servers that crash, hang, flood, or write what no MCP server should."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from director.mcp.jsonrpc import INVALID_PARAMS, ProtocolError, encode
from director.mcp.upstream import account as account_module
from director.mcp.upstream import stdio
from director.mcp.upstream.account import stdio_account
from director.mcp.upstream.base import (
    UpstreamError,
    UpstreamRequestError,
    UpstreamTimeout,
    initialize_params,
)
from director.mcp.upstream.eras import EraMemory, stdio_key
from director.mcp.upstream.stdio import StdioUpstream, child_environment
from director.sandbox import chain
from tests.harness import make_temp_dir

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
REFERENCE = FIXTURES / "reference_server.py"
RAW = FIXTURES / "raw_server.py"
EVERYTHING = ROOT / "tests" / "npm" / "node_modules" / ".bin" / "mcp-server-everything"


# --- helpers ---------------------------------------------------------------------------------

async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await sleep(0.02)


def alive(pid: int) -> bool:
    """Running (a zombie counts as gone: it is only waiting for its parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def text_of(result: dict[str, Any]) -> str:
    return str(result["content"][0]["text"])


async def call(upstream: StdioUpstream, tool: str, **arguments: Any) -> dict[str, Any]:
    return await upstream.request("tools/call", {"name": tool, "arguments": arguments})


async def call_with_timeout(upstream: StdioUpstream, timeout: float) -> dict[str, Any]:
    return await upstream.request("tools/call", {"name": "echo", "arguments": {"text": "t"}},
                                  timeout=timeout)


@pytest.fixture
def upstreams() -> Any:
    """``make(name, command, args, **options)``; whatever is still open is closed at the end."""
    made: list[StdioUpstream] = []

    def make(name: str, command: str, args: list[str], env: dict[str, str] | None = None,
             cwd: str | None = None, **options: Any) -> StdioUpstream:
        # As the daemon does: a root test process gives its children nobody's identity.
        options.setdefault("account", stdio_account("nobody"))
        upstream = StdioUpstream(name, command, args, env or {}, cwd, reactor, **options)
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        pytest_twisted.blockon(defer.ensureDeferred(upstream.close()))


@pytest.fixture
def shared_dir() -> Any:
    """A directory the children may read and write: run as root, the suite starts them as
    nobody, who cannot enter pytest's own tmp_path (/tmp/pytest-of-root is 0700)."""
    directory = make_temp_dir("director-test-stdio-", 0o777)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def logged() -> Any:
    """The text of every ``upstream.stdio`` log event emitted during the test."""
    lines: list[str] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "upstream.stdio":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def raw_direct(script: Path, *messages: dict[str, Any], answers: int) -> list[bytes]:
    """Run a server without the gateway and return its first ``answers`` stdout lines."""
    process = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(b"".join(encode(message) + b"\n" for message in messages))
    process.stdin.flush()
    lines = [process.stdout.readline() for _ in range(answers)]
    process.stdin.close()
    process.wait(10)
    return lines


def sdk_client_tools() -> list[dict[str, Any]]:
    """tools/list as the ``mcp`` SDK's own client sees the reference server (legacy era)."""
    from mcp import Client, StdioServerParameters

    async def main() -> list[dict[str, Any]]:
        parameters = StdioServerParameters(command=sys.executable, args=[str(REFERENCE)])
        async with Client(parameters, mode="legacy") as client:
            listed = await client.list_tools()
            return [tool.model_dump(by_alias=True, exclude_none=True, mode="json")
                    for tool in listed.tools]

    return asyncio.run(main())


# --- against the mcp SDK's reference server ------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_reference_server_handshake_lists_and_calls_faithfully(upstreams: Any) -> None:
    sdk_view = threads.deferToThread(sdk_client_tools)
    direct = threads.deferToThread(
        raw_direct, REFERENCE,
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": initialize_params()},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, answers=2)
    upstream: StdioUpstream = upstreams("reference", sys.executable, [str(REFERENCE)])
    await upstream.start()
    assert upstream.state == "ready"
    assert upstream.initialize_result["serverInfo"]["name"] == "reference"
    assert upstream.initialize_result["protocolVersion"] == "2025-11-25"
    assert upstream.initialize_result["instructions"] == "A reference server for Director's tests."

    tools = await upstream.request("tools/list")
    # Byte-faithful: exactly what the server wrote, key order included.
    initialize_line, tools_line = await direct
    assert encode(tools) == encode(json.loads(tools_line)["result"])
    assert encode(upstream.initialize_result) == encode(json.loads(initialize_line)["result"])
    by_name = {tool["name"]: tool for tool in tools["tools"]}
    assert {"echo", "add", "norm", "slow", "chatty", "ask", "crash", "hang"} <= set(by_name)
    assert "$defs" in by_name["norm"]["inputSchema"]
    for sdk_tool in await sdk_view:
        assert by_name[sdk_tool["name"]]["inputSchema"] == sdk_tool["inputSchema"]

    assert text_of(await call(upstream, "echo", text="héllo\nworld")) == "héllo\nworld"
    assert (await call(upstream, "add", a=2, b=40))["structuredContent"] == {"result": 42}
    prompt = await upstream.request("prompts/get", {"name": "greet", "arguments": {"name": "Ada"}})
    assert prompt["messages"][0]["content"]["text"] == "Say hello to Ada."
    resource = await upstream.request("resources/read", {"uri": "test://static"})
    assert resource["contents"][0]["text"] == "static content"
    with pytest.raises(UpstreamRequestError) as raised:
        await upstream.request("no/such/method")
    assert raised.value.error["code"] == -32601

    # 50 concurrent calls: ids never collide and every answer reaches its caller.
    started = time.monotonic()
    results = await defer.gatherResults([
        defer.ensureDeferred(call(upstream, "add", a=number, b=1000)) for number in range(50)])
    assert [result["structuredContent"]["result"] for result in results] == \
        [number + 1000 for number in range(50)]
    print(f"50 concurrent calls: {time.monotonic() - started:.3f} s")


@pytest_twisted.ensureDeferred
async def test_reference_server_progress_logs_and_sampling(upstreams: Any) -> None:
    upstream: StdioUpstream = upstreams("reference", sys.executable, [str(REFERENCE)])
    notifications: list[dict[str, Any]] = []
    requests: list[tuple[str, dict[str, Any]]] = []
    upstream.on_notification = notifications.append

    async def on_request(method: str, params: dict[str, Any]) -> dict[str, Any]:
        requests.append((method, params))
        question = params["messages"][0]["content"]["text"]
        return {"role": "assistant", "model": "test-model",
                "content": {"type": "text", "text": f"answer to {question}"}}

    upstream.on_request = on_request
    await upstream.start()

    # Progress: relayed with the caller's own token (a string here, colliding with nothing),
    # and each notification restarts the timeout (0.6 s in total, 0.4 s timeout).
    progress: list[dict[str, Any]] = []
    result = await upstream.request(
        "tools/call", {"name": "slow", "arguments": {"steps": 4, "delay": 0.15},
                       "_meta": {"progressToken": "caller-token", "other": 1}},
        timeout=0.4, on_progress=progress.append)
    assert text_of(result) == "done after 4 steps"
    assert [(p["progressToken"], p["progress"], p["total"]) for p in progress] == \
        [("caller-token", step, 4) for step in range(1, 5)]
    assert progress[0]["message"] == "step 1"
    assert not [n for n in notifications if n["method"] == "notifications/progress"]

    # Logging: a notifications/message reaches on_notification whole.
    assert text_of(await call(upstream, "chatty", message="look at this")) == "logged"
    await eventually(lambda: any(n["method"] == "notifications/message" for n in notifications))
    message = next(n for n in notifications if n["method"] == "notifications/message")
    assert message["params"]["data"] == "look at this"
    assert message["params"]["level"] == "info"
    assert message["params"]["logger"] == "reference"

    # Sampling: the server's request is answered through on_request.
    assert text_of(await call(upstream, "ask", question="why?")) == "answer to why?"
    assert requests[0][0] == "sampling/createMessage"
    assert requests[0][1]["maxTokens"] == 50

    # An on_request that refuses answers with its JSON-RPC error (the SDK server then fails
    # the tools/call with it).
    async def refuse(method: str, params: dict[str, Any]) -> dict[str, Any]:
        raise ProtocolError(INVALID_PARAMS, "no sampling today")

    upstream.on_request = refuse
    with pytest.raises(UpstreamRequestError) as refused:
        await call(upstream, "ask", question="again?")
    assert refused.value.error["message"] == "no sampling today"


@pytest_twisted.ensureDeferred
async def test_timeout_and_cancellation_send_notifications_cancelled(upstreams: Any,
                                                                     shared_dir: Path) -> None:
    cancellations = shared_dir / "cancelled.log"
    upstream: StdioUpstream = upstreams("reference", sys.executable, [str(REFERENCE)],
                                        {"REFERENCE_CANCEL_LOG": str(cancellations)})
    await upstream.start()

    def logged() -> list[str]:
        return cancellations.read_text().splitlines() if cancellations.exists() else []

    def cancelled() -> list[str]:
        return [line for line in logged() if line.startswith("cancelled ")]

    started = time.monotonic()
    with pytest.raises(UpstreamTimeout, match=r"^\[reference\] no answer to tools/call within 0.5 s"):
        await upstream.request("tools/call", {"name": "hang", "arguments": {"tag": "timeout"}},
                               timeout=0.5)
    assert 0.45 < time.monotonic() - started < 1.5
    await eventually(lambda: cancelled() == ["cancelled timeout"])

    # Cancelling the Deferred (the downstream client went away) cancels upstream too.
    waiting = defer.ensureDeferred(
        upstream.request("tools/call", {"name": "hang", "arguments": {"tag": "client"}}))
    await eventually(lambda: "started client" in logged())
    waiting.cancel()
    with pytest.raises(defer.CancelledError):
        await waiting
    await eventually(lambda: cancelled() == ["cancelled timeout", "cancelled client"])

    # The upstream is still in good shape, and nothing is left pending.
    assert text_of(await call(upstream, "echo", text="still here")) == "still here"
    assert upstream._peer.pending == 0


@pytest_twisted.ensureDeferred
async def test_crash_mid_call_fails_that_call_then_restarts(upstreams: Any) -> None:
    upstream: StdioUpstream = upstreams("reference", sys.executable, [str(REFERENCE)])
    closed: list[str] = []
    restarted: list[bool] = []
    upstream.on_closed = closed.append
    upstream.on_restored = lambda result: restarted.append(True)
    await upstream.start()
    first_pid = int(text_of(await call(upstream, "pid")))
    assert first_pid == upstream.pid

    other = defer.ensureDeferred(call(upstream, "hang", tag="bystander"))
    with pytest.raises(UpstreamError) as raised:
        await call(upstream, "crash", code=7)
    assert str(raised.value).startswith("[reference] process exited unexpectedly: exit 7")
    assert "crashing on purpose" in str(raised.value)
    with pytest.raises(UpstreamError, match="process exited unexpectedly"):
        await other  # every pending request fails, not only the one that crashed it
    assert closed == [str(raised.value)]
    assert upstream.state == "restarting"

    # A request made during the restart waits for it.
    result = await call(upstream, "pid")
    assert int(text_of(result)) != first_pid
    assert upstream.state == "ready"
    assert upstream.restarts == 1
    assert restarted == [True]
    assert not alive(first_pid)


@pytest_twisted.ensureDeferred
async def test_failed_restart_fails_fast_then_recovers_with_backoff(upstreams: Any,
                                                                   shared_dir: Path) -> None:
    marker = shared_dir / "fail"
    upstream: StdioUpstream = upstreams("raw", sys.executable, [str(RAW)],
                                        {"RAW_FAIL_IF": str(marker)})
    await upstream.start()
    marker.touch()
    with pytest.raises(UpstreamError, match="exit 7"):
        await call(upstream, "crash")
    # During the restart, a request waits, but no longer than its own timeout.
    assert upstream.state == "restarting"
    with pytest.raises(UpstreamTimeout, match=r"^\[raw\] still restarting after 0.2 s$"):
        await call_with_timeout(upstream, 0.2)
    # First attempt after 0.5 s fails (the marker): requests now fail at once, saying why.
    await eventually(lambda: upstream.state == "failed")
    assert upstream.restarts == 1
    started = time.monotonic()
    with pytest.raises(UpstreamError) as raised:
        await call(upstream, "echo", text="too early")
    assert time.monotonic() - started < 0.1
    assert str(raised.value) == ("[raw] failed to run '" + sys.executable + "': exit 5: "
                                 "refusing to start: the failure marker exists")
    # The next attempt comes 1 s later (backoff doubled) and succeeds.
    marker.unlink()
    await eventually(lambda: upstream.state == "ready", timeout=3)
    assert upstream.restarts == 2
    assert text_of(await call(upstream, "echo", text="back")) == "back"


@pytest_twisted.ensureDeferred
async def test_what_goes_on_the_wire(upstreams: Any, shared_dir: Path) -> None:
    """Ids are the connection's own; progress tokens are swapped and restored; cancellations
    name the upstream id."""
    log = shared_dir / "received.log"
    upstream: StdioUpstream = upstreams("raw", sys.executable, [str(RAW)], {"RAW_LOG": str(log)})
    await upstream.start()
    progress: list[dict[str, Any]] = []
    await upstream.request("tools/call", {
        "name": "progress", "arguments": {"steps": 2, "delay": 0.01},
        "_meta": {"progressToken": 1, "vendor/extra": {"kept": True}}},
        on_progress=progress.append)
    assert [p["progressToken"] for p in progress] == [1, 1]
    with pytest.raises(UpstreamTimeout):
        await upstream.request("tools/call", {"name": "hang", "arguments": {}}, timeout=0.2)
    waiting = defer.ensureDeferred(call(upstream, "hang"))
    await sleep(0.1)
    waiting.cancel()
    with pytest.raises(defer.CancelledError):
        await waiting
    upstream.notify("notifications/roots/list_changed")
    await call(upstream, "echo", text="sync")

    received = [json.loads(line) for line in log.read_text().splitlines()]
    calls = [m for m in received if m.get("method") == "tools/call"]
    cancels = [m["params"] for m in received if m.get("method") == "notifications/cancelled"]
    assert received[0]["id"] == 1 and received[0]["method"] == "initialize"
    assert received[0]["params"] == initialize_params()
    assert [m["id"] for m in calls] == [2, 3, 4, 5]
    assert calls[0]["params"]["_meta"] == {"progressToken": 2, "vendor/extra": {"kept": True}}
    assert cancels == [{"requestId": 3, "reason": "timeout"},
                       {"requestId": 4, "reason": "cancelled by the client"}]
    assert {"jsonrpc": "2.0", "method": "notifications/roots/list_changed"} in received


@pytest_twisted.ensureDeferred
async def test_without_restart_a_crash_is_final(upstreams: Any) -> None:
    upstream: StdioUpstream = upstreams("raw", sys.executable, [str(RAW)], restart=False)
    closed: list[str] = []
    upstream.on_closed = closed.append
    await upstream.start()
    with pytest.raises(UpstreamError, match="exit 9"):
        await call(upstream, "crash", code=9)
    assert upstream.state == "failed"
    assert closed == ["[raw] process exited unexpectedly: exit 9: crashing on purpose"]
    with pytest.raises(UpstreamError, match="exit 9"):
        await call(upstream, "echo", text="no")
    await sleep(0.6)
    assert upstream.restarts == 0 and upstream.pid is None


# --- against @modelcontextprotocol/server-everything -----------------------------------------

@pytest_twisted.ensureDeferred
async def test_server_everything_over_stdio(upstreams: Any) -> None:
    if not EVERYTHING.exists():
        pytest.skip(f"{EVERYTHING} is missing: run `make test` (npm install in tests/npm)")
    upstream: StdioUpstream = upstreams("everything", "node", [str(EVERYTHING), "stdio"])
    await upstream.start()
    assert "tools" in upstream.initialize_result["capabilities"]
    tools = await upstream.request("tools/list")
    assert "echo" in {tool["name"] for tool in tools["tools"]}
    result = await call(upstream, "echo", message="hello everything")
    assert "hello everything" in text_of(result)


# --- failures --------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_command_not_found(upstreams: Any) -> None:
    upstream: StdioUpstream = upstreams("ghost", "no-such-command-here", [])
    with pytest.raises(UpstreamError) as raised:
        await upstream.start()
    assert str(raised.value) == "[ghost] command not found: 'no-such-command-here'"
    assert upstream.state == "failed"
    with pytest.raises(UpstreamError, match="command not found"):
        await upstream.request("tools/list")


@pytest_twisted.ensureDeferred
async def test_exits_before_answering(upstreams: Any) -> None:
    upstream: StdioUpstream = upstreams("boom", "sh", ["-c", "echo starting >&2; echo boom >&2; exit 3"])
    with pytest.raises(UpstreamError) as raised:
        await upstream.start()
    assert str(raised.value) == "[boom] failed to run 'sh': exit 3: starting\nboom"
    assert upstream.state == "failed"


@pytest_twisted.ensureDeferred
async def test_handshake_timeout(upstreams: Any) -> None:
    upstream: StdioUpstream = upstreams("mute", "sleep", ["1000"], handshake_timeout=0.3)
    with pytest.raises(UpstreamTimeout, match=r"^\[mute\] no answer to initialize within 0.3 s$"):
        await upstream.start()
    assert upstream.pid is None
    assert upstream.state == "failed"

    # Cancelling start() stops the child too.
    patient: StdioUpstream = upstreams("patient", "sleep", ["1000"])
    starting = defer.ensureDeferred(patient.start())
    await eventually(lambda: patient.pid is not None)
    pid = patient.pid
    assert pid is not None
    starting.cancel()
    with pytest.raises(defer.CancelledError):
        await starting
    assert patient.state == "failed"
    assert not alive(pid)


@pytest_twisted.ensureDeferred
async def test_garbage_on_stdout_is_logged_and_dropped(upstreams: Any, logged: list[str]) -> None:
    upstream: StdioUpstream = upstreams("raw", sys.executable, [str(RAW)])
    await upstream.start()
    assert text_of(await call(upstream, "garbage")) == "after garbage"
    dropped = [line for line in logged if "dropped from stdout" in line]
    assert len(dropped) == 4, dropped
    assert "this is not json" in dropped[0]
    assert "batches are not supported" in dropped[2]
    assert upstream.state == "ready"


@pytest_twisted.ensureDeferred
async def test_a_result_that_is_not_an_object_fails_that_request(upstreams: Any) -> None:
    upstream: StdioUpstream = upstreams("raw", sys.executable, [str(RAW)])
    await upstream.start()
    with pytest.raises(UpstreamError) as raised:
        await call(upstream, "not_an_object")
    assert str(raised.value) == ("[raw] answered with a result that is not a JSON object "
                                 "(list); every MCP result is one")
    assert text_of(await call(upstream, "echo", text="still here")) == "still here"


@pytest_twisted.ensureDeferred
async def test_an_answer_whose_id_is_a_digit_string_is_understood(upstreams: Any) -> None:
    """As the HTTP transport does (tests/test_upstream_http.py): one rule for both."""
    upstream: StdioUpstream = upstreams("raw", sys.executable, [str(RAW)])
    await upstream.start()
    assert text_of(await call(upstream, "string_id")) == "string id"


@pytest_twisted.ensureDeferred
async def test_a_cancelled_server_request_is_stopped_and_not_passed_on(upstreams: Any) -> None:
    """The upstream cancels its own ``roots/list``: the gateway stops answering it, and the
    notification, which names the upstream's own request id, goes no further (as over HTTP)."""
    upstream: StdioUpstream = upstreams("raw", sys.executable, [str(RAW)])
    cancelled: list[bool] = []
    answering: defer.Deferred[dict[str, Any]] = defer.Deferred(lambda _: cancelled.append(True))
    upstream.on_request = lambda method, params: answering
    passed_on: list[dict[str, Any]] = []
    upstream.on_notification = passed_on.append
    await upstream.start()
    assert text_of(await call(upstream, "cancelled_roots")) == "cancelled it"
    await eventually(lambda: bool(cancelled))
    assert [each["method"] for each in passed_on
            if each["method"] == "notifications/cancelled"] == []


@pytest_twisted.ensureDeferred
async def test_a_failing_hook_breaks_neither_the_call_nor_the_transport(upstreams: Any) -> None:
    upstream: StdioUpstream = upstreams("raw", sys.executable, [str(RAW)])
    await upstream.start()
    failures: list[str] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "mcp.upstream" and "log_failure" in event:
            failures.append(formatEvent(event))

    def broken(params: dict[str, Any]) -> None:
        raise RuntimeError("bug in the gateway")

    globalLogPublisher.addObserver(observe)
    try:
        result = await upstream.request("tools/call", {"name": "progress", "arguments": {
            "steps": 2, "delay": 0}, "_meta": {"progressToken": "p"}}, on_progress=broken)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert "content" in result
    assert failures == ["[raw] on_progress failed"] * 2
    assert text_of(await call(upstream, "echo", text="fine")) == "fine"


@pytest_twisted.ensureDeferred
async def test_oversized_line_fails_pending_and_restarts_without_buffering(upstreams: Any) -> None:
    upstream: StdioUpstream = upstreams("raw", sys.executable, [str(RAW)], max_line=1024 * 1024)
    await upstream.start()
    bystander = defer.ensureDeferred(call(upstream, "hang"))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM)
    with pytest.raises(UpstreamError) as raised:
        await call(upstream, "oversize", size=256 * 1024 * 1024)
    assert str(raised.value) == \
        "[raw] sent a line longer than 1 MiB on stdout; restarting it"
    with pytest.raises(UpstreamError, match="longer than 1 MiB"):
        await bystander
    assert text_of(await call(upstream, "echo", text="fresh")) == "fresh"
    assert upstream.restarts == 1
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    peak_growth = int(status["VmHWM"].split()[0]) - int(status["VmRSS"].split()[0])
    assert peak_growth < 16 * 1024, f"peak RSS {peak_growth} KiB above the current RSS"


@pytest_twisted.ensureDeferred
async def test_stderr_is_logged_rate_limited(upstreams: Any, logged: list[str]) -> None:
    upstream: StdioUpstream = upstreams("raw", sys.executable, [str(RAW)])
    await upstream.start()
    assert text_of(await call(upstream, "stderr_flood", lines=500)) == "flooded"
    await eventually(lambda: any("suppressed" in line for line in logged), timeout=2)
    lines = [line for line in logged if line.startswith("[raw] flood line")]
    assert lines[:3] == ["[raw] flood line 0", "[raw] flood line 1", "[raw] flood line 2"]
    assert len(lines) == 20
    assert "[raw] (suppressed 480 stderr lines)" in logged


@pytest_twisted.ensureDeferred
async def test_environment_and_working_directory(upstreams: Any, shared_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIRECTOR_SECRET_FOR_TEST", "must not leak")
    monkeypatch.setenv("LC_TIME", "C.UTF-8")
    monkeypatch.setenv("npm_config_cache", "/tmp/npm-cache")
    monkeypatch.setenv("npm_config_registry", "https://registry.example/")
    upstream: StdioUpstream = upstreams("raw", sys.executable, [str(RAW)],
                                        {"API_TOKEN": "configured"}, str(shared_dir))
    await upstream.start()
    environment = json.loads(text_of(await call(upstream, "env")))
    assert "DIRECTOR_SECRET_FOR_TEST" not in environment
    assert environment["API_TOKEN"] == "configured"
    assert environment["LC_TIME"] == "C.UTF-8"
    assert environment["npm_config_registry"] == "https://registry.example/"
    # The daemon's cache is its own: a child of another account does not get its location.
    assert environment.get("npm_config_cache") == (
        None if upstream.account is not None else "/tmp/npm-cache")
    assert environment["PATH"] == os.environ["PATH"]
    assert set(environment) - {"LC_CTYPE"} == set(child_environment({"API_TOKEN": "x"},
                                                                    account=upstream.account))
    assert text_of(await call(upstream, "cwd")) == str(shared_dir)

    # The roots/list request is answered by the default handler with -32601.
    answer = json.loads(text_of(await call(upstream, "roots")))
    assert answer["code"] == -32601


# --- no process left behind ------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_close_leaves_no_process(upstreams: Any, shared_dir: Path) -> None:
    log = shared_dir / "received.log"
    upstream: StdioUpstream = upstreams("raw", sys.executable, [str(RAW)], {"RAW_LOG": str(log)})
    await upstream.start()
    pid = upstream.pid
    assert pid is not None and os.getpgid(pid) == pid and os.getsid(pid) == pid
    grandchild = int(text_of(await call(upstream, "grandchild")))
    hanging = defer.ensureDeferred(call(upstream, "hang"))
    started = time.monotonic()
    await defer.gatherResults([defer.ensureDeferred(upstream.close()),
                               defer.ensureDeferred(upstream.close())])  # idempotent
    assert time.monotonic() - started < 1.0  # stdin closed: it left by itself
    await upstream.close()
    with pytest.raises(UpstreamError, match=r"^\[raw\] closed$"):
        await hanging
    assert upstream.state == "closed"
    assert not alive(pid)
    await eventually(lambda: not alive(grandchild), timeout=2)
    methods = [json.loads(line).get("method") for line in log.read_text().splitlines()]
    assert methods[:2] == ["initialize", "notifications/initialized"]
    with pytest.raises(UpstreamError, match="closed"):
        await call(upstream, "echo", text="late")


@pytest_twisted.ensureDeferred
async def test_close_escalates_to_sigterm_and_sigkill(upstreams: Any) -> None:
    stubborn: StdioUpstream = upstreams("stubborn", sys.executable,
                                        [str(RAW), "--ignore-eof", "--ignore-term"])
    polite: StdioUpstream = upstreams("polite", sys.executable, [str(RAW), "--ignore-eof"])
    await defer.gatherResults([defer.ensureDeferred(stubborn.start()),
                               defer.ensureDeferred(polite.start())])
    pids = [stubborn.pid, polite.pid]
    started = time.monotonic()
    polite_closed = defer.ensureDeferred(polite.close())
    await stubborn.close()
    took = time.monotonic() - started
    assert 3.9 < took < 5.0  # 2 s after closing stdin, 2 s after SIGTERM, then SIGKILL
    assert polite_closed.called  # SIGTERM after 2 s was enough
    assert not any(alive(pid) for pid in pids if pid is not None)


SIGKILLED_OWNER = """
import sys
from twisted.internet import defer, reactor
from director.mcp.upstream import stdio
from director.mcp.upstream.account import stdio_account
from director.sandbox import chain

if sys.argv[2] == "python":
    chain.SETPRIV = "/nonexistent/setpriv"

async def main():
    upstream = stdio.StdioUpstream("raw", sys.executable, [sys.argv[1], "--ignore-eof"], {},
                                   None, reactor, account=stdio_account("nobody"))
    await upstream.start()
    grandchild = await upstream.request("tools/call", {"name": "grandchild", "arguments": {}})
    print(upstream.pid, grandchild["content"][0]["text"], flush=True)

reactor.callWhenRunning(lambda: defer.ensureDeferred(main()))
reactor.run()
"""


@pytest.mark.parametrize("launcher", ["setpriv", "python"])
def test_sigkilled_owner_takes_its_child_along(launcher: str) -> None:
    owner = subprocess.Popen([sys.executable, "-c", SIGKILLED_OWNER, str(RAW), launcher],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        child, grandchild = (int(pid) for pid in owner.stdout.readline().split())
        assert alive(child) and alive(grandchild)
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 2
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(child), "the stdio server outlived its SIGKILLed owner"
    # Documented limit: only the direct child gets the death signal. This grandchild ignores
    # stdin and stdout, so nothing tells it; tidy up after it.
    if alive(grandchild):
        os.kill(grandchild, signal.SIGKILL)


@pytest.mark.parametrize("launcher", ["setpriv", "python"])
def test_launchers(launcher: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Own session and group, the working directory, no ignored signals, and no exec at all
    when the parent that launched it is already gone."""
    if launcher == "python":
        monkeypatch.setattr(chain, "SETPRIV", "/nonexistent/setpriv")
    probe = "echo $$ $(cut -d' ' -f5,6 /proc/$$/stat); pwd; grep SigIgn /proc/$$/status"
    argv = stdio.launch_argv("/bin/sh", ["-c", probe], str(tmp_path))
    assert (argv[0] == chain.SETSID) == (launcher == "setpriv")
    started = time.monotonic()
    lines = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()
    took = time.monotonic() - started
    pid, group, session = lines[0].split()
    assert pid == group == session
    assert lines[1] == str(tmp_path)
    # The launch itself ignores nothing; what the test process inherited ignored (a CI
    # runner or a background shell may ignore a real-time signal) is not the launcher's doing.
    inherited = next(line for line in Path("/proc/self/status").read_text().splitlines()
                     if line.startswith("SigIgn:")).split()[1]
    assert lines[2].split()[0] == "SigIgn:"
    assert int(lines[2].split()[1], 16) & ~int(inherited, 16) == 0
    print(f"{launcher}: launched in {took * 1000:.1f} ms")

    marker = tmp_path / "ran"
    orphan = [str(1) if arg == str(os.getpid()) else arg
              for arg in stdio.launch_argv("/usr/bin/touch", [str(marker)], None)]
    assert subprocess.run(orphan, check=False).returncode == 1
    assert not marker.exists()


def identity_of(pid: int) -> dict[str, list[str]]:
    """The Uid, Gid (real, effective, saved, filesystem) and Groups lines of a process."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            fields[key] = value.split()
    return fields


@pytest.mark.parametrize("launcher", ["setpriv", "python"])
@pytest_twisted.ensureDeferred
async def test_a_root_owner_runs_children_as_the_stdio_account(
        launcher: str, upstreams: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """As root: nobody's uid and gid, no supplementary groups, a HOME of its own (0700);
    as anyone else: the owner's own identity, as before."""
    if launcher == "python":
        monkeypatch.setattr(chain, "SETPRIV", "/nonexistent/setpriv")
    upstream: StdioUpstream = upstreams("raw", sys.executable, [str(RAW)])
    await upstream.start()
    pid = int(text_of(await call(upstream, "pid")))
    environment = json.loads(text_of(await call(upstream, "env")))
    if os.geteuid() != 0:
        assert identity_of(pid)["Uid"] == [str(os.getuid())] * 4
        return
    nobody = pwd.getpwnam("nobody")
    assert identity_of(pid) == {"Uid": [str(nobody.pw_uid)] * 4,
                                "Gid": [str(nobody.pw_gid)] * 4, "Groups": []}
    assert environment["HOME"] == f"/var/tmp/director-stdio-{nobody.pw_uid}"
    assert environment["USER"] == environment["LOGNAME"] == "nobody"
    home = os.lstat(environment["HOME"])
    assert stat.S_ISDIR(home.st_mode) and home.st_uid == nobody.pw_uid
    assert stat.S_IMODE(home.st_mode) == 0o700
    # That the parent-death signal survives the change of identity (the kernel clears it
    # when credentials change): test_sigkilled_owner_takes_its_child_along, which runs its
    # child as this account too.


@pytest_twisted.ensureDeferred
async def test_a_working_directory_the_account_cannot_enter_fails_that_server(
        upstreams: Any) -> None:
    upstream: StdioUpstream = upstreams("walled", sys.executable, [str(RAW)], cwd="/root")
    with pytest.raises(UpstreamError) as refused:
        await upstream.start()
    assert str(refused.value).startswith("[walled] failed to run")
    assert str(refused.value).endswith("cd: can't cd to /root")


@pytest_twisted.ensureDeferred
async def test_a_root_owner_never_runs_a_child_as_root(upstreams: Any) -> None:
    upstream: StdioUpstream = upstreams("raw", sys.executable, [str(RAW)], account=None)
    if os.geteuid() != 0:
        await upstream.start()  # not root: the owner's own identity, as before
        return
    with pytest.raises(UpstreamError, match=r"refusing to run a stdio server as root"):
        await upstream.start()


def test_the_home_directory_is_never_a_symlink_or_someone_elses(
        monkeypatch: pytest.MonkeyPatch) -> None:
    parent = make_temp_dir("director-test-home-", 0o1777)
    monkeypatch.setattr(account_module, "HOME_PARENT", str(parent))
    uid = 65533 if os.geteuid() == 0 else os.getuid()  # root may give it to anyone
    account = account_module.StdioAccount("someone", uid, uid if os.geteuid() == 0 else
                                          os.getgid())
    home = Path(account.home)
    try:
        home.symlink_to("/etc")
        with pytest.raises(account_module.AccountError, match="it is a symlink"):
            account_module.prepare_home(account)
        home.unlink()
        if os.geteuid() == 0:
            home.mkdir()  # root's
            with pytest.raises(account_module.AccountError, match="belongs to uid 0"):
                account_module.prepare_home(account)
            home.rmdir()
        assert account_module.prepare_home(account) == str(home)
        info = home.lstat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (uid, 0o700)
        home.chmod(0o755)
        account_module.prepare_home(account)  # the account's own: mode put back
        assert stat.S_IMODE(home.lstat().st_mode) == 0o700
    finally:
        shutil.rmtree(parent, ignore_errors=True)


# --- protocol eras -----------------------------------------------------------------------------


def received(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest_twisted.ensureDeferred
async def test_a_modern_only_server_is_found_after_initialize_is_refused(
        upstreams: Any, shared_dir: Path) -> None:
    log = shared_dir / "received.jsonl"
    upstream: StdioUpstream = upstreams("modern", sys.executable, [str(RAW), "--modern-only"],
                                        {"RAW_LOG": str(log)})
    await upstream.start()
    assert upstream.era == "modern"
    assert upstream.initialize_result["serverInfo"] == {"name": "raw-modern", "version": "1"}
    assert text_of(await call(upstream, "echo", text="now")) == "now"
    methods = [message.get("method") for message in received(log)]
    assert methods[:2] == ["initialize", "server/discover"], methods
    assert "notifications/initialized" not in methods
    sent = next(m for m in received(log) if m.get("method") == "tools/call")
    meta = sent["params"]["_meta"]
    assert meta["io.modelcontextprotocol/protocolVersion"] == "2026-07-28"
    assert "io.modelcontextprotocol/clientCapabilities" in meta
    # logging/setLevel does not exist in this era: the level rides on later requests.
    assert await upstream.request("logging/setLevel", {"level": "debug"}) == {}
    await call(upstream, "echo", text="again")
    last = [m for m in received(log) if m.get("method") == "tools/call"][-1]
    assert last["params"]["_meta"]["io.modelcontextprotocol/logLevel"] == "debug"
    assert "logging/setLevel" not in [m.get("method") for m in received(log)]


@pytest_twisted.ensureDeferred
async def test_a_handshake_only_server_is_probed_once_per_command_line(
        upstreams: Any, shared_dir: Path) -> None:
    log = shared_dir / "received.jsonl"
    arguments = [str(RAW), "--probe-once", str(shared_dir)]  # a command line of this test only
    eras = EraMemory(reactor)  # the service's, shared by its sessions
    first: StdioUpstream = upstreams("legacy", sys.executable, arguments,
                                     {"RAW_LOG": str(log)}, prefer_modern=True, eras=eras)
    await first.start()
    assert first.era == "legacy"
    assert text_of(await call(first, "echo", text="x")) == "x"
    assert [m.get("method") for m in received(log)][:2] == ["server/discover", "initialize"]
    assert eras.verdict(stdio_key(sys.executable, arguments, None)) is False
    log.unlink()
    second: StdioUpstream = upstreams("legacy", sys.executable, arguments,
                                      {"RAW_LOG": str(log)}, prefer_modern=True, eras=eras)
    await second.start()
    assert second.era == "legacy"
    assert received(log)[0].get("method") == "initialize"


@pytest_twisted.ensureDeferred
async def test_a_server_that_stops_reading_gets_no_unbounded_backlog(upstreams: Any) -> None:
    upstream: StdioUpstream = upstreams("raw", sys.executable, [str(RAW)], max_line=1 << 20)
    await upstream.start()
    assert text_of(await call(upstream, "deaf", seconds=30)) == "not listening"
    big = "x" * (256 * 1024)
    sent: list[defer.Deferred[dict[str, Any]]] = []
    refused: UpstreamError | None = None
    for _ in range(64):  # 16 MiB if nothing stopped it
        request = defer.ensureDeferred(upstream.request(
            "tools/call", {"name": "echo", "arguments": {"text": big}}, timeout=30))
        if request.called:  # failed at once
            try:
                await request
            except UpstreamError as failure:
                refused = failure
                break
        sent.append(request)
        await sleep(0)  # let the reactor write what it can
    assert refused is not None and "not reading its input" in str(refused), refused
    assert len(sent) < 16, len(sent)  # about the pipe's buffer and 1 MiB more, not 16 MiB
    for request in sent:
        request.cancel()
        with contextlib.suppress(Exception):
            await request
