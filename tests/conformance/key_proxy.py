"""An authenticating front for the gateway, for the conformance runs only: it adds an
``x-api-key`` header to every request and changes nothing else.

    python tests/conformance/key_proxy.py --port 9000 --target http://127.0.0.1:3673 \\
        --key dk_...

Why it exists: the conformance suite cannot be told to send a header, and a Director playbook
needs an API key. The key could ride in the URL (``?key=dk_…``, which MCP routes accept), but
two scenarios (``http-header-validation``, ``http-custom-header-server-validation``) send
their requests with their own ``http.request`` helper that builds the request line from
``URL.pathname`` and so drops the query: without a key every such request is answered 401 and
nothing of what they test is reached. With this front the suite gets a key-less URL and the
gateway authenticates it the way a real MCP client does, with a header.

What it does, byte for byte: each client connection gets one connection to the target. On
the way in it finds each request's boundaries (the header block, up to the empty line, then
the body: ``Content-Length`` bytes, or ``Transfer-Encoding: chunked`` framing followed chunk
by chunk up to the last chunk and its trailers) and inserts one line, ``x-api-key: <key>``,
right after each request line; everything else — header names and their case, odd
whitespace, duplicates, invalid characters, the ``Host`` header, the body — goes through as
it came, as it arrives (a body is not buffered). Keep-alive and pipelined requests work
because the requests of a connection are parsed one after the other. The answers are not
parsed at all: whatever the target sends is written back at once, so SSE streams flow event
by event and a long-lived stream lasts as long as either side keeps it open. When the client
closes, the target's connection is half-closed (the gateway then closes it, which is how it
learns that a stream's reader went away); when the target closes, the client's connection is
closed after the last byte.

A request that already carries an ``x-api-key`` still gets ours, first: the gateway then sees
two, and Twisted's ``getHeader`` returns the last one, the client's own. No scenario of the
suite sends one. Where the framing cannot be known (an unparsable or conflicting
``Content-Length``, a ``Transfer-Encoding`` that does not end in ``chunked``, a bad chunk size,
an ``Upgrade`` or ``CONNECT``), that request keeps its key and the rest of the connection is
passed through untouched: the target judges those bytes exactly as they were sent. (The
suite's requests all carry a plain ``Content-Length``; chunked framing is handled anyway.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
from urllib.parse import urlsplit

PIECE = 65536
LINE_LIMIT = 1 << 20  # a header line or a chunk-size line
EMPTY = (b"\r\n", b"\n")  # the line that ends a header block (or precedes a request)


class Unframed(Exception):
    """The request's body cannot be delimited: pass the rest of the connection through."""


def _headers(block: list[bytes]) -> dict[bytes, list[bytes]]:
    """The header fields of a request's header lines (request line excluded), by lower-case
    name, for framing decisions only (the lines themselves are forwarded as they are)."""
    fields: dict[bytes, list[bytes]] = {}
    for line in block:
        if line[:1] in (b" ", b"\t"):  # obsolete line folding: part of the previous field
            continue
        name, colon, value = line.partition(b":")
        if colon:
            fields.setdefault(name.strip().lower(), []).append(value.strip())
    return fields


def body_framing(request_line: bytes, block: list[bytes]) -> tuple[str, int]:
    """``("length", n)`` or ``("chunked", 0)``; raises ``Unframed`` when it cannot say."""
    fields = _headers(block)
    if request_line.split(b" ", 1)[0].upper() == b"CONNECT" or b"upgrade" in fields:
        raise Unframed("CONNECT or Upgrade")
    codings = b",".join(fields.get(b"transfer-encoding", []))
    if codings:
        if codings.split(b",")[-1].strip().lower() != b"chunked":
            raise Unframed(f"transfer-encoding {codings!r}")
        return "chunked", 0
    # Several Content-Length values (fields or a list) are fine only when they all agree.
    lengths = {value.strip() for values in fields.get(b"content-length", []) for value in
               values.split(b",")}
    if not lengths:
        return "length", 0
    if len(lengths) > 1 or not next(iter(lengths)).isdigit():
        raise Unframed(f"content-length {sorted(lengths)!r}")
    return "length", int(lengths.pop())


class KeyProxy:
    """Listens on a loopback port (``url``: ``http://127.0.0.1:<port>``) and forwards to
    ``target`` (``http://host:port``), adding ``x-api-key: key`` to every request; runs an
    asyncio loop in a daemon thread until ``stop()``."""

    def __init__(self, target: str, key: str, *, port: int = 0) -> None:
        parts = urlsplit(target)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"target must be http://host:port, not {target!r}")
        self.target = (parts.hostname, parts.port)
        self.line = b"x-api-key: " + key.encode("latin-1") + b"\r\n"
        self.loop = asyncio.new_event_loop()
        self.connections: set[asyncio.Task[None]] = set()
        self.server = self.loop.run_until_complete(asyncio.start_server(
            self.serve, "127.0.0.1", port, limit=LINE_LIMIT))
        self.port: int = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.loop.run_forever, name="key-proxy",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            for task in list(self.connections):
                task.cancel()
            await asyncio.gather(*self.connections, return_exceptions=True)
            await self.server.wait_closed()

        if self.loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def serve(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
                    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        target_out: asyncio.StreamWriter | None = None
        answers: asyncio.Task[None] | None = None
        try:
            target_in, target_out = await asyncio.open_connection(*self.target,
                                                                  limit=LINE_LIMIT)
            answers = asyncio.create_task(self.answers(target_in, client_out, target_out))
            try:
                await self.requests(client_in, target_out)
            except (OSError, ValueError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError):
                target_out.transport.abort()  # a broken request must not look complete
            else:
                if not target_out.is_closing() and target_out.can_write_eof():
                    target_out.write_eof()  # the client is done sending: so are we
            await answers
        except OSError:
            pass  # the target refused the connection: the client just sees it closed
        finally:
            if answers is not None:
                answers.cancel()
            for writer in (target_out, client_out):
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
            self.connections.discard(task)

    async def answers(self, target_in: asyncio.StreamReader, client_out: asyncio.StreamWriter,
                      target_out: asyncio.StreamWriter) -> None:
        """The target's bytes to the client as they arrive; when the target closes, the
        client's connection is closed after them (which also ends ``requests``)."""
        try:
            while data := await target_in.read(PIECE):
                client_out.write(data)
                await client_out.drain()
        except OSError:
            target_out.transport.abort()  # the client is gone: let the target know
        client_out.close()

    async def requests(self, client_in: asyncio.StreamReader,
                       target_out: asyncio.StreamWriter) -> None:
        """The client's requests to the target, each with the key after its request line,
        until the client closes."""
        while request_line := await client_in.readline():
            if request_line in EMPTY:  # empty lines before a request line (RFC 9112 2.2)
                target_out.write(request_line)
                continue
            block: list[bytes] = []
            while (line := await client_in.readline()) not in EMPTY:
                if not line:  # closed in the middle of a header block: send what came
                    target_out.write(request_line + self.line + b"".join(block))
                    return
                block.append(line)
            target_out.write(request_line + self.line + b"".join(block) + line)
            try:
                kind, length = body_framing(request_line, block)
                if kind == "chunked":
                    await self.chunked(client_in, target_out)
                else:
                    await self.copy(client_in, target_out, length)
            except Unframed:
                await self.pass_through(client_in, target_out)
                return
            await target_out.drain()

    async def copy(self, client_in: asyncio.StreamReader, target_out: asyncio.StreamWriter,
                   length: int) -> None:
        while length:
            data = await client_in.read(min(length, PIECE))
            if not data:
                raise asyncio.IncompleteReadError(b"", length)
            target_out.write(data)
            await target_out.drain()
            length -= len(data)

    async def chunked(self, client_in: asyncio.StreamReader,
                      target_out: asyncio.StreamWriter) -> None:
        """A chunked body as it was sent: size lines (with any extensions), data, the last
        chunk and its trailer fields up to the empty line."""
        while True:
            size_line = await client_in.readuntil(b"\n")
            target_out.write(size_line)
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise Unframed(f"chunk size {size_line!r}") from None
            if size == 0:
                while (trailer := await client_in.readuntil(b"\n")) not in EMPTY:
                    target_out.write(trailer)
                target_out.write(trailer)
                return
            await self.copy(client_in, target_out, size)
            target_out.write(await client_in.readuntil(b"\n"))  # the CRLF after the data

    async def pass_through(self, client_in: asyncio.StreamReader,
                           target_out: asyncio.StreamWriter) -> None:
        while data := await client_in.read(PIECE):
            target_out.write(data)
            await target_out.drain()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", required=True, help="e.g. http://127.0.0.1:3673")
    parser.add_argument("--key", required=True, help="the API key to add (dk_…)")
    arguments = parser.parse_args()
    proxy = KeyProxy(arguments.target, arguments.key, port=arguments.port)
    print(f"{proxy.url} -> {arguments.target}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        proxy.thread.join()
    proxy.stop()


if __name__ == "__main__":
    main()
