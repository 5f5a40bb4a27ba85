"""The playbook MCP endpoints: ``/playbooks/{id}/mcp`` (Streamable HTTP: the handshake era,
and the stateless 2026-07-28 era served by ``director.mcp.modern``) and
``/playbooks/{id}/sse`` + ``/playbooks/{id}/message`` (legacy HTTP+SSE).

Every route authenticates like the API (``x-api-key``, ``Authorization: Bearer dk_…``, the
session cookie) and also accepts ``?key=dk_…`` for clients that cannot set headers, and an OAuth
access token issued for its playbook (``director.oauth.server.resource``: its 401s say where to
sign in, a missing scope is a 403 ``insufficient_scope``); errors
are JSON-RPC error objects with the HTTP status that says what happened (401 with
``WWW-Authenticate``, 404 for a playbook that is not the caller's, 429 when rate limited).
A session is reached only with the credential that opened it (another key of the same user
gets 404 "session not found": ``director.mcp.engine`` says why), and ends when that
credential is revoked.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from director import jsontext
from director.accounts.cache import Credential
from director.mcp import jsonrpc
from director.mcp.channels import CallChannel
from director.mcp.downstream import DownstreamSession
from director.mcp.engine import McpEngine
from director.mcp.handshake import initialize_result, sse_message
from director.mcp.jsonrpc import Message, ProtocolError
from director.mcp.modern.envelope import is_modern_request, modern_method_not_allowed
from director.mcp.modern.gateway import ModernGateway
from director.mcp.protocol import PROTOCOL_VERSION_META, SERVER_ERROR, UNSUPPORTED_PROTOCOL_VERSION
from director.mcp.streams import EventStream, frame
from director.mcp.upstream.base import LEGACY_VERSIONS
from director.oauth.server import resource as oauth_resource
from director.playbooks.cache import PlaybookCache
from director.playbooks.store import Playbook
from director.web.auth import Authenticator, Principal
from director.web.errors import Unauthorized
from director.web.mcp_dispatch import McpResource
from director.web.mcp_errors import McpHttpError
from director.web.querykey import query_keys

log = Logger(namespace="mcp.http")



class _Streaming(Resource):
    """What a stream route returns once its ``EventStream`` owns the response: rendered, it
    answers ``NOT_DONE_YET`` and leaves the request open. Nothing waits for the stream to end —
    a coroutine suspended for the stream's whole life, with its Deferred chain, was most of
    an idle session's memory after the request itself."""

    isLeaf = True

    def render(self, request: Request) -> Any:
        return NOT_DONE_YET


STREAMING = _Streaming()


def credential_of(principal: Principal) -> Credential:
    """The API key, cookie session or OAuth grant that authenticated the caller."""
    if principal.grant is not None:
        return Credential("oauth", principal.grant.id)
    if principal.key is not None:
        return Credential("api_key", principal.key.id)
    assert principal.session is not None
    return Credential("session", principal.session.id)


class McpRoutes:
    def __init__(self, engine: McpEngine, auth: Authenticator, playbooks: PlaybookCache) -> None:
        self.engine = engine
        self.auth = auth
        self.playbooks = playbooks
        self.modern = ModernGateway(engine)
        self._resource = McpResource({
            b"mcp": {b"POST": self.post, b"GET": self.get, b"DELETE": self.delete},
            b"sse": {b"GET": self.sse},
            b"message": {b"POST": self.message},
        })

    def resource(self) -> McpResource:
        return self._resource

    # --- shared ---------------------------------------------------------------------------

    async def _caller(self, request: Request, playbook_id: str,
                      transport: str = "mcp") -> tuple[Principal, Playbook]:
        settings = self.auth.settings
        if not (self.playbooks.loaded and self.auth.cache.loaded):
            # Starting (or reloading after the database came back): "no playbook" would be a
            # lie that makes clients give up.
            raise McpHttpError(503, SERVER_ERROR, "starting: not ready to serve yet; retry "
                                                  "shortly", headers={"Retry-After": "1"})
        try:
            principal = await self.auth.authenticate(request, allow_query_key=True,
                                                     allow_oauth=True)
        except Unauthorized as refusal:
            raise oauth_resource.challenged(settings, refusal, playbook_id, transport) from None
        playbook = self.playbooks.get(principal.user.id, playbook_id)
        if principal.grant is not None:
            refused = oauth_resource.audience_refusal(settings, principal.grant, playbook,
                                                      playbook_id, transport)
            if refused is not None:
                raise refused
        if playbook is None:
            raise McpHttpError(404, SERVER_ERROR, f"no playbook {playbook_id!r}")
        return principal, playbook

    async def _session(self, request: Request, principal: Principal,
                       playbook: Playbook) -> DownstreamSession:
        raw = request.getHeader(b"mcp-session-id")
        if raw is None:
            raise McpHttpError(400, jsonrpc.INVALID_REQUEST,
                               "Bad Request: the Mcp-Session-Id header is required "
                               "(send initialize first)")
        session_id = raw.decode("latin-1")
        credential = credential_of(principal)
        session = self.engine.find(session_id, credential, playbook)
        shared = self.engine.shared
        if session is None and shared is not None and session_id not in self.engine.sessions:
            # Not held here: another instance created it (director.mcp.shared_sessions).
            try:
                session = await shared.adopt(session_id, credential, playbook.pk)
            except Exception as failure:
                log.info("adopting a session failed: {error}", error=str(failure))
                raise McpHttpError(503, SERVER_ERROR, "the session store is unavailable; "
                                                      "try again", headers={"Retry-After": "1"}
                                   ) from None
        if session is None or session.transport == "modern":  # contexts have no public id
            raise McpHttpError(404, SERVER_ERROR,
                               "session not found: it ended or expired; initialize again")
        return session

    @staticmethod
    def _refuse_modern(request: Request) -> None:
        if modern_method_not_allowed(request):
            raise McpHttpError(405, jsonrpc.INVALID_REQUEST,
                               "Method Not Allowed: MCP 2026-07-28 has no GET stream and no "
                               "session to delete; POST requests (subscriptions/listen for "
                               "notifications)", headers={"Allow": "POST"})

    @staticmethod
    def _read_message(request: Request) -> Message:
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if content_type != b"application/json":
            raise McpHttpError(415, jsonrpc.INVALID_REQUEST,
                               "Unsupported Media Type: send application/json")
        raw = request.content.read() if request.content is not None else b""
        try:
            return jsonrpc.parse_message(raw)
        except ProtocolError as failure:
            raise McpHttpError(400, failure.code, failure.message) from None

    def _check_scope(self, principal: Principal, message: Message, playbook_id: str,
                     transport: str) -> None:
        """403 ``insufficient_scope`` when an OAuth token lacks what ``message`` needs."""
        if principal.grant is None:
            return
        method = message.get("method")
        needed = oauth_resource.missing_scopes(principal.grant, method)
        if needed is not None:
            text, header = oauth_resource.scope_challenge(self.auth.settings, playbook_id,
                                                          transport, needed, method)
            raise McpHttpError(403, SERVER_ERROR, text, request_id=message.get("id"),
                               headers={"WWW-Authenticate": header},
                               data={"code": "insufficient_scope"})

    @staticmethod
    def _notified(session: DownstreamSession, message: Message) -> None:
        """A notification has no response: one the session refuses is answered 400 (the
        transport's "cannot accept the input") with the JSON-RPC error and no id."""
        try:
            session.handle_notification(message)
        except ProtocolError as failure:
            raise McpHttpError(400, failure.code, failure.message) from None

    @staticmethod
    def _check_modern(message: Message) -> None:
        """Modern-era (2026-07-28) requests get a precise error until that era is served, so
        that clients in ``auto`` mode fall back to the handshake."""
        params = message.get("params") or {}
        meta = params.get("_meta") if isinstance(params, dict) else None
        asked = meta.get(PROTOCOL_VERSION_META) if isinstance(meta, dict) else None
        if message.get("method") == "server/discover" or (asked and asked not in LEGACY_VERSIONS):
            raise McpHttpError(
                400, UNSUPPORTED_PROTOCOL_VERSION,
                f"unsupported protocol version {asked or '2026-07-28'}: this server speaks "
                f"{', '.join(LEGACY_VERSIONS)}; initialize first",
                request_id=message.get("id"), data={"supported": list(LEGACY_VERSIONS)})

    # --- Streamable HTTP ------------------------------------------------------------------

    async def post(self, request: Request, playbook_id: str) -> Any:
        principal, playbook = await self._caller(request, playbook_id)
        accept = (request.getHeader(b"accept") or b"*/*").decode("latin-1").lower()
        if not ("*/*" in accept or ("application/json" in accept and
                                    "text/event-stream" in accept)):
            raise McpHttpError(406, jsonrpc.INVALID_REQUEST,
                               "Not Acceptable: accept application/json and text/event-stream")
        message = self._read_message(request)
        self._check_scope(principal, message, playbook_id, "mcp")
        if is_modern_request(request, message):
            return await self.modern.post(request, principal.user.id, credential_of(principal),
                                          playbook, message)
        self._check_modern(message)
        if message.get("method") == "initialize":
            return await self._initialize(request, principal, playbook, message)
        session = await self._session(request, principal, playbook)
        version = request.getHeader(b"mcp-protocol-version")
        if version is not None and version.decode("latin-1") not in LEGACY_VERSIONS:
            raise McpHttpError(400, jsonrpc.INVALID_REQUEST,
                               f"Bad Request: unsupported MCP-Protocol-Version "
                               f"{version.decode('latin-1')!r}; supported: "
                               f"{', '.join(LEGACY_VERSIONS)}")
        if jsonrpc.is_notification(message):
            self._notified(session, message)
            request.setResponseCode(202)
            return b""
        if jsonrpc.is_response(message):
            session.handle_response(message)
            request.setResponseCode(202)
            return b""
        return await self._call(request, session, message)

    async def _initialize(self, request: Request, principal: Principal, playbook: Playbook,
                          message: Message) -> bytes:
        if request.getHeader(b"mcp-session-id") is not None:
            raise McpHttpError(400, jsonrpc.INVALID_REQUEST,
                               "Bad Request: initialize opens a new session; send it without "
                               "Mcp-Session-Id", request_id=message.get("id"))
        if "id" not in message:
            raise McpHttpError(400, jsonrpc.INVALID_REQUEST, "initialize must be a request")
        session = self.engine.create(principal.user.id, credential_of(principal), playbook,
                                     "streamable")
        result = initialize_result(session, message.get("params") or {}, playbook)
        await self._record(session)
        request.setHeader(b"mcp-session-id", session.id.encode())
        request.setHeader(b"content-type", b"application/json")
        log.info("MCP session opened", playbook_id=playbook.id, session=session.id[:8],
                 client=str(session.client_info.get("name", "")))
        return json.dumps(jsonrpc.result(message["id"], result)).encode()

    async def _record(self, session: DownstreamSession) -> None:
        """Store a new session for the other instances before its id is handed out; without
        the database it still works here (and only here)."""
        if self.engine.shared is None:
            return
        try:
            await self.engine.shared.record(session)
        except Exception as failure:
            log.warn("a new MCP session could not be stored, so only this instance can serve "
                     "it: {error}", error=str(failure))

    async def _call(self, request: Request, session: DownstreamSession,
                    message: Message) -> None:
        channel = CallChannel(request, self.engine.streams)
        request_id = message["id"]
        handling = defer.ensureDeferred(session.handle(message, channel))
        session.in_flight[request_id] = handling
        try:
            response = await handling
        finally:
            session.in_flight.pop(request_id, None)
        channel.finish(response)

    async def get(self, request: Request, playbook_id: str) -> Any:
        principal, playbook = await self._caller(request, playbook_id)
        self._refuse_modern(request)
        session = await self._session(request, principal, playbook)
        last_event_id = request.getHeader(b"last-event-id")
        missed: list[bytes] | None = None
        if last_event_id is not None:
            missed = session.channel.replay.after(last_event_id.decode("latin-1"))
            if missed is None and self.engine.shared is not None and session.key is not None:
                # Not an event of this instance's: the shared log has what others sent.
                try:
                    missed = await self.engine.shared.missed(
                        session, last_event_id.decode("latin-1"))
                except Exception as failure:
                    log.info("reading the event log failed: {error}", error=str(failure))
        if session.channel.open:
            if last_event_id is None:
                raise McpHttpError(409, SERVER_ERROR, "Conflict: this session already has an "
                                                      "open GET stream")
            # A client resuming has given up on its old stream, even if we have not noticed
            # yet (a closed socket is only seen on the next write): the new one replaces it.
            assert session.channel.stream is not None
            session.channel.stream.finish()
        stream = EventStream(request, self.engine.streams)
        session.channel.stream = stream
        session.touch()
        for chunk in missed or ():
            stream.send(chunk)
        if self.engine.shared is not None:
            self.engine.shared.stream_opened(session)  # another instance's ends there
        stream.comment(b"stream open")
        return STREAMING

    async def delete(self, request: Request, playbook_id: str) -> bytes:
        principal, playbook = await self._caller(request, playbook_id)
        self._refuse_modern(request)
        session = await self._session(request, principal, playbook)
        self.engine.end(session, "client")
        if self.engine.shared is not None:
            try:
                await self.engine.shared.forgotten(session)
            except Exception as failure:  # ended here all the same
                log.info("deleting an ended session's row failed: {error}", error=str(failure))
        request.setResponseCode(204)
        return b""

    # --- legacy HTTP+SSE ------------------------------------------------------------------

    async def sse(self, request: Request, playbook_id: str) -> Any:
        principal, playbook = await self._caller(request, playbook_id, "sse")
        session = self.engine.create(principal.user.id, credential_of(principal), playbook, "sse")
        stream = EventStream(request, self.engine.streams,
                             on_close=lambda _: self.engine.end(session, "client"))
        session.channel.stream = stream
        await self._record(session)
        endpoint = f"/playbooks/{playbook.id}/message?sessionId={session.id}"
        keys = query_keys(request.args)
        if keys and principal.key is not None:  # a client without headers posts with it too
            endpoint += "&key=" + quote(keys[0], safe="")
        stream.send(frame(endpoint.encode(), event="endpoint"))
        log.info("legacy SSE session opened", playbook_id=playbook.id, session=session.id[:8])
        return STREAMING

    async def message(self, request: Request, playbook_id: str) -> bytes:
        principal, playbook = await self._caller(request, playbook_id, "sse")
        values = request.args.get(b"sessionId")
        if not values:
            raise McpHttpError(400, jsonrpc.INVALID_REQUEST, "Bad Request: sessionId is required")
        session_id = values[0].decode("latin-1")
        credential = credential_of(principal)
        session = self.engine.find(session_id, credential, playbook)
        if session is None and self.engine.shared is not None and \
                session_id not in self.engine.sessions:
            return await self._message_elsewhere(request, principal, playbook, session_id)
        if session is None or session.transport != "sse":
            raise McpHttpError(404, SERVER_ERROR, "session not found")
        message = self._read_message(request)
        self._check_scope(principal, message, playbook_id, "sse")
        self._check_modern(message)
        try:
            sse_message(session, message)
        except ProtocolError as failure:
            raise McpHttpError(400, failure.code, failure.message) from None
        request.setResponseCode(202)
        return b"Accepted"

    async def _message_elsewhere(self, request: Request, principal: Principal,
                                 playbook: Playbook, session_id: str) -> bytes:
        """``POST /message`` of an ``/sse`` session whose stream another instance holds: checked
        against the stored session, then relayed there (``director.mcp.relay``)."""
        shared = self.engine.shared
        assert shared is not None
        try:
            stored = await shared.foreign_sse(session_id)
        except Exception as failure:
            log.info("looking up a session failed: {error}", error=str(failure))
            raise McpHttpError(503, SERVER_ERROR, "the session store is unavailable; try again",
                               headers={"Retry-After": "1"}) from None
        if stored is None or stored.credential != credential_of(principal) or \
                stored.playbook_pk != playbook.pk:
            raise McpHttpError(404, SERVER_ERROR, "session not found")
        message = self._read_message(request)
        self._check_scope(principal, message, playbook.id, "sse")
        self._check_modern(message)
        await shared.post_elsewhere(session_id, jsontext.dumps(message))
        request.setResponseCode(202)
        return b"Accepted"
