"""The deployment guide's nginx configuration in front of real daemons, on loopback.

nginx comes from Debian (``apt-get install nginx-light``); without it every test here skips and
says so. Most tests run the guide's ``server`` block on a plain-HTTP loopback port (the proxying
is what is under test); one runs it as published, TLS and HTTP/2 included, with a self-signed
certificate and ``curl --http2`` (skipped without openssl or curl).

What the tests establish, and docs/manual.rst relies on:

* the guide's configuration passes ``nginx -t``, and its ``location /playbooks/`` block streams
  SSE unbuffered: the ``endpoint`` event arrives at once while the response stays open, an MCP
  exchange over the legacy transport and a Streamable HTTP ``initialize`` work through it, and
  the 15 s heartbeat comes through;
* ``/api/health`` answers through it, and ``proxy_set_header Host $host`` passes the client's
  Host, which the daemon's Host check accepts when it is BASE_URL's host (and refuses otherwise);
* the upstream's ``keepalive`` is used: requests through ``location /`` reach the daemon on one
  connection, which takes ``proxy_set_header Connection ""`` there (the guide lacks it);
* even a bare ``proxy_pass`` streams, because every stream carries ``X-Accel-Buffering: no``;
* nginx refuses bodies over 1 MB unless ``client_max_body_size`` says otherwise (Director's own
  limit is 4 MiB);
* the manual's ``log_format director`` keeps ``?key=dk_…`` (any spelling) out of the access
  log; nginx's error log still names the request line when the upstream fails;
* with several instances, no affinity is needed: handshake-era sessions and legacy ``/sse``
  sessions work under round robin, under hashing on ``$http_mcp_session_id`` and under hashing
  on the credential alike (any instance adopts a session, director.mcp.shared_sessions), and so
  do modern-era requests; tests/test_any_instance.py goes further (three instances, failover,
  rolling restarts).
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.accounts_helpers import Account, call, eventually, sign_up
from tests.harness import Daemon, free_port, make_temp_dir

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx-light); the "
                          "deployment guide's proxy configuration is untested here")

StartDaemon = Callable[..., Daemon]
SERVER_NAME = "director.test"
ACCEPT = "application/json, text/event-stream"
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "nginx-test", "version": "1"}}}
MODERN = "2026-07-28"
MODERN_META = {"io.modelcontextprotocol/protocolVersion": MODERN,
               "io.modelcontextprotocol/clientCapabilities": {},
               "io.modelcontextprotocol/clientInfo": {"name": "nginx-test", "version": "1"}}

#: The guide's configuration with ``proxy_set_header Connection ""`` added to ``location /``, as
#: docs/manual.rst shows it (test_the_manual_shows_this_configuration). The tests change only
#: the addresses: the upstream's server lines, the listening port, the names and certificates.
GUIDE_UPSTREAM = """upstream director {
    server 127.0.0.1:3673;
    keepalive 32;
}
"""
#: Not in the guide: docs/manual.rst adds it, so that ?key=dk_… never reaches nginx's log.
GUIDE_LOG_FORMAT = """# Director's MCP routes accept an API key as ?key=dk_… (for clients that cannot send
# headers): log the path ($uri), never the request line, $request_uri or $args, which hold
# the query string, nor the Referer, which is a URL too.
log_format director '$remote_addr [$time_local] "$request_method $uri $server_protocol" '
                    '$status $body_bytes_sent "$http_user_agent" $request_time';
"""
GUIDE_SERVER = """server {
    listen 443 ssl http2;
    server_name director.example.com;
    access_log /var/log/nginx/director.access.log director;

    ssl_certificate /path/to/cert.pem;
    ssl_certificate_key /path/to/key.pem;

    # SSE requires special handling
    location /playbooks/ {
        proxy_pass http://director;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;

        # SSE-specific: disable buffering
        proxy_buffering off;
        proxy_cache off;
        proxy_read_timeout 86400s;
    }

    location / {
        proxy_pass http://director;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
    }
}
"""
MANUAL = Path(__file__).resolve().parent.parent / "docs" / "manual.rst"


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, f"{old!r} is no longer in the guide's text"
    return text.replace(old, new)


def upstream(ports: list[int], balance: str = "", name: str = "director") -> str:
    """The guide's ``upstream`` block for these ports; a balancing method goes before
    ``keepalive`` (nginx requires that order)."""
    servers = "".join(f"    server 127.0.0.1:{port};\n" for port in ports)
    method = f"    {balance}\n" if balance else ""
    block = _replace(GUIDE_UPSTREAM, "    server 127.0.0.1:3673;\n", method + servers)
    return _replace(block, "upstream director", f"upstream {name}")


def server(port: int, *, tls: tuple[Path, Path] | None = None, upstream_name: str = "director",
           locations: str | None = None) -> str:
    """The guide's ``server`` block on a loopback port: with TLS (and HTTP/2) when given a
    certificate and key, plain HTTP otherwise."""
    block = _replace(GUIDE_SERVER, "server_name director.example.com;",
                     f"server_name {SERVER_NAME};")
    if tls is None:
        block = _replace(block, "    listen 443 ssl http2;", f"    listen 127.0.0.1:{port};")
        block = _replace(block, "    ssl_certificate /path/to/cert.pem;\n", "")
        block = _replace(block, "    ssl_certificate_key /path/to/key.pem;\n", "")
    else:
        block = _replace(block, "    listen 443 ssl http2;",
                         f"    listen 127.0.0.1:{port} ssl http2;")
        block = _replace(block, "/path/to/cert.pem", str(tls[0]))
        block = _replace(block, "/path/to/key.pem", str(tls[1]))
    if locations is not None:
        head, _, _ = block.partition("    # SSE requires special handling")
        block = head + locations + "}\n"
    # A path relative to nginx's prefix: each test's own directory (see Nginx).
    block = _replace(block, "/var/log/nginx/director.access.log", "director.access.log")
    return block.replace("http://director;", f"http://{upstream_name};")


class Nginx:
    """One nginx master in the foreground with a configuration of the test's own."""

    def __init__(self, http_block: str) -> None:
        assert NGINX is not None
        self.work = make_temp_dir("director-test-nginx-")
        w = self.work
        self.config = w / "nginx.conf"
        self.config.write_text(
            f"pid {w}/nginx.pid;\nerror_log {w}/error.log info;\nworker_processes 1;\n"
            "events { worker_connections 1024; }\n"
            f"http {{\naccess_log {w}/access.log;\nclient_body_temp_path {w}/body;\n"
            f"proxy_temp_path {w}/proxy;\nfastcgi_temp_path {w}/fastcgi;\n"
            f"uwsgi_temp_path {w}/uwsgi;\nscgi_temp_path {w}/scgi;\n{GUIDE_LOG_FORMAT}"
            f"{http_block}}}\n")
        checked = subprocess.run([NGINX, "-t", "-p", str(w), "-c", str(self.config)],
                                 capture_output=True, text=True, timeout=30, check=False)
        assert checked.returncode == 0, checked.stderr
        self.process = subprocess.Popen(
            [NGINX, "-p", str(w), "-c", str(self.config), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_listening(self, port: int) -> None:
        def listening() -> bool:
            assert self.process.poll() is None, self.error_log()
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0
        eventually(listening, timeout=10)

    def error_log(self) -> str:
        try:
            return (self.work / "error.log").read_text()
        except OSError:
            return "(no error log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.work, ignore_errors=True)


@pytest.fixture
def nginx() -> Iterator[Callable[[str], Nginx]]:
    started: list[Nginx] = []

    def start(http_block: str) -> Nginx:
        proxy = Nginx(http_block)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


class Through:
    """Requests to a daemon through the proxy, as a client of BASE_URL sends them; duck-types
    ``Daemon.request`` for ``tests.accounts_helpers``."""

    def __init__(self, port: int, host: str = SERVER_NAME) -> None:
        self.port = port
        self.host = host

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path, body=body,
                               headers={"Host": f"{self.host}:{self.port}", **(headers or {})})
            response = connection.getresponse()
            return (response.status, {k.lower(): v for k, v in response.getheaders()},
                    response.read())
        finally:
            connection.close()

    def stream(self, path: str) -> EventStream:
        return EventStream(self.port, self.host, path)


class EventStream:
    """A GET answered with text/event-stream, read event by event while it stays open."""

    def __init__(self, port: int, host: str, path: str) -> None:
        self.opened = time.monotonic()
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        self.connection.request("GET", path, headers={"Host": f"{host}:{port}",
                                                      "Accept": "text/event-stream"})
        self.response = self.connection.getresponse()
        self.headers = {k.lower(): v for k, v in self.response.getheaders()}

    def next_event(self) -> dict[str, Any]:
        """The next event or comment: ``{"event", "data", "comment", "at"}``."""
        event: dict[str, Any] = {"event": "message", "data": [], "comment": None}
        while True:
            line = self.response.readline()
            if not line:
                raise AssertionError("the stream ended")
            text = line.decode().rstrip("\r\n")
            if text.startswith(":"):
                return {"comment": text[1:].strip(), "at": time.monotonic() - self.opened}
            if text == "":
                if event["data"]:
                    event["data"] = "\n".join(event["data"])
                    event["at"] = time.monotonic() - self.opened
                    return event
                continue
            field, _, value = text.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event["event"] = value
            elif field == "data":
                event["data"].append(value)

    def next_data_event(self) -> dict[str, Any]:
        while True:
            event = self.next_event()
            if event.get("comment") is None:
                return event

    def close(self) -> None:
        self.connection.close()


def playbook_for(client: Any, email: str) -> tuple[Account, str]:
    owner = sign_up(client, email)
    status, _, body = call(client, "POST", "/api/v1/playbooks", {"name": "Proxied"},
                           key=owner.key)
    assert status == 201, body
    return owner, str(body["id"])


def post_mcp(client: Any, playbook: str, key: str, message: dict[str, Any],
             session: str | None = None, modern: bool = False) -> tuple[int, dict[str, str], bytes]:
    headers = {"content-type": "application/json", "accept": ACCEPT, "x-api-key": key}
    if session is not None:
        headers["mcp-session-id"] = session
        headers["mcp-protocol-version"] = str(INIT["params"]["protocolVersion"])  # type: ignore[index]
    if modern:
        headers["mcp-protocol-version"] = MODERN
        headers["mcp-method"] = message["method"]
        message = {**message, "params": {**message.get("params", {}), "_meta": MODERN_META}}
    status, response_headers, body = client.request(
        "POST", f"/playbooks/{playbook}/mcp", json.dumps(message).encode(), headers)
    return status, response_headers, body


def test_the_manual_shows_this_configuration() -> None:
    """The manual's block has the ``upstream`` and ``location`` blocks the tests run."""
    manual = MANUAL.read_text()
    blocks = [GUIDE_UPSTREAM, *re.findall(r"^    location .*?^    }\n", GUIDE_SERVER, re.M | re.S)]
    assert len(blocks) == 3
    for block in blocks:
        shown = "".join(f"   {line}\n" if line else "\n" for line in block.splitlines())
        assert shown in manual, f"docs/manual.rst no longer shows:\n{block}"


def open_connections_accepted(port: int) -> frozenset[int]:
    """The peers' ports of the open (ESTABLISHED) TCP connections that the server on loopback
    ``port`` has accepted, from /proc/net/tcp."""
    peers = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        _, local, remote, state = line.split()[:4]
        if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
            peers.add(int(remote.rsplit(":", 1)[1], 16))
    return frozenset(peers)


def connections_per_request(client: Through, daemon_port: int, count: int = 10
                            ) -> list[frozenset[int]]:
    """After each of ``count`` requests through nginx (each from a new client connection), the
    connections open between nginx and the daemon."""
    seen = []
    for _ in range(count):
        status, _, body = client.request("GET", "/api/health")
        assert status == 200, body
        seen.append(open_connections_accepted(daemon_port))
    return seen


# --- one instance behind the guide's configuration --------------------------------------------


def test_upstream_keepalive_carries_every_request_on_one_connection(
        start_daemon: StartDaemon, migrated_url: str, nginx: Callable[[str], Nginx]) -> None:
    """``keepalive 32`` in the upstream keeps connections to the daemon open only for requests
    sent with HTTP/1.1 and no ``Connection: close``: ``location /`` needs
    ``proxy_set_header Connection ""`` as ``location /playbooks/`` has it. With it, ten requests
    arrive at the daemon on one connection; without it (the guide's block, run first as the
    control), each one opens and closes its own."""
    guide_port, manual_port = free_port(), free_port()
    daemon = start_daemon(DATABASE_URL=migrated_url, HOST="127.0.0.1",
                          BASE_URL=f"http://{SERVER_NAME}")
    guide = _replace(server(guide_port, upstream_name="guide"),
                     '        proxy_http_version 1.1;\n        proxy_set_header Connection "";\n'
                     '        proxy_set_header Host $host;\n        proxy_set_header X-Real-IP',
                     "        proxy_http_version 1.1;\n        proxy_set_header Host $host;\n"
                     "        proxy_set_header X-Real-IP")
    proxy = nginx(upstream([daemon.port], name="guide") + guide + upstream([daemon.port])
                  + server(manual_port))
    daemon.wait_healthy()
    proxy.wait_listening(guide_port)
    proxy.wait_listening(manual_port)

    closed = connections_per_request(Through(guide_port), daemon.port)
    assert not (len(set(closed)) == 1 and len(closed[0]) == 1), closed
    eventually(lambda: open_connections_accepted(daemon.port) == frozenset(), timeout=10)

    kept = connections_per_request(Through(manual_port), daemon.port)
    assert len(kept[0]) == 1 and kept == [kept[0]] * len(kept), kept


def behind_the_guide(start_daemon: StartDaemon, migrated_url: str,
                     nginx: Callable[[str], Nginx]) -> tuple[Daemon, Nginx, Through]:
    """One daemon behind the guide's configuration (BASE_URL: the proxy's name), both ready."""
    port = free_port()
    daemon = start_daemon(DATABASE_URL=migrated_url, HOST="127.0.0.1",
                          BASE_URL=f"http://{SERVER_NAME}:{port}")
    proxy = nginx(upstream([daemon.port]) + server(port))
    daemon.wait_healthy()
    proxy.wait_listening(port)
    return daemon, proxy, Through(port)


def test_guide_configuration_streams_sse_and_passes_host(
        start_daemon: StartDaemon, migrated_url: str,
        nginx: Callable[[str], Nginx]) -> None:
    _, _, client = behind_the_guide(start_daemon, migrated_url, nginx)
    port = client.port

    status, _, body = client.request("GET", "/api/health")
    assert (status, json.loads(body)) == (200, {"status": "ok"})

    # Sign-up, the playbook and the stream all go through the proxy, under BASE_URL's host.
    owner, playbook = playbook_for(client, "nginx@example.com")

    stream = client.stream(f"/playbooks/{playbook}/sse?key={owner.key}")
    try:
        assert stream.response.status == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        endpoint = stream.next_data_event()
        # At once, and while the response is still open: nginx did not hold it back.
        assert endpoint["event"] == "endpoint" and endpoint["at"] < 2.0, endpoint
        assert endpoint["data"].startswith(f"/playbooks/{playbook}/message?sessionId=")
        assert not stream.response.isclosed()

        # The client's messages go through the proxy too; answers come on the open stream.
        status, _, _ = client.request("POST", endpoint["data"], json.dumps(INIT).encode(),
                                      {"content-type": "application/json"})
        assert status == 202
        answer = stream.next_data_event()
        assert answer["event"] == "message"
        assert json.loads(answer["data"])["result"]["serverInfo"]

        # Streamable HTTP through the same location.
        status, headers, body = post_mcp(client, playbook, owner.key, INIT)
        assert status == 200, body
        assert headers.get("mcp-session-id")

        # The Host header is passed on (`proxy_set_header Host $host`): BASE_URL's host is
        # accepted, another name reaching the same nginx is refused by the daemon.
        status, _, body = call(client, "GET", "/api/v1/me", key=owner.key)
        assert status == 200, body
        status, _, body = call(Through(port, "evil.example"), "GET", "/api/v1/me",
                               key=owner.key)
        assert status == 403 and body["error"]["code"] == "host_not_allowed", body
        status, _, body = Through(port, "evil.example").request(
            "GET", f"/playbooks/{playbook}/sse?key={owner.key}")
        assert status == 403, body

        # The 15 s heartbeat passes, unbuffered, and the stream outlives it.
        heartbeat = stream.next_event()
        assert heartbeat.get("comment") is not None and heartbeat["at"] < 17, heartbeat
        assert not stream.response.isclosed()
    finally:
        stream.close()


def test_guide_server_block_with_tls_and_http2(start_daemon: StartDaemon, migrated_url: str,
                                               nginx: Callable[[str], Nginx]) -> None:
    """The guide's block as published (``listen ... ssl http2`` and certificates), a client on
    HTTP/2 over TLS: the stream's first event arrives while it stays open."""
    if shutil.which("openssl") is None or shutil.which("curl") is None:
        pytest.skip("openssl and curl are needed for the TLS variant")
    port = free_port()
    work = make_temp_dir("director-test-tls-")
    try:
        certificate, key = work / "cert.pem", work / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-keyout", str(key), "-out", str(certificate),
                        "-subj", f"/CN={SERVER_NAME}", "-addext",
                        f"subjectAltName=DNS:{SERVER_NAME}"],
                       capture_output=True, check=True, timeout=60)
        key.chmod(0o644)  # nginx's workers read it as nobody when the suite runs as root
        daemon = start_daemon(DATABASE_URL=migrated_url, HOST="127.0.0.1",
                              BASE_URL=f"https://{SERVER_NAME}:{port}")
        proxy = nginx(upstream([daemon.port]) + server(port, tls=(certificate, key)))
        daemon.wait_healthy()
        proxy.wait_listening(port)
        owner, playbook = playbook_for(daemon, "tls@example.com")
        curl = ["curl", "-sS", "-N", "--http2", "--cacert", str(certificate),
                "--resolve", f"{SERVER_NAME}:{port}:127.0.0.1", "-w", "\n%{http_version}"]
        health = subprocess.run([*curl, f"https://{SERVER_NAME}:{port}/api/health"],
                                capture_output=True, text=True, timeout=30, check=False)
        assert health.stdout.splitlines() == ['{"status": "ok"}', "2"], health
        # curl -N https://director.example.com/playbooks/{id}/sse, the guide's own test; the
        # stream stays open, so curl is stopped after 3 s (exit 28) with the event in hand.
        started = time.monotonic()
        stream = subprocess.run([*curl, "--max-time", "3",
                                 f"https://{SERVER_NAME}:{port}/playbooks/{playbook}/sse"
                                 f"?key={owner.key}"],
                                capture_output=True, text=True, timeout=30, check=False)
        assert stream.returncode == 28, stream
        assert time.monotonic() - started >= 3
        assert stream.stdout.startswith("event: endpoint\ndata: /playbooks/"), stream.stdout
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_bare_proxy_pass_streams_too(start_daemon: StartDaemon, migrated_url: str,
                                     nginx: Callable[[str], Nginx]) -> None:
    """``X-Accel-Buffering: no`` on every stream: nginx's default buffering does not apply."""
    port = free_port()
    daemon = start_daemon(DATABASE_URL=migrated_url, HOST="127.0.0.1",
                          BASE_URL=f"http://{SERVER_NAME}:{port}")
    bare = """
    location / {
        proxy_pass http://director;
        proxy_set_header Host $host;
    }
"""
    proxy = nginx(upstream([daemon.port]) + server(port, locations=bare))
    daemon.wait_healthy()
    proxy.wait_listening(port)
    client = Through(port)
    owner, playbook = playbook_for(client, "bare@example.com")
    stream = client.stream(f"/playbooks/{playbook}/sse?key={owner.key}")
    try:
        assert stream.headers.get("x-accel-buffering") is None  # nginx consumes it
        endpoint = stream.next_data_event()
        assert endpoint["event"] == "endpoint" and endpoint["at"] < 2.0, endpoint
        assert not stream.response.isclosed()
    finally:
        stream.close()


def test_bodies_over_1_mb_need_client_max_body_size(
        start_daemon: StartDaemon, migrated_url: str, nginx: Callable[[str], Nginx]) -> None:
    """nginx refuses request bodies over 1 MB by default; Director takes MAX_REQUEST_BODY_BYTES
    (4 MiB): ``client_max_body_size 4m;`` in the server block lines them up."""
    guide, raised = free_port(), free_port()
    daemon = start_daemon(DATABASE_URL=migrated_url, HOST="127.0.0.1",
                          BASE_URL=f"http://{SERVER_NAME}")
    with_limit = _replace(server(raised), f"server_name {SERVER_NAME};\n",
                          f"server_name {SERVER_NAME};\n    client_max_body_size 4m;\n")
    proxy = nginx(upstream([daemon.port]) + server(guide) + with_limit)
    daemon.wait_healthy()
    proxy.wait_listening(guide)
    proxy.wait_listening(raised)
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": "x", "arguments": {"blob": "a" * 2_000_000}}}).encode()
    headers = {"content-type": "application/json", "accept": ACCEPT}
    status, response_headers, _ = Through(guide).request("POST", "/playbooks/any/mcp", body,
                                                         headers)
    assert status == 413 and "x-trace-id" not in response_headers  # nginx's own answer
    status, response_headers, answer = Through(raised).request("POST", "/playbooks/any/mcp",
                                                               body, headers)
    assert status == 401 and "x-trace-id" in response_headers, answer  # Director's: no key


def test_guide_log_format_keeps_api_keys_out_of_the_access_log(
        start_daemon: StartDaemon, migrated_url: str, nginx: Callable[[str], Nginx]) -> None:
    """The manual's ``log_format director`` logs the path alone: no spelling of ``?key=``
    reaches the access log. The error log is another matter: when the upstream fails, nginx
    names the whole request line there, query string included (the manual says so)."""
    daemon, proxy, client = behind_the_guide(start_daemon, migrated_url, nginx)
    owner, playbook = playbook_for(client, "nginx-logs@example.com")
    headers = {"content-type": "application/json", "accept": ACCEPT}
    for query in (f"key={owner.key}", f"%6Bey={owner.key}", f"x=1;KEY=+{owner.key}"):
        status, _, body = client.request("POST", f"/playbooks/{playbook}/mcp?{query}",
                                         json.dumps(INIT).encode(), headers)
        assert status == 200, body
    access = proxy.work / "director.access.log"
    line = f'"POST /playbooks/{playbook}/mcp HTTP/1.1" 200'
    eventually(lambda: access.read_text().count(line) == 3)
    assert owner.key[3:] not in access.read_text()

    assert daemon.terminate() == 0
    status, _, _ = client.request("POST", f"/playbooks/{playbook}/mcp?key={owner.key}",
                                  json.dumps(INIT).encode(), headers)
    assert status == 502
    eventually(lambda: f"/mcp?key={owner.key} HTTP/1.1" in proxy.error_log())
    assert owner.key[3:] not in access.read_text()


# --- several instances behind one nginx --------------------------------------------------------


def handshake_sessions(client: Through, playbook: str, key: str, count: int) -> list[int]:
    """Open ``count`` handshake-era sessions; the statuses of each one's follow-ups
    (``notifications/initialized``, then ``tools/list``)."""
    outcomes = []
    for number in range(count):
        status, headers, body = post_mcp(client, playbook, key, INIT)
        assert status == 200, body
        session = headers["mcp-session-id"]
        status, _, _ = post_mcp(client, playbook, key, {"jsonrpc": "2.0",
                                                        "method": "notifications/initialized"},
                                session)
        outcomes.append(status)
        status, _, _ = post_mcp(client, playbook, key, {"jsonrpc": "2.0", "id": 2 + number,
                                                        "method": "tools/list"}, session)
        outcomes.append(status)
    return outcomes


def test_several_instances_need_no_affinity(
        start_daemon: StartDaemon, migrated_url: str, nginx: Callable[[str], Nginx]) -> None:
    ports = {"round-robin": free_port(), "session-hash": free_port(), "credential-hash": free_port()}
    base = {"DATABASE_URL": migrated_url, "HOST": "127.0.0.1",
            "BASE_URL": f"http://{SERVER_NAME}"}
    daemons = [start_daemon(**base), start_daemon(**base)]
    blocks = ""
    for name, balance in (("round-robin", ""),
                          ("session-hash", "hash $http_mcp_session_id consistent;"),
                          ("credential-hash",
                           "hash $http_authorization$http_x_api_key$arg_key consistent;")):
        blocks += upstream([d.port for d in daemons], balance, name.replace("-", "_"))
        blocks += server(ports[name], upstream_name=name.replace("-", "_"))
    proxy = nginx(blocks)
    for daemon in daemons:
        daemon.wait_healthy()
    for port in ports.values():
        proxy.wait_listening(port)

    owner, playbook = playbook_for(daemons[0], "lb@example.com")

    def everywhere() -> bool:  # a change reaches the other instance by NOTIFY, in milliseconds
        return all(call(d, "GET", f"/api/v1/playbooks/{playbook}", key=owner.key)[0] == 200
                   for d in daemons)
    eventually(everywhere)

    # A session's next request lands on the other instance half the time: it is adopted there.
    # (Before issue 17, round robin and hashing on the session id alone lost sessions.)
    for name, count in (("round-robin", 6), ("session-hash", 10), ("credential-hash", 6)):
        outcomes = handshake_sessions(Through(ports[name]), playbook, owner.key, count)
        assert outcomes == [202, 200] * count, (name, outcomes)

    # The legacy transport too: each POST /message reaches the instance holding the stream.
    client = Through(ports["round-robin"])
    for _ in range(4):
        stream = client.stream(f"/playbooks/{playbook}/sse?key={owner.key}")
        try:
            endpoint = stream.next_data_event()
            status, _, _ = client.request("POST", endpoint["data"], json.dumps(INIT).encode(),
                                          {"content-type": "application/json"})
            assert status == 202
            assert json.loads(stream.next_data_event()["data"])["id"] == 1
        finally:
            stream.close()

    # Modern-era requests carry everything they need: any instance answers, no affinity.
    rr = Through(ports["round-robin"])
    for number in range(6):
        status, _, body = post_mcp(rr, playbook, owner.key,
                                   {"jsonrpc": "2.0", "id": number, "method": "tools/list"},
                                   modern=True)
        assert status == 200, body
