"""Setting the stage through the daemon's own REST API: accounts, playbooks, servers, prompts.

Plain ``http.client`` on 127.0.0.1, one request at a time: this is set-up (and the trigger of
a change), never the load under measurement. Every call checks its status and raises
``ApiFailure`` with the daemon's answer otherwise.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from bench.probe import HOST

ECHO_SERVER = Path(__file__).resolve().parent / "echo_server.py"
_emails = itertools.count(1)


class ApiFailure(Exception):
    """A set-up request got an unexpected status; the message has the answer."""


@attrs.define
class Client:
    """A keep-alive connection to one daemon, authenticated with ``key`` once signed up."""

    port: int
    key: str | None = None
    _connection: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: Any = None, expect: int = 200,
                timeout: float = 30.0) -> Any:
        headers = {"accept": "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        if self.key is not None:
            headers["x-api-key"] = self.key
        for attempt in (1, 2):  # a keep-alive connection the server closed: reconnect once
            if self._connection is None:
                self._connection = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
            try:
                self._connection.request(method, path, payload, headers)
                response = self._connection.getresponse()
                data = response.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt == 2:
                    raise
        if response.status != expect:
            raise ApiFailure(f"{method} {path} on port {self.port}: {response.status} "
                             f"(expected {expect}): {data[:500].decode(errors='replace')}")
        return json.loads(data) if data else None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def sign_up(port: int, label: str = "bench") -> Client:
    """A fresh account (unique email) and a client holding its default API key."""
    client = Client(port)
    email = f"{label}-{os.getpid()}-{next(_emails)}@bench.invalid"
    answer = client.request("POST", "/api/v1/auth/signup",
                            {"email": email, "password": "bench-password-1234"}, expect=201)
    client.key = answer["api_key"]["key"]
    client.close()  # the sign-up answer set a session cookie; the key is what we use
    return client


def create_playbook(client: Client, name: str) -> str:
    return str(client.request("POST", "/api/v1/playbooks", {"name": name}, expect=201)["id"])


def add_echo_server(client: Client, playbook_id: str, name: str = "echo",
                    options: Sequence[str] = ()) -> None:
    """The stdio echo server (``bench.echo_server``) with this interpreter, no site import;
    ``options`` are its own (``--eras both``)."""
    client.request("POST", f"/api/v1/playbooks/{playbook_id}/servers", {
        "name": name, "type": "stdio", "command": sys.executable,
        "args": ["-I", "-S", str(ECHO_SERVER), *options]}, expect=201)


def add_prompt(client: Client, playbook_id: str, name: str) -> None:
    client.request("POST", f"/api/v1/playbooks/{playbook_id}/prompts",
                   {"name": name, "body": "bench prompt"}, expect=201)


def remove_prompt(client: Client, playbook_id: str, name: str) -> None:
    client.request("DELETE", f"/api/v1/playbooks/{playbook_id}/prompts/{name}", expect=204)


class PromptToggle:
    """Each ``toggle()`` adds or removes one prompt: one change, one ``prompts/list_changed``."""

    def __init__(self, client: Client, playbook_id: str, name: str = "bench-toggle") -> None:
        self.client, self.playbook_id, self.name = client, playbook_id, name
        self.present = False

    def toggle(self) -> None:
        if self.present:
            remove_prompt(self.client, self.playbook_id, self.name)
        else:
            add_prompt(self.client, self.playbook_id, self.name)
        self.present = not self.present
