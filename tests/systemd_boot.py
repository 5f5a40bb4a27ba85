"""Boot a real systemd as PID 1 of fresh PID, mount, UTS, IPC and cgroup namespaces.

No container manager is involved, only util-linux's ``unshare``/``nsenter`` and the host's own
systemd. The namespace's root is a tmpfs holding:

* ``/usr``: an overlay on the host's ``/usr`` (read-only lower layer, the writes of this boot
  go to a tmpfs), so files such as ``/usr/bin/director`` can be added without touching the host;
* ``/etc``: a minimal set of files written by :class:`SystemdNamespace` (accounts, machine id,
  the units under test);
* ``/proc``, ``/dev`` (a few nodes and a private devpts), ``/run`` and ``/tmp`` of its own;
  ``/sys`` bound from the host with a cgroup2 hierarchy mounted over ``/sys/fs/cgroup``: it is
  mounted after ``unshare --cgroup``, so its root is a cgroup created for this boot under the
  host's cgroup2 mount (systemd runs in unified mode there);
* whatever directories the caller binds read-only (the checkout, the Python installation).

The network namespace is the host's: the test reaches the daemon on loopback and the daemon
reaches the test's PostgreSQL. Killing the namespace's PID 1 makes the kernel kill every
process in the namespace; :meth:`SystemdNamespace.destroy` does that and removes the cgroup.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

SYSTEMD = Path("/lib/systemd/systemd")
PR_SET_PDEATHSIG = 1

# Runs as PID 1 of the new namespaces, sets the root up, then becomes systemd.
SETUP = r"""
set -eu
W=$1
R=$W/root
mount --make-rprivate /
mkdir -p "$W/scratch" "$R"
mount -t tmpfs -o mode=0755 scratch "$W/scratch"
mkdir -p "$W/scratch/usr-upper" "$W/scratch/usr-work"
mount -t tmpfs -o mode=0755 root "$R"
mkdir -p "$R/usr" "$R/etc" "$R/proc" "$R/sys" "$R/dev" "$R/run" "$R/tmp" "$R/var/lib" \
    "$R/var/cache" "$R/var/log" "$R/var/tmp" "$R/root" "$R/home" "$R/opt"
chmod 1777 "$R/tmp" "$R/var/tmp"
chmod 0700 "$R/root"
for d in bin sbin lib lib64; do
    if [ -L "/$d" ]; then ln -s "$(readlink "/$d")" "$R/$d"; fi
done
mount -t overlay -o "lowerdir=/usr,upperdir=$W/scratch/usr-upper,workdir=$W/scratch/usr-work" \
    overlay "$R/usr"
cp -a "$W/etc/." "$R/etc/"
# Files of /usr replaced for this boot (the overlay keeps the host's untouched).
(cd "$W/usr" && find . ! -type d) | while read -r f; do rm -f "$R/usr/$f"; done
cp -a "$W/usr/." "$R/usr/"
while read -r source target; do
    mkdir -p "$R$target"
    mount --bind "$source" "$R$target"
    mount -o remount,bind,ro "$R$target"
done < "$W/binds"
mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys"
mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=0755,nosuid,nodev run "$R/run"
while read -r source target; do
    mkdir -p "$R$target"
    mount --bind "$source" "$R$target"
done < "$W/run-binds"
mount -t tmpfs -o mode=0755,nosuid dev "$R/dev"
for n in null zero full random urandom tty; do
    touch "$R/dev/$n"
    mount --bind "/dev/$n" "$R/dev/$n"
done
mkdir -p "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
touch "$R/dev/console"
mount --bind "$W/console.log" "$R/dev/console"
cd "$R"
mkdir .oldroot
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot
echo "exec systemd"
exec env -i container=director-test /lib/systemd/systemd
"""


class CannotBoot(Exception):
    """This machine cannot boot systemd in namespaces; the message says why."""


def cgroup2_root() -> Path:
    """Where the host mounts the cgroup2 hierarchy (pure unified, or hybrid's ``unified``)."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup2":
            return Path(fields[1])
    raise CannotBoot("no cgroup2 hierarchy is mounted on the host")


def check_capability() -> None:
    """Raise :class:`CannotBoot` when something this approach needs is obviously missing."""
    if os.geteuid() != 0:
        raise CannotBoot("not root: mounts, namespaces and cgroups need root")
    if not SYSTEMD.exists():
        raise CannotBoot(f"{SYSTEMD} does not exist (systemd is not installed)")
    for tool in ("unshare", "nsenter", "pivot_root", "mount"):
        if shutil.which(tool) is None:
            raise CannotBoot(f"{tool} (util-linux) is not installed")
    if not os.access(cgroup2_root(), os.W_OK):
        raise CannotBoot(f"the cgroup2 hierarchy {cgroup2_root()} is not writable")


def remove_stale_cgroups() -> None:
    """Leftovers of boots whose test run was killed before it could clean up: their cgroup
    (empty: the namespace died with unshare) and work directory."""
    with contextlib.suppress(CannotBoot):
        for group in cgroup2_root().glob("director-test-director-systemd-*"):
            with contextlib.suppress(OSError):
                if "populated 0" not in (group / "cgroup.events").read_text() or \
                        time.time() - group.stat().st_mtime < 60:
                    continue  # in use (or just being set up) by a running test
                for directory in sorted(group.rglob("*/"), key=lambda p: -len(p.parts)):
                    directory.rmdir()
                group.rmdir()
                shutil.rmtree(Path("/tmp", group.name.removeprefix("director-test-")),
                              ignore_errors=True)


class SystemdNamespace:
    """One boot. Build with :meth:`prepare`, then :meth:`boot`; always :meth:`destroy`."""

    def __init__(self) -> None:
        self.workdir = Path(f"/tmp/director-systemd-{uuid.uuid4().hex[:10]}")
        self.workdir.mkdir(mode=0o755)
        (self.workdir / "etc").mkdir()
        (self.workdir / "usr").mkdir()
        (self.workdir / "console.log").touch()
        self.binds: list[tuple[str, str]] = []
        self.run_binds: list[tuple[str, str]] = []
        self.cgroup = cgroup2_root() / f"director-test-{self.workdir.name}"
        self.unshare: subprocess.Popen[bytes] | None = None
        self.pid1: int | None = None

    # --- preparation (before boot) ------------------------------------------------------

    def add_file(self, path: str, text: str, mode: int = 0o644) -> None:
        """A file under /etc or /usr of the namespace (``path`` is absolute)."""
        top = path.lstrip("/").split("/")[0]
        assert top in ("etc", "usr"), path
        target = self.workdir / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def add_symlink(self, path: str, points_to: str) -> None:
        target = self.workdir / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(points_to)

    def bind_read_only(self, source: str, target: str) -> None:
        self.binds.append((source, target))

    def bind_in_run(self, source: str, target: str) -> None:
        """A writable bind under /run (sockets the namespace connects to)."""
        assert target.startswith("/run/"), target
        self.run_binds.append((source, target))

    # --- lifecycle ----------------------------------------------------------------------

    def boot(self, timeout: float = 20.0) -> float:
        """Start systemd; return the seconds until ``is-system-running`` settled."""
        for name, pairs in (("binds", self.binds), ("run-binds", self.run_binds)):
            (self.workdir / name).write_text("".join(f"{s} {t}\n" for s, t in pairs))
        (self.workdir / "setup.sh").write_text(SETUP)
        remove_stale_cgroups()
        try:
            self.cgroup.mkdir()
        except OSError as error:
            raise CannotBoot(f"cannot create the cgroup {self.cgroup}: {error}") from None
        procs = self.cgroup / "cgroup.procs"
        libc = ctypes.CDLL(None, use_errno=True)

        def enter_cgroup() -> None:  # in the child, before exec: its cgroup becomes the ns root
            procs.write_text("0")
            # Should pytest itself be killed, unshare dies, and --kill-child takes PID 1 along.
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

        started = time.monotonic()
        self.unshare = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--cgroup",
             "--propagation", "private", "--kill-child",
             "sh", str(self.workdir / "setup.sh"), str(self.workdir)],
            stdout=open(self.workdir / "setup.log", "wb"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=enter_cgroup,
        )
        deadline = started + timeout
        state = ""
        while time.monotonic() < deadline:
            if self.unshare.poll() is not None:
                raise CannotBoot(f"the namespace's init exited {self.unshare.returncode} "
                                 f"before systemd came up: {self.setup_log()}")
            if self.pid1 is None:
                self.pid1 = self._find_pid1()
            if self.pid1 is not None and "exec systemd" in self.setup_log():
                result = self.run(["systemctl", "is-system-running"], timeout=5)
                state = result.stdout.strip()
                if state in ("running", "degraded"):
                    return time.monotonic() - started
            time.sleep(0.05)
        raise CannotBoot(f"systemd did not finish booting in {timeout:.0f} s (state "
                         f"{state or 'unknown'}); setup: {self.setup_log()}; console: "
                         f"{(self.workdir / 'console.log').read_text(errors='replace')[-2000:]}")

    def _find_pid1(self) -> int | None:
        assert self.unshare is not None
        parent = self.unshare.pid
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
            if children:
                return int(children[0])
        return None

    def setup_log(self) -> str:
        return (self.workdir / "setup.log").read_text(errors="replace").strip()

    def destroy(self) -> None:
        """Kill the namespace (its PID 1 first: the kernel kills the rest) and clean up."""
        if self.pid1 is None and self.unshare is not None and self.unshare.poll() is None:
            self.pid1 = self._find_pid1()
        if self.pid1 is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid1, signal.SIGKILL)
        if self.unshare is not None:
            if self.unshare.poll() is None:
                self.unshare.kill()
            self.unshare.wait(10)
        deadline = time.monotonic() + 10
        while self.cgroup.exists() and time.monotonic() < deadline:
            for directory in sorted(self.cgroup.rglob("*/"), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    directory.rmdir()
            with contextlib.suppress(OSError):
                self.cgroup.rmdir()
            time.sleep(0.05)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # --- inside the namespace -------------------------------------------------------------

    def run(self, argv: list[str], timeout: float = 60.0,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the namespace (all its namespaces, its root) as root."""
        assert self.pid1 is not None
        return subprocess.run(
            ["nsenter", "--target", str(self.pid1), "--all", "--", *argv],
            capture_output=True, text=True, timeout=timeout, check=check,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_PAGER": "",
                 "SYSTEMD_COLORS": "0", "LANG": "C.UTF-8"},
        )

    def path(self, inside: str) -> Path:
        """The host path of a file in the namespace's file system (through /proc/PID/root)."""
        assert self.pid1 is not None
        return Path(f"/proc/{self.pid1}/root") / inside.lstrip("/")
