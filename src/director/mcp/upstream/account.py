"""Which account a stdio server runs as, and the home directory it gets.

A stdio child never runs as root. A daemon started as root without the systemd sandbox
(``director.sandbox``: the account mode) runs every stdio server as ``STDIO_USER`` (default
``nobody``): its uid and primary gid, with no supplementary groups (``sandbox.chain.launch_argv``
drops them with ``setpriv --reuid --regid --clear-groups``), and with ``HOME`` set to
``/var/tmp/director-stdio-<uid>``, a directory of its own that the daemon creates mode 0700
outside the state directory (so the child cannot reach the daemon's secret or its database)
and refuses to use when it is a symlink or belongs to another account.
``/var/tmp`` rather than ``/tmp``: npm and uv caches survive a reboot there; systemd's
tmpfiles may still clean it after 30 days, which is why it is checked before every spawn.

``STDIO_USER`` must not be the private PostgreSQL cluster's account: that cluster trusts
every connection on its unix socket (``trust`` authentication, guarded only by the socket
directory's owner), so a child running as that account would have the whole database. The
service refuses to start with such a pair (``clashes_with_database``).

A daemon that is not root cannot switch accounts: its children run as itself, as before, and
the start logs that they can then read whatever the daemon can.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import stat

import attrs

HOME_PARENT = "/var/tmp"  # noqa: S108 - a per-account directory, created safely below


class AccountError(Exception):
    """The account's home directory cannot be used; the message says why and what to do."""


@attrs.frozen
class StdioAccount:
    """The identity a stdio child is given (when the daemon runs as root)."""

    name: str
    uid: int
    gid: int

    @property
    def home(self) -> str:
        return f"{HOME_PARENT}/director-stdio-{self.uid}"

    def environment(self) -> dict[str, str]:
        """The identity variables a child of this account starts with."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}


def stdio_account(user: str, euid: int | None = None) -> StdioAccount | None:
    """The account stdio children run as; None when the daemon is not root (they run as it).

    ``user`` is ``Settings.stdio_user``, which the configuration checked exists and is not
    root; it is looked up again here because the account database may have changed since."""
    if (os.geteuid() if euid is None else euid) != 0:
        return None
    entry = pwd.getpwnam(user)
    if entry.pw_uid == 0:
        raise AccountError(f"STDIO_USER={user} is root (uid 0); use an unprivileged account")
    return StdioAccount(entry.pw_name, entry.pw_uid, entry.pw_gid)


def clashes_with_database(account: StdioAccount | None, database_uid: int | None) -> bool:
    """True when stdio children would run as the private cluster's account (see above)."""
    return account is not None and database_uid is not None and account.uid == database_uid


def _unusable(path: str, failure: OSError) -> str:
    """Why ``path`` could not be opened as a directory without following a symlink."""
    if failure.errno in (errno.ELOOP, errno.ENOTDIR):
        with contextlib.suppress(OSError):
            if stat.S_ISLNK(os.lstat(path).st_mode):
                return "is a symlink"
        return "is not a directory"
    return f"cannot be opened ({failure.strerror})"


def prepare_home(account: StdioAccount) -> str:
    """Create (0700, owned by the account) or check the account's home; its path.

    ``/var/tmp`` is writable by everyone (sticky): anyone could have put a symlink or a
    directory of their own there first, so nothing is followed and ownership is checked on
    the opened directory itself."""
    return own_directory(account.home, 0o700, account.uid, account.gid,
                         f"as HOME for {account.name}")


def own_directory(path: str, mode: int, uid: int, gid: int, what: str) -> str:
    """Create ``path`` (``mode``, given to ``uid``:``gid`` when we are root) or check it: a
    directory, not a symlink, owned by ``uid``, with ``mode`` put back; ``AccountError`` (whose
    message ends with the fix) otherwise. ``what`` says what the directory is for."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    except OSError as failure:
        raise AccountError(f"cannot create {path} {what}: {failure.strerror}") from None
    else:
        if os.geteuid() == 0:
            # Created by root just now, in a directory nobody else can swap it in.
            os.chown(path, uid, gid, follow_symlinks=False)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as failure:
        raise AccountError(f"cannot use {path} {what}: it {_unusable(path, failure)}; remove "
                           "it (the daemon creates it again)") from None
    try:
        info = os.fstat(fd)
        if info.st_uid != uid:
            raise AccountError(f"cannot use {path} {what}: it belongs to uid {info.st_uid}; "
                               "remove it (the daemon creates it again)")
        if stat.S_IMODE(info.st_mode) != mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return path
