"""``director playbooks authorize`` and ``director secrets rotate``.

``director playbooks authorize PLAYBOOK SERVER --user EMAIL`` is for hosts without a browser:
it starts the authorization exactly as the Studio's Connect button does (discovery, client
identity, a flow stored in the database), prints the authorize URL, and waits until the flow
ends — the user opens the URL in a browser signed in to Director, and the callback, on
whichever instance it reaches, records the outcome, which this command reads. Exit status 0
when authorized, 1 when refused, failed or expired.

``director secrets rotate`` seals again, with ``BETTER_AUTH_SECRET``, every value still sealed
with ``BETTER_AUTH_SECRET_PREVIOUS`` (``maintenance``); afterwards the previous secret can be
removed. Exit status 1 when some value opens with neither (it is named, never shown).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from director.cli.base import CommandError, settings_from

#: How long ``authorize`` waits by default (the flow's own life).
WAIT_SECONDS = 15 * 60
POLL_SECONDS = 1.0


def _in_reactor(work: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
    """Run ``work(reactor)`` on the reactor (once per process: a command's whole life)."""
    from twisted.internet import defer
    from twisted.internet import reactor as installed
    from twisted.python.failure import Failure

    reactor: Any = installed
    outcome: list[Any] = []

    def start() -> None:
        done: defer.Deferred[Any] = defer.ensureDeferred(work(reactor))
        done.addBoth(outcome.append)
        done.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if not outcome:
        raise CommandError("interrupted")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def cmd_authorize(arguments: argparse.Namespace) -> int:
    from director.cli.base import connection_for, normalised_email
    from director.cli.owned import box_of, owned

    settings = settings_from(arguments)
    email = normalised_email(arguments.user, "user")
    box = box_of(settings)
    with connection_for(arguments) as connection:
        user, playbook = owned(connection, email, box, arguments.id)
        server = playbook.server(arguments.server)
        if server is None:
            raise CommandError(f"playbook '{playbook.id}' has no server '{arguments.server}'")
        if server.type not in ("http", "sse"):
            raise CommandError(f"'{server.name}' is a stdio server: only HTTP servers are "
                               "authorized with OAuth")
        entered = {"client_id": arguments.client_id,
                   "client_secret": _read_secret(arguments.client_secret_file)} \
            if arguments.client_id else None
        started = _in_reactor(lambda reactor: _begin(reactor, settings, connection, box,
                                                     user.id, playbook, server, entered))
        print(started.authorize_url, flush=True)
        if arguments.no_wait:
            return 0
        print(f"open this URL in a browser signed in to Director as {user.email}; waiting for "
              f"the authorization (at most {arguments.timeout:g} s)…", file=sys.stderr,
              flush=True)
        outcome = _wait(connection, started.state_hash, user.id, arguments.timeout)
    if outcome != "authorized":
        raise CommandError(f"'{server.name}' was not authorized: {outcome}")
    print(f"authorized: '{server.name}' of playbook '{playbook.id}'", file=sys.stderr)
    return 0


def _read_secret(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip() or None
    except OSError as error:
        raise CommandError(f"cannot read the client secret from {path}: {error.strerror}") \
            from None


async def _begin(reactor: Any, settings: Any, connection: Any, box: Any, user_id: Any,
                 playbook: Any, server: Any, entered: dict[str, Any] | None) -> Any:
    from director.cli.base import run
    from director.mcp.upstream.connect import CheckedEndpoints
    from director.mcp.upstream.http_plumbing import new_pool, upstream_agent
    from director.oauth.client import flow, store
    from director.oauth.client.fetch import Fetcher, FetchError
    from director.oauth.client.identity import manual_client

    async def run_now(interaction: Any) -> Any:
        return run(connection, interaction)

    pool = new_pool(reactor, endpoints=CheckedEndpoints(
        reactor, allow_insecure=settings.allow_insecure_http_servers))
    fetcher = Fetcher(reactor, upstream_agent(reactor, pool),
                      allow_insecure=settings.allow_insecure_http_servers)
    context = flow.FlowContext(fetcher, run_now, box, settings.base_url)
    try:
        known = {found.server_url: found for found in run(connection, store.load_discoveries())}
        found = await flow.discovered(context, server, known.get(server.url))
        current = next((opened.credential for opened in
                        run(connection, store.load_credentials(box))
                        if (opened.credential.user_id, opened.credential.issuer,
                            opened.credential.resource) == (user_id, found.issuer,
                                                            found.resource)), None)
        client = manual_client(entered.get("client_id"), entered.get("client_secret"), found) \
            if entered else None
        return await flow.begin(context, user_id=user_id, playbook_pk=playbook.pk,
                                playbook_id=playbook.id, server=server, found=found,
                                entered=client, current=current)
    except (FetchError, ValueError) as failure:
        raise CommandError(str(failure)) from None
    finally:
        await pool.closeCachedConnections()


def _wait(connection: Any, state_hash: bytes, user_id: Any, timeout: float) -> str:
    """The flow's outcome once it has one: "authorized", or why not."""
    from director.cli.base import run
    from director.oauth.client import store

    deadline = time.monotonic() + timeout
    while True:
        found = run(connection, store.flow_outcome(state_hash, user_id))
        if found is None:
            return "the authorization is gone (the playbook or the user was deleted?)"
        outcome, expired = found
        if outcome is not None:
            return str(outcome)
        if expired:
            return "the authorize URL expired before the browser came back"
        if time.monotonic() > deadline:
            return f"no answer within {timeout:g} s (the URL stays usable until it expires)"
        time.sleep(POLL_SECONDS)


def cmd_secrets_rotate(arguments: argparse.Namespace) -> int:
    from director.cli.base import connection_for
    from director.cli.owned import box_of
    from director.oauth.client.maintenance import reseal_everything

    settings = settings_from(arguments)
    if settings.auth_secret_previous is None:
        print("BETTER_AUTH_SECRET_PREVIOUS is unset: values sealed with another secret cannot "
              "be opened; checking that every value opens with BETTER_AUTH_SECRET",
              file=sys.stderr)
    with connection_for(arguments) as connection:
        tally = reseal_everything(connection, box_of(settings), reseal=not arguments.dry_run)
    verb = "would seal" if arguments.dry_run else "sealed"
    print(f"{verb} {tally.resealed} value(s) again with BETTER_AUTH_SECRET; {tally.current} "
          f"already were; {len(tally.unreadable)} open with neither secret")
    for label in tally.unreadable[:20]:
        print(f"  unreadable: {label}", file=sys.stderr)
    if tally.unreadable:
        raise CommandError(f"{len(tally.unreadable)} stored value(s) open with neither "
                           "BETTER_AUTH_SECRET nor BETTER_AUTH_SECRET_PREVIOUS: put back the "
                           "secret they were sealed with; lost upstream OAuth tokens only need "
                           "their users to authorize again")
    return 0


def add_authorize(actions: Any) -> None:
    """``authorize`` on ``director playbooks``' subparsers."""
    authorize = actions.add_parser(
        "authorize", help="authorize an HTTP server behind OAuth for the user (prints the URL "
                          "to open, then waits)")
    authorize.add_argument("id", metavar="PLAYBOOK", help="the playbook's id")
    authorize.add_argument("server", metavar="SERVER", help="the server's name")
    authorize.add_argument("--user", required=True, metavar="EMAIL")
    authorize.add_argument("--client-id", metavar="ID",
                           help="a client id the authorization server gave you (for servers "
                                "without dynamic registration or client metadata documents)")
    authorize.add_argument("--client-secret-file", metavar="FILE",
                           help="a file holding that client's secret (not on the command line)")
    authorize.add_argument("--no-wait", action="store_true",
                           help="print the URL and return at once")
    authorize.add_argument("--timeout", type=float, default=WAIT_SECONDS, metavar="SECONDS",
                           help=f"how long to wait (default {WAIT_SECONDS})")
    authorize.set_defaults(handler=_failures_reported(cmd_authorize))


def add_commands(commands: Any) -> None:
    """``director secrets``."""
    secrets = commands.add_parser("secrets", help="values sealed at rest")
    actions = secrets.add_subparsers(dest="secrets_command", metavar="ACTION", required=True)
    rotate = actions.add_parser(
        "rotate", help="seal again with BETTER_AUTH_SECRET everything still sealed with "
                       "BETTER_AUTH_SECRET_PREVIOUS",
        description="After changing BETTER_AUTH_SECRET (the old one kept as "
                    "BETTER_AUTH_SECRET_PREVIOUS): seal every stored secret again with the new "
                    "one, so that the previous secret can be removed. Safe to run while daemons "
                    "serve, and again.")
    rotate.add_argument("--dry-run", action="store_true", help="only count")
    rotate.set_defaults(handler=_failures_reported(cmd_secrets_rotate))


def _failures_reported(handler: Callable[[argparse.Namespace], int]
                       ) -> Callable[[argparse.Namespace], int]:
    from director.cli.base import reports_failures

    return reports_failures(handler)
