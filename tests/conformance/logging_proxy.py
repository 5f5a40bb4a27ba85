"""A small HTTP proxy that records every exchange, for investigating a conformance difference.

    python tests/conformance/logging_proxy.py --port 9000 --target http://127.0.0.1:8080 \\
        --log /tmp/exchanges.jsonl

Point the suite at ``http://127.0.0.1:9000/...`` instead of the target: each request is
forwarded as it came (method, path and query, headers including ``Host``, body) and its answer
streamed back as it arrives (SSE included). ``--log`` gets one JSON object per line: ``request``
(method, path, headers, body), ``response`` (status, headers) and ``chunk`` (a piece of the
answer's body as it was received), each with the exchange's number and a time in seconds.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
       "proxy-connection", "content-length"}


class Recorder:
    def __init__(self, path: str) -> None:
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - for the process's life
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.numbers = itertools.count(1)

    def write(self, kind: str, number: int, **fields: Any) -> None:
        record = {"kind": kind, "n": number, "t": round(time.monotonic() - self.started, 3),
                  **fields}
        with self.lock:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()


def decode(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", errors="replace")


def handler(target: str, recorder: Recorder) -> type[BaseHTTPRequestHandler]:
    parts = urlsplit(target)

    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def forward(self) -> None:
            number = next(recorder.numbers)
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            recorder.write("request", number, method=self.command, path=self.path,
                           headers=headers, body=decode(body) if body else None)
            upstream = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port,
                                                  timeout=300)
            upstream.putrequest(self.command, self.path, skip_host=True,
                                skip_accept_encoding=True)
            for name, value in headers.items():
                upstream.putheader(name, value)
            upstream.putheader("content-length", str(len(body)))
            upstream.endheaders(body)
            response = upstream.getresponse()
            answer_headers = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP]
            recorder.write("response", number, status=response.status,
                           headers=dict(answer_headers))
            self.send_response(response.status)
            for name, value in answer_headers:
                self.send_header(name, value)
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            try:
                while True:
                    chunk = response.read1(65536)
                    if not chunk:
                        break
                    recorder.write("chunk", number, text=chunk.decode("utf-8", "replace"))
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                recorder.write("end", number)
            except OSError as error:
                recorder.write("end", number, error=str(error))
            finally:
                upstream.close()

        do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = forward

    return Proxy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", required=True, help="e.g. http://127.0.0.1:8080")
    parser.add_argument("--log", required=True, help="a JSON-lines file to append to")
    arguments = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", arguments.port),
                                 handler(arguments.target, Recorder(arguments.log)))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
