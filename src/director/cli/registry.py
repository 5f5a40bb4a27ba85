"""``director registry search|show`` and ``director playbooks install|update-server|
remove-server``: the registry from the command line, on the database directly.

* ``registry search [QUERY] [--limit N] [--cursor C]`` — servers of ``REGISTRY_URL``;
* ``registry show NAME [--version V]`` — one entry: its versions, and each package and remote
  (installable or why not) with the inputs it asks for (field ids for ``--input``);
* ``playbooks install PLAYBOOK NAME --user EMAIL [--version V] [--choice package:0]
  [--server-name N] [--input ID=VALUE]… [--inputs-file FILE]`` — install the entry as a server
  of the user's playbook. Secret values belong in ``--inputs-file`` (a JSON object of field
  ids and values), not on a command line that ``ps`` shows;
* ``playbooks update-server PLAYBOOK SERVER --user EMAIL [--version V] [--input …]`` — move a
  registry server to another version (default: the latest), keeping its inputs;
* ``playbooks remove-server PLAYBOOK SERVER --user EMAIL``.

The registry is read with the daemon's own client (``director.registry.client``: the same
limits, the same errors), the result checked by the same code and rails as the API's, and
written with a NOTIFY so running daemons serve it at once. Exit status: 0 done, 2 invalid
arguments or inputs (one line per problem), 1 anything else (registry unreachable, no such
user, playbook or entry).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from director.cli.base import (
    EX_USAGE,
    CommandError,
    connection_for,
    json_flag,
    normalised_email,
    print_json,
    reports_failures,
    run,
    settings_from,
    table,
)

if TYPE_CHECKING:
    from director.registry.client import RegistryClient


def with_registry(url: str, work: Callable[[RegistryClient], Coroutine[Any, Any, Any]]) -> Any:
    """Run ``work`` with a client of ``url`` on a reactor of its own (once per process)."""
    from twisted.internet import defer
    from twisted.internet import reactor as installed

    reactor: Any = installed

    from director.registry.client import RegistryClient, RegistryError

    outcome: dict[str, Any] = {}

    async def main() -> None:
        client = RegistryClient(url, reactor)
        try:
            outcome["value"] = await work(client)
        except RegistryError as error:
            outcome["error"] = str(error)
        finally:
            await client.close()

    def stop(result: object) -> object:
        reactor.callWhenRunning(reactor.stop)
        return result

    done = defer.ensureDeferred(main())
    done.addBoth(stop)
    done.addErrback(lambda failure: outcome.setdefault("failure", failure))
    reactor.run(installSignalHandlers=False)
    if "error" in outcome:
        raise CommandError(outcome["error"])
    if "failure" in outcome:
        outcome["failure"].raiseException()
    return outcome["value"]


def _inputs(arguments: argparse.Namespace) -> dict[str, str]:
    values: dict[str, str] = {}
    if arguments.inputs_file:
        try:
            with open(arguments.inputs_file, encoding="utf-8") as handle:
                loaded = json.load(handle)
        except (OSError, ValueError) as error:
            raise CommandError(f"--inputs-file {arguments.inputs_file}: {error}", EX_USAGE) \
                from None
        if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
            raise CommandError(f"--inputs-file {arguments.inputs_file}: must be a JSON object "
                               "of field ids and string values", EX_USAGE)
        values |= loaded
    for item in arguments.input or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CommandError(f"--input {item.split('=')[0]!r}: write ID=VALUE", EX_USAGE)
        values[key] = value
    return values


# --- registry search | show ------------------------------------------------------------------


@reports_failures
def cmd_search(arguments: argparse.Namespace) -> int:
    from director.registry import catalogue

    settings = settings_from(arguments)
    page = with_registry(settings.registry_url, lambda client: client.search(
        arguments.query, arguments.cursor, arguments.limit))
    if arguments.json:
        print_json({"registry": settings.registry_url,
                     "items": [catalogue.entry_json(entry) for entry in page.entries],
                     "next_cursor": page.next_cursor, "skipped": page.skipped})
        return 0
    if not page.entries:
        print(f"no server of {settings.registry_url} matches {arguments.query!r}")
    else:
        table(("NAME", "VERSION", "DESCRIPTION"),
               [(entry.name, entry.version, " ".join(entry.description.split())[:80])
                for entry in page.entries])
    if page.next_cursor:
        print(f"more: --cursor {page.next_cursor}")
    return 0


@reports_failures
def cmd_show(arguments: argparse.Namespace) -> int:
    from director.registry import catalogue, install

    settings = settings_from(arguments)
    if not catalogue.valid_name(arguments.name):
        raise CommandError(f"{arguments.name!r} is not a registry server name "
                           "(namespace/name)", EX_USAGE)

    async def fetch(client: RegistryClient) -> Any:
        return (await client.version(arguments.name, arguments.version),
                await client.versions(arguments.name))

    entry, versions = with_registry(settings.registry_url, fetch)
    found = install.options(entry)
    if arguments.json:
        print_json(catalogue.entry_json(entry) | {
            "versions": [version.version for version in reversed(versions)],
            "options": [install.option_json(option) for option in found]})
        return 0
    print(f"{entry.name} {entry.version}" + (f" — {entry.title}" if entry.title else ""))
    if entry.description:
        print(entry.description)
    print("versions: " + ", ".join(version.version for version in reversed(versions)))
    for option in found:
        print(f"\n{option.choice}: {option.label}")
        if option.problem is not None:
            print(f"  cannot be installed: {option.problem}")
            continue
        for field in option.fields:
            notes = [word for word, on in (("required", field.required),
                                           ("secret", field.secret)) if on]
            if field.default is not None:
                notes.append(f"default {field.default!r}")
            if field.choices:
                notes.append("one of " + ", ".join(field.choices))
            if field.format != "string":
                notes.append(field.format)
            print(f"  --input {field.id}=…" + (f"  ({'; '.join(notes)})" if notes else "")
                  + (f"\n      {field.description}" if field.description else ""))
    return 0


# --- playbooks install | update-server | remove-server ----------------------------------------


def _write(arguments: argparse.Namespace, change: Callable[..., Any]) -> Any:
    from director.cli.owned import actor, box_of, owned
    from director.playbooks import store

    settings = settings_from(arguments)
    box = box_of(settings)
    with connection_for(arguments) as connection:
        user, playbook = owned(connection, normalised_email(arguments.user, "user"), box,
                                arguments.playbook)
        try:
            return user, playbook, change(settings, connection, box, playbook, actor())
        except store.VersionConflict:
            raise CommandError(f"playbook '{playbook.id}' changed meanwhile; run the command "
                               "again") from None
        except store.NoSuchPart:
            raise CommandError(f"playbook '{playbook.id}' has no server "
                               f"'{arguments.server}'") from None


def _report(arguments: argparse.Namespace, said: str, server: Any) -> None:
    from director.playbooks import model

    if arguments.json:
        print_json(model.server_json(server))
    else:
        print(said)


@reports_failures
def cmd_install(arguments: argparse.Namespace) -> int:
    from director.playbooks import model, rails, store
    from director.registry import catalogue, install

    if not catalogue.valid_name(arguments.name):
        raise CommandError(f"{arguments.name!r} is not a registry server name "
                           "(namespace/name)", EX_USAGE)
    inputs = _inputs(arguments)
    settings = settings_from(arguments)
    server_name = model.server_name(arguments.server_name or install.suggested_name(
        arguments.name), "--server-name")
    entry = with_registry(settings.registry_url, lambda client: client.version(
        arguments.name, arguments.version))
    server = install.installed(settings.registry_url, entry, arguments.choice, server_name,
                               inputs)
    rails.check_server_sync(settings, server)

    def add(settings: Any, connection: Any, box: Any, playbook: Any, actor: str) -> Any:
        try:
            return run(connection, store.add_server(box, playbook.pk, server, playbook.version,
                                                    actor))
        except store.Duplicate:
            raise CommandError(f"playbook '{playbook.id}' already has a server "
                               f"'{server.name}'; give --server-name") from None

    user, playbook, version = _write(arguments, add)
    _report(arguments, f"installed {entry.name} {entry.version} as server '{server.name}' of "
                       f"playbook '{playbook.id}' of {user.email} (version {version})", server)
    return 0


@reports_failures
def cmd_update_server(arguments: argparse.Namespace) -> int:
    from director.playbooks import rails, store
    from director.registry import install

    inputs = _inputs(arguments)
    outcome: dict[str, Any] = {}

    def update(settings: Any, connection: Any, box: Any, playbook: Any, actor: str) -> Any:
        current = playbook.server(arguments.server)
        if current is None:
            raise store.NoSuchPart(arguments.server)
        if current.registry is None:
            raise CommandError(f"server '{current.name}' was not installed from a registry")
        entry = with_registry(settings.registry_url, lambda client: client.version(
            current.registry.name, arguments.version))
        server = install.updated(settings.registry_url, entry, current, inputs)
        rails.check_server_sync(settings, server)
        outcome.update(server=server, previous=current.registry.version)
        return run(connection, store.replace_servers(
            box, playbook.pk, [(current.name, server)], playbook.version, actor,
            action="update_from_registry"))

    _, playbook, version = _write(arguments, update)
    server = outcome["server"]
    assert server.registry is not None
    _report(arguments, f"updated server '{server.name}' of playbook '{playbook.id}' from "
                       f"{outcome['previous']} to {server.registry.version} (version {version})",
            server)
    return 0


@reports_failures
def cmd_remove_server(arguments: argparse.Namespace) -> int:
    from director.playbooks import store

    def remove(settings: Any, connection: Any, box: Any, playbook: Any, actor: str) -> Any:
        return run(connection, store.remove_server(playbook.pk, arguments.server,
                                                   playbook.version, actor))

    user, playbook, version = _write(arguments, remove)
    if arguments.json:
        print_json({"removed": arguments.server, "playbook": playbook.id, "version": version})
    else:
        print(f"removed server '{arguments.server}' from playbook '{playbook.id}' of "
              f"{user.email} (version {version})")
    return 0


# --- parsers -----------------------------------------------------------------------------------


def _input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", action="append", metavar="ID=VALUE",
                        help="an input (field ids: `director registry show NAME`); repeat")
    parser.add_argument("--inputs-file", metavar="FILE",
                        help="a JSON object of field ids and values (for secrets)")


def add_commands(commands: Any) -> None:
    """Register ``registry`` on the ``director`` command's subparsers."""
    registry = commands.add_parser("registry", help="find servers in the MCP Registry "
                                                    "(REGISTRY_URL)")
    actions = registry.add_subparsers(dest="registry_command", metavar="ACTION", required=True)
    search = actions.add_parser("search", help="servers whose name matches QUERY")
    search.add_argument("query", nargs="?", default="", metavar="QUERY")
    search.add_argument("--limit", type=int, default=30, choices=range(1, 101), metavar="N")
    search.add_argument("--cursor", metavar="CURSOR", help="the next page (from a search)")
    json_flag(search)
    search.set_defaults(handler=cmd_search)
    show = actions.add_parser("show", help="one entry: versions, packages, remotes, inputs")
    show.add_argument("name", metavar="NAME", help="namespace/name, e.g. io.github.acme/tool")
    show.add_argument("--version", default="latest")
    json_flag(show)
    show.set_defaults(handler=cmd_show)


def add_playbook_commands(actions: Any) -> None:
    """Register ``install``, ``update-server`` and ``remove-server`` under ``playbooks``."""
    installing = actions.add_parser("install", help="install a registry entry into a playbook")
    installing.add_argument("playbook", metavar="PLAYBOOK", help="the playbook's id")
    installing.add_argument("name", metavar="NAME", help="the registry entry (namespace/name)")
    installing.add_argument("--user", required=True, metavar="EMAIL")
    installing.add_argument("--version", default="latest")
    installing.add_argument("--choice", metavar="package:N|remote:N",
                            help="which package or remote (default: the first installable)")
    installing.add_argument("--server-name", metavar="NAME",
                            help="the server's name in the playbook (default: from NAME)")
    _input_options(installing)
    json_flag(installing)
    installing.set_defaults(handler=cmd_install)

    updating = actions.add_parser("update-server",
                                  help="move a registry server to another version")
    updating.add_argument("playbook", metavar="PLAYBOOK")
    updating.add_argument("server", metavar="SERVER")
    updating.add_argument("--user", required=True, metavar="EMAIL")
    updating.add_argument("--version", default="latest")
    _input_options(updating)
    json_flag(updating)
    updating.set_defaults(handler=cmd_update_server)

    removing = actions.add_parser("remove-server", help="remove a server from a playbook")
    removing.add_argument("playbook", metavar="PLAYBOOK")
    removing.add_argument("server", metavar="SERVER")
    removing.add_argument("--user", required=True, metavar="EMAIL")
    json_flag(removing)
    removing.set_defaults(handler=cmd_remove_server)

