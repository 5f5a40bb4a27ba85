"""Sealed values at rest, all of them: re-sealing after a change of ``BETTER_AUTH_SECRET``
(``director secrets rotate``), and counting those no secret opens (``director doctor``).

What is sealed, and under which context (``crypto.SecretBox``): the secret env values and
headers of servers (``playbook_servers.config``, context: the variable's or header's name, as
``playbooks.store`` seals them), and everything of upstream OAuth (``store``: credentials,
client registrations, flows under way). Each value is opened with the current secret or the
previous one (``BETTER_AUTH_SECRET_PREVIOUS``); one only the previous opens is sealed again
with the current one, in one transaction per row. Values are never printed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import attrs

from director.crypto import SecretBox, SecretUnreadable
from director.oauth.client import store


@attrs.define
class Tally:
    current: int = 0
    resealed: int = 0
    #: What could not be opened (named, never shown).
    unreadable: list[str] = attrs.field(factory=list)

    def open(self, box: SecretBox, sealed: str, context: str, label: str,
             reseal: bool) -> str | None:
        """``sealed`` with the current secret: itself, or sealed again (None: unreadable)."""
        try:
            text, stale = box.opened(sealed, context)
        except SecretUnreadable:
            self.unreadable.append(label)
            return None
        if not stale:
            self.current += 1
            return sealed
        self.resealed += 1
        return box.seal(text, context) if reseal else sealed


def _server_rows(cursor: Any) -> Iterator[tuple[Any, ...]]:
    cursor.execute("SELECT s.playbook_pk, s.name, s.config, p.id, u.email FROM playbook_servers s "
                   "JOIN playbooks p ON p.pk = s.playbook_pk JOIN users u ON u.id = p.user_id "
                   "ORDER BY u.email, p.id, s.name")
    yield from cursor.fetchall()


def _servers(connection: Any, box: SecretBox, tally: Tally, reseal: bool) -> None:
    with connection.cursor() as cursor:
        for pk, name, config, playbook_id, email in list(_server_rows(cursor)):
            changed = False
            for field in ("env", "headers"):
                for key, item in (config.get(field) or {}).items():
                    if not isinstance(item, dict) or "sealed" not in item:
                        continue
                    value = tally.open(box, item["sealed"], key,
                                       f"{email} {playbook_id}/{name} {field} {key}", reseal)
                    if value is not None and value != item["sealed"]:
                        item["sealed"] = value
                        changed = True
            if changed:
                cursor.execute("UPDATE playbook_servers SET config = %s WHERE playbook_pk = %s "
                               "AND name = %s", (json.dumps(config), pk, name))
    connection.commit()


def _credentials(connection: Any, box: SecretBox, tally: Tally, reseal: bool) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT c.id, c.user_id, c.issuer, c.resource, c.access_token, "
                       "c.refresh_token, c.client_secret, u.email FROM "
                       "upstream_oauth_credentials c JOIN users u ON u.id = c.user_id")
        for row in cursor.fetchall():
            cid, user_id, issuer, resource, *sealed, email = row
            values = []
            for value, what in zip(sealed, ("access", "refresh", "client-secret"), strict=True):
                values.append(None if value is None else tally.open(
                    box, value, store.credential_context(user_id, issuer, resource, what),
                    f"{email}: {resource} ({issuer})", reseal))
            unreadable = any(v is None and s is not None
                             for v, s in zip(values, sealed, strict=True))
            if values != sealed and not unreadable:
                cursor.execute("UPDATE upstream_oauth_credentials SET access_token = %s, "
                               "refresh_token = %s, client_secret = %s WHERE id = %s",
                               (*values, cid))
        cursor.execute("SELECT id, issuer, client_id, client_secret FROM upstream_oauth_clients "
                       "WHERE client_secret IS NOT NULL")
        for cid, issuer, client_id, sealed_secret in cursor.fetchall():
            value = tally.open(box, sealed_secret, store.client_context(issuer, client_id),
                               f"client registration {client_id} at {issuer}", reseal)
            if value is not None and value != sealed_secret:
                cursor.execute("UPDATE upstream_oauth_clients SET client_secret = %s "
                               "WHERE id = %s", (value, cid))
    connection.commit()


def reseal_everything(connection: Any, box: SecretBox, reseal: bool = True) -> Tally:
    """Every sealed value opened; those of the previous secret sealed again (unless
    ``reseal`` is False: only counted). Flows under way are left to expire (15 minutes)."""
    tally = Tally()
    _servers(connection, box, tally, reseal)
    _credentials(connection, box, tally, reseal)
    return tally


def unreadable_credentials(connection: Any, box: SecretBox) -> list[str]:
    """The upstream OAuth credentials and client registrations no configured secret opens
    (for ``director doctor``), each named once."""
    tally = Tally()
    _credentials(connection, box, tally, reseal=False)
    return list(dict.fromkeys(tally.unreadable))
