"""``director doctor``'s base-url-reach check: BASE_URL must lead to this Director as MCP
clients that sign in with OAuth reach it (the deployment guide's "OAuth redirects fail")."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.harness import Daemon, free_port, make_temp_dir
from tests.https_documents import DocumentSite
from tests.test_doctor import report

StartDaemon = Callable[..., Daemon]


@pytest.fixture
def impostor() -> Iterator[Callable[[int, dict[str, str], bytes], int]]:
    """A web server that is not Director, answering every GET as told; its port."""
    servers: list[ThreadingHTTPServer] = []

    def start(status: int, headers: dict[str, str], body: bytes) -> int:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return int(server.server_address[1])

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def reach(migrated_url: str, tmp_path: Any, base_url: str) -> dict[str, Any]:
    _, checks = report(DATABASE_URL=migrated_url, STATE_DIRECTORY=str(tmp_path / "state"),
                       PORT=str(free_port()), BASE_URL=base_url)
    return dict(checks["base-url-reach"])


def test_base_url_leading_to_this_director_is_ok(start_daemon: StartDaemon, migrated_url: str,
                                                 tmp_path: Any) -> None:
    daemon = start_daemon(DATABASE_URL=migrated_url)
    daemon.wait_healthy()
    check = reach(migrated_url, tmp_path, f"http://localhost:{daemon.port}")
    assert check["status"] == "ok", check
    assert "reaches Director" in check["summary"]


def test_a_director_with_another_base_url_fails(start_daemon: StartDaemon, migrated_url: str,
                                                tmp_path: Any) -> None:
    port = free_port()
    daemon = start_daemon(DATABASE_URL=migrated_url, PORT=str(port),
                          BASE_URL=f"http://127.0.0.1:{port}")
    daemon.wait_healthy()
    check = reach(migrated_url, tmp_path, f"http://localhost:{port}")
    assert check["status"] == "fail", check
    assert f"says its issuer is 'http://127.0.0.1:{port}'" in check["summary"]
    assert "same BASE_URL" in check["fix"]


def test_something_else_at_base_url_fails(impostor: Callable[..., int], migrated_url: str,
                                          tmp_path: Any) -> None:
    port = impostor(404, {"Content-Type": "text/html"}, b"<h1>Not found</h1>")
    check = reach(migrated_url, tmp_path, f"http://localhost:{port}")
    assert check["status"] == "fail", check
    assert "answered 404, not from Director" in check["summary"]
    assert "/.well-known/" in check["fix"]


def test_a_redirecting_base_url_fails(impostor: Callable[..., int], migrated_url: str,
                                      tmp_path: Any) -> None:
    port = impostor(301, {"Location": "https://director.example.com/"}, b"")
    check = reach(migrated_url, tmp_path, f"http://localhost:{port}")
    assert check["status"] == "fail", check
    assert "redirects (301) to https://director.example.com/" in check["summary"]


def test_an_unreachable_base_url_warns(migrated_url: str, tmp_path: Any) -> None:
    check = reach(migrated_url, tmp_path, f"http://localhost:{free_port()}")
    assert check["status"] == "warn", check
    assert "cannot be reached from this host" in check["summary"]


def test_a_certificate_this_host_does_not_trust_warns(migrated_url: str, tmp_path: Any) -> None:
    with DocumentSite(make_temp_dir("director-test-doctor-tls-")) as site:
        check = reach(migrated_url, tmp_path, f"https://localhost:{site.port}")
    assert check["status"] == "warn", check
    assert "TLS fails from this host" in check["summary"]
    assert "certificate" in check["fix"]
