"""``director playbooks …``: users' playbooks as YAML documents, on the database directly.

* ``list --user EMAIL`` — the user's playbooks;
* ``export ID --user EMAIL [--include-secrets] [-o FILE]`` — the document (standard output by
  default; a file written with secrets is made readable by its owner only);
* ``import FILE --user EMAIL [--dry-run]`` — create the playbook of the document's id, or make
  it exactly the document; an identical document changes nothing (no new version, no history
  entry). FILE ``-`` is standard input. ``--dry-run`` checks everything and says what would
  change;
* ``history ID --user EMAIL [--limit N]`` — the playbook's audit trail, newest first.

Imports are checked exactly as the API checks them: the same document parser
(``director.playbooks.documents``) and the same security rails, read from this command's
configuration (``DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS``,
``DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS``). Writes end with a NOTIFY, so running daemons
serve the new playbook within milliseconds.

Exit status: 0 done (also "nothing changed"); 2 invalid document or arguments (one line per
problem on standard error, ``FILE:LINE:COLUMN: path: message``); 1 anything else (no such user
or playbook, database unreachable, changed meanwhile); 78 invalid configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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
    settings_from,
    table,
    user_of,
    when,
)
from director.cli.owned import actor, box_of, lookup, owned

if TYPE_CHECKING:
    from director.accounts.store import User
    from director.config import Settings
    from director.db.interactions import Interaction
    from director.playbooks.documents import DocumentInvalid, ParsedPlaybook
    from director.playbooks.store import Playbook

HISTORY_LIMIT = 20
MAX_HISTORY_LIMIT = 1000


def check_rails_sync(settings: Settings, parsed: ParsedPlaybook) -> None:
    """Every server of the document; all refusals at once, located in the document."""
    from director.playbooks import documents, rails

    problems: dict[str, str] = {}
    for path, server in documents.iter_rail_paths(parsed):
        try:
            rails.check_server_sync(settings, server, path)
        except rails.RailViolation as violation:
            problems.update(violation.fields)
    if problems:
        raise parsed.invalid(problems)


def _with_registry(settings: Settings, parsed: ParsedPlaybook,
                   existing: Playbook | None) -> ParsedPlaybook:
    """Registry servers made whole from REGISTRY_URL's entries (or the stored ones)."""
    from director.cli.registry import with_registry
    from director.registry.client import RegistryError

    wanted = parsed.registry_lookups(existing)

    async def fetch(client: Any) -> dict[tuple[str, str], Any]:
        entries: dict[tuple[str, str], Any] = {}
        for name, version in wanted:
            try:
                entries[(name, version)] = await client.version(name, version)
            except RegistryError as error:
                entries[(name, version)] = str(error)
        return entries

    entries = with_registry(settings.registry_url, fetch) if wanted else {}
    return parsed.with_registry(existing, settings.registry_url, entries)


# --- plumbing --------------------------------------------------------------------------------


def _report_invalid(source: str, invalid: DocumentInvalid) -> int:
    for line in invalid.lines(source):
        print(line, file=sys.stderr)
    return EX_USAGE


def _read_document(name: str) -> tuple[str, bytes]:
    """``(name to report, bytes)``; reading stops just past the size limit."""
    from director.playbooks.documents import MAX_DOCUMENT_BYTES

    if name == "-":
        return "<stdin>", sys.stdin.buffer.read(MAX_DOCUMENT_BYTES + 1)
    try:
        with open(name, "rb") as handle:
            return name, handle.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as error:
        raise CommandError(f"cannot read {name}: {error.strerror or error}") from None


def _write_output(name: str, text: str, private: bool) -> None:
    if name == "-":
        sys.stdout.write(text)
        return
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            if private:
                os.fchmod(handle.fileno(), 0o600)
            handle.write(text)
    except OSError as error:
        raise CommandError(f"cannot write {name}: {error.strerror or error}") from None


# --- commands --------------------------------------------------------------------------------


def _summaries(user_id: UUID) -> Interaction[list[dict[str, Any]]]:
    from director.db.interactions import Query

    rows = yield Query(
        "SELECT p.id, p.name, p.description, p.position, p.version, p.created_at, "
        "p.updated_at, (SELECT count(*) FROM playbook_servers s WHERE s.playbook_pk = p.pk), "
        "(SELECT count(*) FROM playbook_prompts r WHERE r.playbook_pk = p.pk) "
        "FROM playbooks p WHERE p.user_id = %s", (str(user_id),))
    found = [{"id": playbook_id, "name": name, "description": description,
              "position": position, "version": version, "servers": servers,
              "prompts": prompts, "created_at": created, "updated_at": updated}
             for (playbook_id, name, description, position, version, created, updated, servers,
                  prompts) in rows]
    # The order the API lists them in (PlaybookCache.of_user).
    return sorted(found, key=lambda p: (p["position"], p["name"].lower(), p["id"]))


def _user_and_summaries(email: str) -> Interaction[tuple[User, list[dict[str, Any]]]]:
    user = yield from user_of(email)
    summaries = yield from _summaries(user.id)
    return user, summaries


@reports_failures
def cmd_list(arguments: argparse.Namespace) -> int:
    from director.accounts import store as accounts

    email = normalised_email(arguments.user, "user")
    with connection_for(arguments) as connection:
        try:
            user, playbooks = run(connection, _user_and_summaries(email))
        except accounts.NoSuchThing:
            raise no_user(email) from None
    if arguments.json:
        print_json({"user": {"id": str(user.id), "email": user.email}, "playbooks": [
            {**p, "created_at": p["created_at"].isoformat(),
             "updated_at": p["updated_at"].isoformat()} for p in playbooks]})
    elif not playbooks:
        print(f"{user.email} has no playbooks")
    else:
        table(("ID", "NAME", "VERSION", "SERVERS", "PROMPTS", "UPDATED"),
               [(p["id"], p["name"], str(p["version"]), str(p["servers"]), str(p["prompts"]),
                 when(p["updated_at"])) for p in playbooks])
    return 0


@reports_failures
def cmd_export(arguments: argparse.Namespace) -> int:
    from director.playbooks import documents

    email = normalised_email(arguments.user, "user")
    box = box_of(settings_from(arguments))
    with connection_for(arguments) as connection:
        _, playbook = owned(connection, email, box, arguments.id)
    text = documents.export_document(playbook, arguments.include_secrets)
    _write_output(arguments.output, text, private=arguments.include_secrets)
    if arguments.output != "-":
        print(f"wrote playbook '{playbook.id}' (version {playbook.version}) to "
              f"{arguments.output}" + (" with its secrets" if arguments.include_secrets else ""),
              file=sys.stderr)
    return 0


@reports_failures
def cmd_import(arguments: argparse.Namespace) -> int:
    from director.playbooks import documents, store

    email = normalised_email(arguments.user, "user")
    settings = settings_from(arguments)
    source, raw = _read_document(arguments.file)
    try:
        parsed = documents.parse_document(raw)  # before connecting: a bad file fails fast
    except documents.DocumentInvalid as invalid:
        return _report_invalid(source, invalid)
    box = box_of(settings)
    with connection_for(arguments) as connection:
        user, existing = lookup(connection, email, box, parsed.id)
        try:
            parsed = parsed.with_stored_secrets(existing)
            parsed = _with_registry(settings, parsed, existing)
            check_rails_sync(settings, parsed)
        except documents.DocumentInvalid as invalid:
            return _report_invalid(source, invalid)
        changes = documents.describe_changes(existing, parsed)
        version = existing.version if existing is not None else None
        if arguments.dry_run:
            result = "created" if existing is None else \
                "unchanged" if parsed.same_as(existing) else "updated"
        else:
            try:
                imported = run(connection, documents.import_playbook(
                    box, user.id, parsed, version, actor()))
            except store.VersionConflict as conflict:
                raise CommandError(f"playbook '{parsed.id}' changed while it was being "
                                   f"imported (now version {conflict.current}); import "
                                   "again") from None
            except (store.Duplicate, store.NoSuchPlaybook):
                raise CommandError(f"playbook '{parsed.id}' was created or deleted while it "
                                   "was being imported; import again") from None
            result, version = imported.result, imported.version
    if arguments.json:
        print_json({"result": result, "dry_run": arguments.dry_run, "id": parsed.id,
                     "version": version, "user": user.email, "changes": changes})
        return 0
    summary = documents.summarise_changes(changes)
    if arguments.dry_run:
        said = {"created": f"would create playbook '{parsed.id}' for {user.email}",
                "updated": f"would update playbook '{parsed.id}' of {user.email} "
                           f"(version {version})",
                "unchanged": f"playbook '{parsed.id}' of {user.email} is already exactly "
                             f"this (version {version}): importing would change nothing"}
        print(said[result] + ("" if result == "unchanged" else f": {summary}"))
    elif result == "unchanged":
        print(f"playbook '{parsed.id}' of {user.email} unchanged (version {version}): "
              "nothing to import")
    else:
        print(f"{result} playbook '{parsed.id}' of {user.email} (version {version}): {summary}")
    return 0


@reports_failures
def cmd_history(arguments: argparse.Namespace) -> int:
    from director.playbooks import store

    if not 1 <= arguments.limit <= MAX_HISTORY_LIMIT:
        raise CommandError(f"--limit must be from 1 to {MAX_HISTORY_LIMIT}", EX_USAGE)
    email = normalised_email(arguments.user, "user")
    box = box_of(settings_from(arguments))
    with connection_for(arguments) as connection:
        user, playbook = owned(connection, email, box, arguments.id)
        entries = run(connection, store.history(playbook.pk, arguments.limit))
    if arguments.json:
        print_json({"id": playbook.id, "user": user.email, "version": playbook.version,
                     "history": entries})
    elif not entries:
        print(f"playbook '{playbook.id}' has no history")
    else:
        table(("SEQ", "AT", "VERSION", "ACTION", "ACTOR", "DETAIL"),
               [(str(e["seq"]), e["at"], str(e["version"]), e["action"], e["actor"],
                 json.dumps(e["detail"], separators=(",", ":"))) for e in entries])
    return 0


# --- parser ----------------------------------------------------------------------------------


def add_commands(commands: Any) -> None:
    """Register ``playbooks`` on the ``director`` command's subparsers."""
    formatter = argparse.RawDescriptionHelpFormatter
    playbooks = commands.add_parser(
        "playbooks", help="list, export, import users' playbooks as YAML, and their history",
        formatter_class=formatter,
        description="Users' playbooks as YAML documents (schema: docs/playbook-yaml.rst).\n\n"
                    "Keeping playbooks in git:\n"
                    "  director playbooks export github --user a@example.com -o github.yaml\n"
                    "  $EDITOR github.yaml; git commit github.yaml\n"
                    "  director playbooks import github.yaml --user a@example.com --dry-run\n"
                    "  director playbooks import github.yaml --user a@example.com")
    actions = playbooks.add_subparsers(dest="playbooks_command", metavar="ACTION",
                                       required=True)

    listing = actions.add_parser("list", help="list a user's playbooks")
    listing.add_argument("--user", required=True, metavar="EMAIL")
    json_flag(listing)
    listing.set_defaults(handler=cmd_list)

    export = actions.add_parser(
        "export", help="write a playbook as YAML (secret values only with --include-secrets)")
    export.add_argument("id", metavar="ID", help="the playbook's id")
    export.add_argument("--user", required=True, metavar="EMAIL")
    export.add_argument("--include-secrets", action="store_true",
                        help="write secret values (otherwise {secret: true}, which an import "
                             "of the file leaves as stored)")
    export.add_argument("-o", "--output", default="-", metavar="FILE",
                        help="file to write (default: standard output)")
    export.set_defaults(handler=cmd_export)

    importing = actions.add_parser(
        "import", help="create or update a playbook from a YAML document",
        formatter_class=formatter,
        description="Create the user's playbook of the document's id, or make it exactly the\n"
                    "document. Everything is checked (document and security rails) before\n"
                    "anything is written; importing the same document again changes nothing.")
    importing.add_argument("file", metavar="FILE", help="the document ('-' for standard input)")
    importing.add_argument("--user", required=True, metavar="EMAIL")
    importing.add_argument("--dry-run", action="store_true",
                           help="check and say what would change, without writing")
    json_flag(importing)
    importing.set_defaults(handler=cmd_import)

    history = actions.add_parser("history", help="a playbook's changes, newest first")
    history.add_argument("id", metavar="ID", help="the playbook's id")
    history.add_argument("--user", required=True, metavar="EMAIL")
    history.add_argument("--limit", type=int, default=HISTORY_LIMIT, metavar="N",
                         help=f"at most N entries (default {HISTORY_LIMIT}, at most "
                              f"{MAX_HISTORY_LIMIT})")
    json_flag(history)
    history.set_defaults(handler=cmd_history)

    from director.cli import registry, upstream_oauth

    registry.add_playbook_commands(actions)
    upstream_oauth.add_authorize(actions)

