"""Checks of ``director doctor`` on the network: the port, the metrics and tracing endpoints,
``BASE_URL`` and whether it leads here.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import ipaddress
import json
import socket
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from director.cli import base
from director.cli.doctor.result import FAIL, OK, WARN, Result
from director.config import (
    Settings,
)


def _bind_error(host: str, port: int) -> OSError | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted's listenTCP
        try:
            probe.bind((host, port))
            probe.listen(1)
        except OSError as error:
            return error
    return None


def _health(host: str, port: int) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(host, port, timeout=3)
    try:
        connection.request("GET", "/api/health")
        response = connection.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read(4096))
    finally:
        connection.close()


def _ephemeral_ports() -> tuple[int, int] | None:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return None


def check_port(settings: Settings) -> Result:
    name = "port"
    host = "127.0.0.1" if settings.host == "localhost" else settings.host
    address = f"{settings.host}:{settings.port}"
    error = _bind_error(host, settings.port)
    if error is None:
        return Result(name, OK, f"{address} is free")
    if error.errno == errno.EACCES:
        return Result(name, FAIL, f"{address}: permission denied",
                      "ports below 1024 need privileges; keep PORT above 1024 and let the reverse "
                      "proxy listen on 443")
    if error.errno == errno.EADDRNOTAVAIL:
        return Result(name, FAIL, f"{address}: no such address on this host",
                      "set HOST to an address of this host, 127.0.0.1 or 0.0.0.0")
    if error.errno != errno.EADDRINUSE:
        return Result(name, FAIL, f"cannot listen on {address}: {error.strerror}", "")
    probe_host = host
    if ipaddress.ip_address(host).is_unspecified:
        probe_host = "::1" if ":" in host else "127.0.0.1"
    try:
        status, headers, body = _health(probe_host, settings.port)
    except ConnectionRefusedError:
        ephemeral = _ephemeral_ports()
        hint = ""
        if ephemeral and ephemeral[0] <= settings.port <= ephemeral[1]:
            hint = (f"; PORT is inside net.ipv4.ip_local_port_range ({ephemeral[0]}-"
                    f"{ephemeral[1]}), where the kernel picks outgoing connections' local ports: "
                    f"choose a port below {ephemeral[0]} (the default 3673 is)")
        return Result(name, FAIL, f"{address} is held by a socket that is not listening (an "
                                  "outgoing connection's local port, or one closing in TIME_WAIT)",
                      f"see it with: ss -tanp 'sport = :{settings.port}'{hint}")
    except (OSError, http.client.HTTPException) as failure:
        return Result(name, FAIL, f"{address} is in use, and /api/health does not answer "
                                  f"({base.one_line(failure)})",
                      f"find the process: ss -ltnp 'sport = :{settings.port}'; stop it or set "
                      "PORT to another port")
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or "x-trace-id" not in headers:
        return Result(name, FAIL, f"{address} is in use by something that is not Director "
                                  f"(/api/health answered {status})",
                      f"find the process: ss -ltnp 'sport = :{settings.port}'; stop it or set "
                      "PORT to another port")
    if status == 200 and answer.get("status") == "ok":
        return Result(name, OK, f"{address} is served by a running Director (healthy)")
    return Result(name, WARN, f"{address} is served by a running Director that is not healthy: "
                              f"{answer.get('reason') or answer.get('status')}",
                  "journalctl -u director -n 50 tells why; the database checks above may too")


def check_metrics_port(settings: Settings) -> Result | None:
    if settings.metrics_listen is None or settings.metrics_listen.startswith("unix:"):
        return None
    host, _, port_text = settings.metrics_listen.rpartition(":")
    host, port = host.strip("[]"), int(port_text)
    error = _bind_error(host, port)
    if error is None:
        return Result("metrics-port", OK, f"{settings.metrics_listen} is free")
    if error.errno == errno.EADDRINUSE:
        probe = "127.0.0.1" if ipaddress.ip_address(host).is_unspecified else host
        with contextlib.suppress(OSError, http.client.HTTPException):
            connection = http.client.HTTPConnection(probe, port, timeout=3)
            try:
                connection.request("GET", "/metrics")
                if b"director_build_info" in connection.getresponse().read():
                    return Result("metrics-port", OK,
                                  f"{settings.metrics_listen} is served by a running Director")
            finally:
                connection.close()
    return Result("metrics-port", FAIL, f"cannot listen on {settings.metrics_listen}: "
                                        f"{error.strerror}",
                  "choose a free port for METRICS_LISTEN (each instance needs its own)")


# --- OpenTelemetry collector ------------------------------------------------------------------


def check_tracing(settings: Settings) -> Result | None:
    """When tracing is on: the collector answers an empty OTLP/HTTP export (protobuf) with
    2xx. An empty ``ExportTraceServiceRequest`` is zero bytes of protobuf: nothing is stored."""
    endpoint = settings.tracing_endpoint
    if endpoint is None:
        return None
    name = "tracing"
    headers = {"content-type": "application/x-protobuf",
               **dict(settings.otel_headers), **dict(settings.otel_traces_headers)}
    try:
        status, answered, _ = _fetch(endpoint, "POST", b"", headers)
    except (OSError, http.client.HTTPException) as failure:
        return Result(name, FAIL, f"the OTLP collector at {endpoint} cannot be reached: "
                                  f"{failure}",
                      "start the collector (docs/operations.rst, Tracing), or correct "
                      "OTEL_EXPORTER_OTLP_ENDPOINT; meanwhile spans are dropped (clients are "
                      "not affected)")
    if 200 <= status < 300:
        content_type = answered.get("content-type") or "no content type"
        return Result(name, OK, f"the OTLP collector at {endpoint} takes spans "
                                f"({status}, {content_type})")
    fix = ("check OTEL_EXPORTER_OTLP_HEADERS (the collector's credentials)" if status in (401, 403)
           else "point OTEL_EXPORTER_OTLP_ENDPOINT at the collector's OTLP/HTTP receiver "
                "(port 4318 by default; spans go to /v1/traces)")
    return Result(name, FAIL, f"{endpoint} answered an OTLP export with HTTP {status}", fix)


# --- BASE_URL ---------------------------------------------------------------------------------


def check_base_url(settings: Settings) -> Result:
    name = "base-url"
    parts = urlsplit(settings.base_url)
    host = parts.hostname or ""
    try:
        literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    details = []
    if settings.host in ("0.0.0.0", "::") and settings.production:  # noqa: S104
        details.append("HOST listens on every interface: if the reverse proxy runs on this "
                       "host, HOST=127.0.0.1 keeps the plain-HTTP port off the network")
    if not settings.production:
        return Result(name, OK, f"{settings.base_url} (not production: not checked further)",
                      "", tuple(details))
    if parts.scheme != "https":
        return Result(name, FAIL, f"{settings.base_url} is not https in production",
                      "terminate TLS at the reverse proxy and set BASE_URL=https://your.host "
                      "(session cookies are only Secure, and API keys only encrypted, over https)",
                      tuple(details))
    if literal is not None or host == "localhost" or host.endswith(".localhost"):
        return Result(name, WARN,
                      f"{settings.base_url}: the host is "
                      f"{'an IP address' if literal is not None else 'loopback'}",
                      "use the public DNS name clients use (certificates, the Host check and the "
                      "URLs handed out to MCP clients derive from it)", tuple(details))
    return Result(name, OK, settings.base_url, "", tuple(details))


#: How long the doctor waits for BASE_URL to answer.
REACH_TIMEOUT_SECONDS = 5.0
#: What MCP clients fetch first when they sign in with OAuth (the issuer's metadata).
DISCOVERY_PATH = "/.well-known/oauth-authorization-server"


def _fetch(url: str, method: str = "GET", body: bytes | None = None,
           headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(url)
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(parts.hostname or "", parts.port,
                                                 timeout=REACH_TIMEOUT_SECONDS)
    else:
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port,
                                                timeout=REACH_TIMEOUT_SECONDS)
    try:
        connection.request(method, parts.path or "/", body=body,
                           headers=headers or {"accept": "application/json"})
        response = connection.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read(65536))
    finally:
        connection.close()


def check_base_url_reach(settings: Settings) -> Result:
    """BASE_URL is what MCP clients reach: they are sent to it to sign in (it is the OAuth
    issuer, and every URL of the metadata derives from it). The doctor fetches the issuer's
    metadata through BASE_URL as a client would (through the proxy, TLS verified) and checks
    that a Director answers and names BASE_URL as its issuer. What this host cannot reach
    (DNS, a firewall, TLS it does not trust) is a warning: clients may see it otherwise."""
    name = "base-url-reach"
    url = settings.base_url + DISCOVERY_PATH
    try:
        status, headers, body = _fetch(url)
    except ssl.SSLError as failure:
        # A warning: this host's view (its trust store, split DNS) may not be the clients'.
        return Result(name, WARN, f"{settings.base_url}: TLS fails from this host "
                                  f"({base.one_line(failure)})",
                      "if clients see the same, they refuse it: install a certificate valid for "
                      "this name (chain included) at the reverse proxy")
    except (OSError, http.client.HTTPException) as failure:
        return Result(name, WARN, f"{settings.base_url} cannot be reached from this host "
                                  f"({base.one_line(failure)})",
                      "MCP clients signing in with OAuth are sent there: check DNS and the "
                      "reverse proxy (if the daemon is not started yet, run the doctor again "
                      "once it is)")
    if 300 <= status < 400:
        return Result(name, FAIL, f"{url} redirects ({status}) to "
                                  f"{headers.get('location', '?')}",
                      "set BASE_URL to the URL clients end up at (https, the public name, no "
                      "path); OAuth metadata and redirects must not be redirected")
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if status != 200 or "x-trace-id" not in headers or not isinstance(answer, dict):
        return Result(name, FAIL, f"{url} answered {status}, not from Director",
                      "the reverse proxy must pass every path to Director, /.well-known/ and "
                      "/oauth/ included (docs/manual.rst, nginx and Cloudflare)")
    issuer = answer.get("issuer")
    if issuer != settings.base_url:
        return Result(name, FAIL, f"the Director at {settings.base_url} says its issuer is "
                                  f"{issuer!r}",
                      "every instance behind this URL needs the same BASE_URL, the one clients "
                      "reach; OAuth clients refuse metadata whose issuer differs")
    cached = headers.get("age") or headers.get("x-cache", "").lower().startswith("hit")
    details = (("a cache answered (Age or X-Cache): make sure /oauth/ is never cached",)
               if cached else ())
    return Result(name, OK, f"{settings.base_url} reaches Director (its OAuth issuer)", "",
                  details)


# --- the state directory ----------------------------------------------------------------------
