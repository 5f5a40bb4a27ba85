"""The modern era's ``subscriptions/listen`` streams.

``subscriptions/listen``: the response is an SSE stream; the first event is
``notifications/subscriptions/acknowledged`` (every requested kind is honoured, as the SDK
does), sent once the playbook's upstreams have been started — through the context's lists,
which wait for a server still starting no longer than a client's list does — so that their
change notifications can reach us, and once the requested resources are subscribed upstream
(``resources/subscribe``, reference-counted per context); all bounded by
``LISTEN_PREPARE_SECONDS``. Then ``notifications/{tools,prompts,resources}/list_changed`` and
``notifications/resources/updated`` as the client asked, each with the subscription id
(the listen request's id) in ``_meta``. They come from the same sources as the handshake era's
GET stream: the upstreams' own notifications, playbook edits, which reach every instance
through the playbook cache's database notifications, and servers that became ready after a
list of this context (or the acknowledgement) went without them (``router``). When the
context ends (playbook deleted, shutdown, cap) each stream gets its final
``SubscriptionsListenResult``; when its credential is revoked, an error (-32000, ``data.code``
``credential_revoked``) instead, and the stream ends.
"""

from __future__ import annotations

from typing import Any

from director.mcp import jsonrpc
from director.mcp.channels import SessionChannel
from director.mcp.jsonrpc import INVALID_PARAMS, Message
from director.mcp.modern.envelope import Rejection, with_server_info
from director.mcp.protocol import SERVER_ERROR, SUBSCRIPTION_ID_META
from director.mcp.streams import EventStream, frame, json_bytes

#: How long a listen waits for its upstreams before acknowledging anyway.
LISTEN_PREPARE_SECONDS = 10.0
#: Events kept for a listener until its acknowledgement is sent.
MAX_PENDING_EVENTS = 100

LIST_CHANGED_FILTERS = {"notifications/tools/list_changed": "toolsListChanged",
                        "notifications/prompts/list_changed": "promptsListChanged",
                        "notifications/resources/list_changed": "resourcesListChanged"}


class Listener:
    """One ``subscriptions/listen`` stream: its filter, and its events until acknowledged."""

    def __init__(self, subscription_id: Any, notifications: dict[str, Any]) -> None:
        self.id = subscription_id
        self.kinds = {kind for kind in LIST_CHANGED_FILTERS.values()
                      if notifications.get(kind) is True}
        uris = notifications.get("resourceSubscriptions") or []
        if not isinstance(uris, list) or not all(isinstance(uri, str) for uri in uris):
            raise Rejection(INVALID_PARAMS, "notifications.resourceSubscriptions must be a list "
                                            "of URIs")
        self.uris = tuple(dict.fromkeys(uris))
        self.stream: EventStream | None = None
        self.pending: list[bytes] = []
        self.released = False

    @property
    def honored(self) -> dict[str, Any]:
        honored: dict[str, Any] = {kind: True for kind in sorted(self.kinds)}
        if self.uris:
            honored["resourceSubscriptions"] = list(self.uris)
        return honored

    def wants(self, message: Message) -> bool:
        method = message.get("method", "")
        if method in LIST_CHANGED_FILTERS:
            return LIST_CHANGED_FILTERS[method] in self.kinds
        if method == "notifications/resources/updated":
            return (message.get("params") or {}).get("uri") in self.uris
        return False

    def stamped(self, method: str, params: dict[str, Any] | None) -> bytes:
        params = dict(params or {})
        meta = params.get("_meta")
        params["_meta"] = {**(meta if isinstance(meta, dict) else {}),
                           SUBSCRIPTION_ID_META: self.id}
        return frame(json_bytes(jsonrpc.notification(method, params)))

    def deliver(self, message: Message) -> None:
        if not self.wants(message):
            return
        chunk = self.stamped(message["method"], message.get("params"))
        if self.stream is None:
            if chunk not in self.pending and len(self.pending) < MAX_PENDING_EVENTS:
                self.pending.append(chunk)
        else:
            self.stream.send(chunk)

    def start(self, stream: EventStream) -> None:
        """The acknowledgement first, then what arrived while preparing."""
        stream.send(self.stamped("notifications/subscriptions/acknowledged",
                                 {"notifications": self.honored}))
        for chunk in self.pending:
            stream.send(chunk)
        self.pending.clear()
        self.stream = stream

    def end(self, info: dict[str, Any]) -> None:
        """Graceful close: the listen request's result, then the end of the stream."""
        result = with_server_info({"resultType": "complete",
                                   "_meta": {SUBSCRIPTION_ID_META: self.id}}, info)
        self._last(jsonrpc.result(self.id, result))

    def revoked(self) -> None:
        """The credential that opened it was revoked: an error answers the listen request."""
        self._last(jsonrpc.error(self.id, SERVER_ERROR, (  # credential revoked
            "the credential that opened this subscription was revoked (API key revoked, signed "
            "out, password changed or account disabled); authenticate again"),
            {"code": "credential_revoked"}))

    def _last(self, message: Message) -> None:
        if self.stream is None or not self.stream.open:
            return
        self.stream.send(frame(json_bytes(message)))
        self.stream.finish()


class ListenHub(SessionChannel):
    """A context's "session channel": notifications outside requests go to its listeners."""

    def __init__(self, session_id: str) -> None:
        super().__init__(session_id)
        self.listeners: list[Listener] = []

    @property
    def open(self) -> bool:  # keeps the context from idle expiry while someone listens
        return bool(self.listeners)

    def send(self, message: Message) -> None:
        for listener in list(self.listeners):
            listener.deliver(message)
