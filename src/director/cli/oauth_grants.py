"""``director oauth grants list|revoke``: Connected apps for operators.

A grant is what a user allowed an MCP client (by OAuth) on one playbook. Revoking one here
deletes it in the database; the NOTIFY that follows makes every running daemon drop its tokens
and end the MCP sessions it opened within a second, as revoking in the Studio or the API does.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any
from uuid import UUID

from director.cli.base import (
    EX_USAGE,
    CommandError,
    connection_for,
    json_flag,
    no_user,
    normalised_email,
    print_json,
    reports_failures,
    run,
    table,
    user_of,
    when,
)

if TYPE_CHECKING:
    from director.accounts.store import User
    from director.db.interactions import Interaction
    from director.oauth.server.grants import GrantInfo


def _grants_of(email: str) -> Interaction[tuple[User, list[GrantInfo]]]:
    from director.oauth.server import grants

    user = yield from user_of(email)
    found = yield from grants.grants_of(user.id)
    return user, found


@reports_failures
def cmd_grants_list(arguments: argparse.Namespace) -> int:
    from director.accounts import store

    email = normalised_email(arguments.user, "user")
    with connection_for(arguments) as connection:
        try:
            user, found = run(connection, _grants_of(email))
        except store.NoSuchThing:
            raise no_user(email) from None
    if arguments.json:
        print_json({"user": {"id": str(user.id), "email": user.email},
                     "grants": [grant.public() for grant in found]})
    elif not found:
        print(f"{user.email} has no connected apps")
    else:
        table(("ID", "APPLICATION", "KIND", "PLAYBOOK", "SCOPE", "CONNECTED", "REFRESHED"),
               [(str(g.id), g.client_name or g.client_id, g.client_kind, g.playbook_id,
                 g.scope, when(g.created_at), when(g.refreshed_at)) for g in found])
    return 0


def _revoke(email: str, grant_id: UUID | None, client_id: str | None
            ) -> Interaction[tuple[User, list[UUID]]]:
    from director.oauth.server import grants

    user = yield from user_of(email)
    if client_id is not None:
        return user, (yield from grants.revoke_client(user.id, client_id))
    assert grant_id is not None
    try:
        yield from grants.revoke_grant(user.id, grant_id)
    except grants.NoSuchGrant:
        return user, []
    return user, [grant_id]


@reports_failures
def cmd_grants_revoke(arguments: argparse.Namespace) -> int:
    from director.accounts import store

    email = normalised_email(arguments.user, "user")
    if (arguments.grant is None) == (arguments.client is None):
        raise CommandError("name one grant (its id) or --client CLIENT_ID (all of that "
                           "application's grants)", EX_USAGE)
    grant_id = None
    if arguments.grant is not None:
        try:
            grant_id = UUID(arguments.grant)
        except ValueError:
            raise CommandError(f"'{arguments.grant}' is not a grant id (a UUID from "
                               "`director oauth grants list`)", EX_USAGE) from None
    with connection_for(arguments) as connection:
        try:
            user, revoked = run(connection, _revoke(email, grant_id, arguments.client))
        except store.NoSuchThing:
            raise no_user(email) from None
    if not revoked:
        what = f"grant {arguments.grant}" if grant_id else f"grant of client {arguments.client}"
        raise CommandError(f"{user.email} has no {what}")
    if arguments.json:
        print_json({"revoked": [str(grant) for grant in revoked]})
    else:
        for grant in revoked:
            print(f"revoked grant {grant} of {user.email}: its tokens stop working and the "
                  "MCP sessions it opened end")
    return 0


def add_commands(commands: Any) -> None:
    oauth = commands.add_parser(
        "oauth", help="connected apps: what users allowed MCP clients through OAuth",
        description="Grants users gave MCP clients by signing in with OAuth; revoking one "
                    "signs the client out of every running daemon within a second.")
    oauth_commands = oauth.add_subparsers(dest="oauth_command", metavar="WHAT", required=True)
    grants = oauth_commands.add_parser("grants", help="list or revoke a user's grants")
    actions = grants.add_subparsers(dest="grants_command", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="a user's grants, oldest first")
    listing.add_argument("--user", required=True, metavar="EMAIL")
    json_flag(listing)
    listing.set_defaults(handler=cmd_grants_list)

    revoke = actions.add_parser("revoke", help="revoke a grant, or every grant of one client")
    revoke.add_argument("--user", required=True, metavar="EMAIL")
    revoke.add_argument("grant", metavar="GRANT_ID", nargs="?", help="from `grants list`")
    revoke.add_argument("--client", metavar="CLIENT_ID",
                        help="revoke every grant the user gave this client instead")
    json_flag(revoke)
    revoke.set_defaults(handler=cmd_grants_revoke)
