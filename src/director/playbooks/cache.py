"""Every playbook in memory, refreshed one at a time by NOTIFY, reloaded whole on reconnect.

Requests read playbooks from here (no SQL). A committed change anywhere arrives as
``playbook:<pk>:<version>``; an instance that already holds that version (the writer, which
refreshes before answering) skips it, others re-read just that playbook. Out-of-order reads
cannot roll a playbook back: an older version never replaces a newer one.

``subscribe(listener)`` is the hook for whoever must react to a change (open MCP sessions send
``list_changed``): ``listener(old, new)`` gets the previous and the current value, either of
which is None for a creation or a deletion.
"""

from __future__ import annotations

from collections.abc import Callable
from uuid import UUID

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from director.crypto import SecretBox, SecretUnreadable
from director.db.database import Database
from director.db.interactions import CHANGES_CHANNEL
from director.playbooks import store
from director.playbooks.store import Playbook

log = Logger(namespace="playbooks")

Listener = Callable[[Playbook | None, Playbook | None], object]


class PlaybookCache:
    def __init__(self, database: Database, box: SecretBox) -> None:
        self.database = database
        self.box = box
        self._by_pk: dict[UUID, Playbook] = {}
        self._by_owner: dict[tuple[UUID, str], UUID] = {}
        self._by_user: dict[UUID, set[UUID]] = {}
        self._listeners: list[Listener] = []
        self.loaded = False

    # --- reads ------------------------------------------------------------------------

    def get(self, user_id: UUID, playbook_id: str) -> Playbook | None:
        pk = self._by_owner.get((user_id, playbook_id))
        return self._by_pk.get(pk) if pk is not None else None

    def by_pk(self, pk: UUID) -> Playbook | None:
        return self._by_pk.get(pk)

    def of_user(self, user_id: UUID) -> list[Playbook]:
        mine = [self._by_pk[pk] for pk in self._by_user.get(user_id, ())]
        return sorted(mine, key=lambda p: (p.position, p.name.lower(), p.id))

    def __len__(self) -> int:
        return len(self._by_pk)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    # --- loading ----------------------------------------------------------------------

    async def start(self) -> None:
        await self.database.listen(CHANGES_CHANNEL, self._notified)
        self.database.on_reconnect(self.reload)
        await self.reload()

    async def reload(self) -> None:
        playbooks = await self.database.run(store.load_all(self.box))
        previous = self._by_pk
        self._by_pk = {p.pk: p for p in playbooks}
        self._by_owner = {(p.user_id, p.id): p.pk for p in playbooks}
        self._by_user = {}
        for playbook in playbooks:
            self._by_user.setdefault(playbook.user_id, set()).add(playbook.pk)
        self.loaded = True
        log.info("playbook cache loaded: {count} playbooks", count=len(playbooks))
        for pk in previous.keys() | self._by_pk.keys():
            old, new = previous.get(pk), self._by_pk.get(pk)
            if old is None or new is None or old.version != new.version:
                self._tell(old, new)

    def _notified(self, channel: str, payload: str) -> None:
        kind, _, rest = payload.partition(":")
        if kind != "playbook":
            return
        key, _, version = rest.partition(":")
        try:
            pk, number = UUID(key), int(version)
        except ValueError:
            return
        cached = self._by_pk.get(pk)
        if cached is not None and cached.version >= number:
            return
        d = defer.ensureDeferred(self.refresh(pk))
        d.addErrback(self._refresh_failed, pk)

    def _refresh_failed(self, failure: Failure, pk: UUID) -> None:
        if failure.check(SecretUnreadable):
            # Another instance sealed it with a secret this one lacks: a rotation half done,
            # or instances configured apart. The operator's to fix; no traceback to read.
            log.error("playbook {pk} changed, but this instance cannot open its stored "
                      "secrets ({reason}); it keeps serving the copy it had. Every instance "
                      "needs the same BETTER_AUTH_SECRET: during a rotation, restart the "
                      "instances still on the old one (docs/manual.rst, \"Changing the "
                      "secret\")", pk=str(pk), reason=str(failure.value))
            return
        log.failure("refreshing playbook {pk} failed", failure, pk=str(pk))

    async def refresh(self, pk: UUID) -> Playbook | None:
        """Re-read one playbook now (the writer calls this before answering)."""
        fresh = await self.database.run(store.load(self.box, pk))
        old = self._by_pk.get(pk)
        if fresh is None:
            if old is not None:
                del self._by_pk[pk]
                self._by_owner.pop((old.user_id, old.id), None)
                self._by_user.get(old.user_id, set()).discard(pk)
                self._tell(old, None)
            return None
        if old is not None and old.version >= fresh.version:
            return old  # a newer read already landed
        self._by_pk[pk] = fresh
        if old is not None and old.id != fresh.id:
            self._by_owner.pop((old.user_id, old.id), None)
        self._by_owner[(fresh.user_id, fresh.id)] = pk
        self._by_user.setdefault(fresh.user_id, set()).add(pk)
        self._tell(old, fresh)
        return fresh

    def _tell(self, old: Playbook | None, new: Playbook | None) -> None:
        for listener in list(self._listeners):
            try:
                listener(old, new)
            except Exception:
                log.failure("a playbook change listener failed")
