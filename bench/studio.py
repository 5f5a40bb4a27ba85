"""The Studio: the server's time to render a big playbook page, what a page weighs, and the
time from "add server" (the form) to the server's tools on the page.

* Render: one playbook of 50 stdio servers (``bench/tools_server.py``, 10 tools each: 500
  tools), listed once; then ``renders`` GETs of its page, each timed by the daemon itself
  (its ``Server-Timing: app;dur=…`` header: from the request's arrival to the rendered body,
  so loopback and the client's parsing are not in it). The client's wall time is in details,
  next to the same playbook read as JSON from the API in the same run (the baseline).
* Weight: that page's HTML plus the stylesheet, script and icon it loads, as sent (the HTML
  uncompressed, the static files gzipped, which the daemon does) and as nginx would gzip the
  HTML (level 6); the playbook list of a new account too, the smallest page.
* Add → tools listed: ``adds`` times, the add-server form POSTed (an echo server over stdio,
  a new name each time) and the playbook page fetched after its redirect, as a browser
  without JavaScript does: timed from the POST sent to that page received showing the new
  server's tool. The page waits (at most 3 s) for the listing when it is not done yet.
  The server is removed (API) between rounds.
"""

from __future__ import annotations

import gzip
import http.client
import json
import re
import statistics
import sys
import time
import urllib.parse
from pathlib import Path

from bench import api
from bench.daemon import start_director
from bench.loadgen import percentile
from bench.probe import HOST, free_port
from bench.reaper import Reaper
from bench.report import Figure

TOOLS_SERVER = Path(__file__).resolve().parent / "tools_server.py"
SERVERS, TOOLS_EACH = 50, 10
_TIMING = re.compile(r"app;dur=([0-9.]+)")
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


class Browser:
    """A cookie session on the Studio over one keep-alive connection."""

    def __init__(self, port: int, cookie: str) -> None:
        self.port = port
        self.cookie = cookie
        self.connection = http.client.HTTPConnection(HOST, port, timeout=60)

    def get(self, path: str, gzip_ok: bool = False) -> tuple[int, dict[str, str], bytes]:
        headers = {"cookie": self.cookie}
        if gzip_ok:
            headers["accept-encoding"] = "gzip"
        self.connection.request("GET", path, headers=headers)
        response = self.connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()

    def post_form(self, path: str, fields: list[tuple[str, str]]) -> int:
        body = urllib.parse.urlencode(fields).encode()
        self.connection.request("POST", path, body=body, headers={
            "cookie": self.cookie, "origin": f"http://{HOST}:{self.port}",
            "content-type": "application/x-www-form-urlencoded"})
        response = self.connection.getresponse()
        response.read()
        return response.status


def _sign_in(port: int) -> tuple[api.Client, Browser]:
    client = api.sign_up(port, "studio")
    me = client.request("GET", "/api/v1/me")
    connection = http.client.HTTPConnection(HOST, port, timeout=30)
    connection.request("POST", "/api/v1/auth/login", body=json.dumps(
        {"email": me["email"], "password": "bench-password-1234"}).encode(),
        headers={"content-type": "application/json"})
    response = connection.getresponse()
    response.read()
    cookie = response.getheader("set-cookie", "").split(";")[0]
    connection.close()
    return client, Browser(port, cookie)


def _wait_listed(browser: Browser, path: str, tools: int, timeout: float = 120.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        _, _, body = browser.get(path)
        if b'data-complete="true"' in body and body.count(b'name="listed"') >= tools:
            return body
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path}: the tools were not all listed in {timeout:.0f} s")
        time.sleep(0.2)


def _render(browser: Browser, path: str, renders: int) -> tuple[list[float], list[float]]:
    server, wall = [], []
    for _ in range(renders):
        started = time.perf_counter()
        status, headers, _ = browser.get(path)
        wall.append((time.perf_counter() - started) * 1000)
        found = _TIMING.search(headers.get("server-timing", ""))
        if status != 200 or found is None:
            raise RuntimeError(f"{path}: {status}, no Server-Timing")
        server.append(float(found[1]))
    return server, wall


def _api_reads(client: api.Client, playbook: str, reads: int) -> list[float]:
    """The baseline: the same playbook as JSON from ``/api/v1`` (no tools: the API has no
    tool list), client wall time on the same keep-alive connection pattern."""
    times = []
    for _ in range(reads):
        started = time.perf_counter()
        client.request("GET", f"/api/v1/playbooks/{playbook}")
        times.append((time.perf_counter() - started) * 1000)
    return times


def _weight(browser: Browser, html: bytes) -> dict[str, int]:
    assets = sorted(set(re.findall(rb'(?:href|src)="(/studio/static/[^"]+)"', html)))
    plain = gzipped = 0
    for asset in assets:
        status, _, body = browser.get(asset.decode())
        _, headers, packed = browser.get(asset.decode(), gzip_ok=True)
        assert status == 200 and headers.get("content-encoding") == "gzip"
        plain += len(body)
        gzipped += len(packed)
    return {"html": len(html), "html_gzip": len(gzip.compress(html, 6)), "assets": plain,
            "assets_gzip": gzipped}


def _add_then_listed(client: api.Client, browser: Browser, playbook: str,
                     adds: int) -> list[float]:
    base = f"/studio/playbooks/{playbook}"
    samples = []
    for index in range(adds):
        name = f"added{index}"
        _, _, form = browser.get(f"{base}/servers/new?type=stdio")
        token = _CSRF.search(form.decode())
        version = re.search(rb'name="version" value="(\d+)"', form)
        assert token is not None and version is not None
        fields = [("csrf_token", token[1]), ("version", version[1].decode()), ("name", name),
                  ("type", "stdio"), ("command", sys.executable),
                  ("args", f"-I\n-S\n{api.ECHO_SERVER}"), ("timeout_seconds", "30")]
        started = time.perf_counter()
        status = browser.post_form(f"{base}/servers", fields)
        if status != 303:
            raise RuntimeError(f"adding a server: {status}")
        while True:
            _, _, page = browser.get(base)
            if f'id="f-expose-{name}-echo"'.encode() in page:
                break
            if time.perf_counter() - started > 30:
                raise RuntimeError(f"{name}'s tools never appeared on the page")
        samples.append((time.perf_counter() - started) * 1000)
        client.request("DELETE", f"/api/v1/playbooks/{playbook}/servers/{name}", expect=204)
    return samples


def studio_figures(reaper: Reaper, workdir: Path, database_url: str, renders: int,
                   adds: int) -> list[Figure]:
    port = free_port()
    start_director(reaper, port=port, state_directory=workdir / "state-studio",
                   log_path=workdir / "director-studio.log", database_url=database_url,
                   extra_env={"DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS": "true",
                              "API_KEY_RATE_LIMIT_MAX_REQUESTS": "1000000"})
    client, browser = _sign_in(port)
    _, _, small = browser.get("/studio/")
    big = api.create_playbook(client, "Studio bench")
    for index in range(SERVERS):
        client.request("POST", f"/api/v1/playbooks/{big}/servers", {
            "name": f"server{index:02d}", "type": "stdio", "command": sys.executable,
            "prefix": f"s{index:02d}_",
            "args": ["-I", "-S", str(TOOLS_SERVER), str(TOOLS_EACH)]}, expect=201)
    path = f"/studio/playbooks/{big}"
    html = _wait_listed(browser, path, SERVERS * TOOLS_EACH)
    server, wall = _render(browser, path, renders)
    api_wall = _api_reads(client, big, renders)
    weight = _weight(browser, html)
    little = api.create_playbook(client, "Studio adds")
    added = _add_then_listed(client, browser, little, adds)
    kib = 1024.0
    return [
        Figure("studio_render_p50", f"Studio: playbook page, {SERVERS} servers / "
               f"{SERVERS * TOOLS_EACH} tools, server time p50 ({renders} renders)", "ms",
               (percentile(sorted(server), 0.5),), baseline=f"client wall p50 "
               f"{statistics.median(wall):.1f} ms; GET /api/v1/playbooks/… (JSON, same 50 "
               f"servers) {statistics.median(api_wall):.1f} ms",
               details={"server_ms": server, "wall_ms": wall, "api_wall_ms": api_wall}),
        Figure("studio_render_p99", "  p99", "ms", (percentile(sorted(server), 0.99),),
               baseline=f"client wall p99 {percentile(sorted(wall), 0.99):.1f} ms"),
        Figure("studio_weight_big", "  page weight: HTML + CSS + JS + icon", "KiB",
               ((weight["html"] + weight["assets"]) / kib,),
               baseline=f"gzip {(weight['html_gzip'] + weight['assets_gzip']) / kib:.1f} KiB "
                        f"(HTML {weight['html'] / kib:.0f} KiB, gzip "
                        f"{weight['html_gzip'] / kib:.1f})", details=weight),
        Figure("studio_weight_small", "  page weight: an empty playbook list", "KiB",
               ((len(small) + weight["assets"]) / kib,),
               baseline=f"gzip {(len(gzip.compress(small, 6)) + weight['assets_gzip']) / kib:.1f}"
                        f" KiB (static files {weight['assets'] / kib:.1f} KiB, gzip "
                        f"{weight['assets_gzip'] / kib:.1f})"),
        Figure("studio_add_to_listed", f"  add server (form) → its tools on the page ({adds} "
               "adds)", "ms", tuple(added), baseline="stdio echo server, POST + redirect GET"),
    ]
