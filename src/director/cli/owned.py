"""What the commands that act on one user's playbook share: the box that opens its sealed
secrets, the name the audit trail records, and finding the user's playbook by id."""

from __future__ import annotations

import getpass
from typing import TYPE_CHECKING, Any

from director.cli.base import CommandError, no_user, run, user_of

if TYPE_CHECKING:
    from director.accounts.store import User
    from director.config import Settings
    from director.crypto import SecretBox
    from director.db.interactions import Interaction
    from director.playbooks.store import Playbook


def box_of(settings: Settings) -> SecretBox:
    from director import state
    from director.crypto import SecretBox

    try:
        return SecretBox(state.auth_secret(settings), settings.auth_secret_previous)
    except OSError as error:
        raise CommandError(f"cannot read the secret that seals stored secrets "
                           f"({settings.state_directory}): {error.strerror}") from None


def actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):
        return "cli"


def _user_and_playbook(email: str, box: SecretBox,
                       playbook_id: str) -> Interaction[tuple[User, Playbook | None]]:
    from director.playbooks import store

    user = yield from user_of(email)
    pk = yield from store.find_pk(user.id, playbook_id)
    playbook = (yield from store.load(box, pk)) if pk is not None else None
    return user, playbook


def lookup(connection: Any, email: str, box: SecretBox,
            playbook_id: str) -> tuple[User, Playbook | None]:
    from director.accounts import store as accounts
    from director.crypto import SecretUnreadable

    try:
        found: tuple[User, Playbook | None] = run(
            connection, _user_and_playbook(email, box, playbook_id))
        return found
    except accounts.NoSuchThing:
        raise no_user(email) from None
    except SecretUnreadable as error:
        raise CommandError(str(error)) from None


def owned(connection: Any, email: str, box: SecretBox,
          playbook_id: str) -> tuple[User, Playbook]:
    user, playbook = lookup(connection, email, box, playbook_id)
    if playbook is None:
        raise CommandError(f"{user.email} has no playbook '{playbook_id}'")
    return user, playbook


