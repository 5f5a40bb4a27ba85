"""Packaging: the systemd units verify, and the .deb builds, installs, upgrades and purges.

Always run (a few seconds): ``systemd-analyze verify`` and ``security`` on the units, the template
unit kept in step with director.service, the socket and its drop-in agreeing on the descriptor
name, the environment file example, the maintainer scripts' syntax, the changelog's version.

Marked ``slow_packaging``: the .deb itself. Building it takes one to two minutes on two cores
(pip downloads Director's dependencies), so a build happens only with ``DIRECTOR_TEST_DEB=1``
(``make deb-test``). Without it these tests reuse ``dist/director_*.deb`` when it is newer than
every file it is built from, and skip otherwise. The deb is installed into throwaway roots:
``dpkg -x`` into a directory, and a real ``dpkg -i``/upgrade/purge in a chroot over a
copy-on-write overlay of this machine's own root (root and mount namespaces needed), where a
stub ``systemctl`` records what the maintainer scripts ask of systemd.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import free_port

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
DEBIAN = ROOT / "packaging" / "debian"
UNITS = ("director.service", "director@.service", "director.socket")
MAX_EXPOSURE = 2.0  # docs/operations.rst records 1.5; a regression past this fails
SECRET = "test-secret-" + "x" * 40
VENV_BIN = {"director", "python", "python3", "python3.11"}
STATE_MARKER = "/var/lib/director/.created-by-director-package"


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("check", False)
    return subprocess.run(argv, **kwargs)  # type: ignore[call-overload, no-any-return]


def source_version() -> str:
    text = (ROOT / "src" / "director" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    assert match, "src/director/__init__.py has no __version__"
    return match.group(1)


def package_version() -> str:
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    match = re.match(r"director \(([^)]+)\)", first)
    assert match, f"unexpected first changelog line: {first!r}"
    return match.group(1)


# --- systemd units -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        run(["apt-get", "install", "-y", "--no-install-recommends", "systemd"],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed and could not be installed "
                    "(apt-get install systemd needs root)")
    return path


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The units as shipped, with ExecStart's /usr/bin/director pointing at a stub.

    ``verify`` checks that ExecStart's binary exists; the installed-package test below verifies
    the units with the real /usr/bin/director.
    """
    stub = tmp_path / "director"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    for name in UNITS:
        text = (SYSTEMD / name).read_text().replace("/usr/bin/director", str(stub))
        (tmp_path / name).write_text(text)
    dropin = tmp_path / "director.service.d"
    dropin.mkdir()
    text = (SYSTEMD / "socket-activation.conf").read_text().replace("/usr/bin/director", str(stub))
    (dropin / "socket-activation.conf").write_text(text)
    return tmp_path


def test_units_verify(systemd_analyze: str, unit_dir: Path) -> None:
    # The drop-in next to director.service is loaded too: verify covers the socket override.
    result = run([systemd_analyze, "verify", "director.service", "director@.service",
                  "director@second.service", "director.socket"], cwd=unit_dir)
    # Unknown or misspelt directives are only warnings (exit 0): any output is a failure.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_units_verify_catches_a_broken_unit(systemd_analyze: str, unit_dir: Path) -> None:
    service = unit_dir / "director.service"
    service.write_text(service.read_text().replace("Type=notify", "Type=notfy"))
    result = run([systemd_analyze, "verify", "director.service"], cwd=unit_dir)
    assert "notfy" in result.stdout + result.stderr


@pytest.mark.parametrize("unit", ["director.service", "director@.service"])
def test_units_security_exposure(systemd_analyze: str, unit_dir: Path, unit: str) -> None:
    result = run([systemd_analyze, "security", "--offline=true", str(unit_dir / unit)])
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def directives(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_template_unit_is_the_service_with_an_instance() -> None:
    service = directives((SYSTEMD / "director.service").read_text())
    template = directives((SYSTEMD / "director@.service").read_text())
    expected = [
        line.replace("Description=Director MCP gateway",
                     "Description=Director MCP gateway (instance %i)")
        .replace("/etc/director/director.env", "/etc/director/%i.env")
        for line in service
    ]
    instance = {
        "StateDirectory=director": "StateDirectory=director-%i",
        "CacheDirectory=director": "CacheDirectory=director-%i",
        "WorkingDirectory=%S/director": "WorkingDirectory=%S/director-%i",
        "SyslogIdentifier=director": "SyslogIdentifier=director-%i",
        "Environment=DIRECTOR_LOG_IDENTIFIER=director":
            "Environment=DIRECTOR_LOG_IDENTIFIER=director-%i",
    }
    expected = [instance.get(line, line) for line in expected]
    expected = [line.replace("%S/director ", "%S/director-%i ")
                .replace("%C/director ", "%C/director-%i ")
                .replace("%C/director/npm", "%C/director-%i/npm") for line in expected]
    assert template == expected


def test_socket_and_dropin_agree() -> None:
    socket = (SYSTEMD / "director.socket").read_text()
    dropin = (SYSTEMD / "socket-activation.conf").read_text()
    name = re.search(r"^FileDescriptorName=(\S+)$", socket, re.M)
    listen = re.search(r"^ListenStream=(\S+)$", socket, re.M)
    assert name and listen
    assert f"--listen systemd:domain=INET:name={name.group(1)}" in dropin
    # domain=INET adopts an IPv4 socket: the address must be IPv4, not a bare (dual-stack) port.
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+:\d+", listen.group(1))
    assert "ExecStart=\n" in dropin  # clears the unit's ExecStart before replacing it


def test_env_example_fails_closed_until_completed(tmp_path: Path) -> None:
    """The example (the package's template for /etc/director/director.env) parses, and is
    refused until DATABASE_URL, BASE_URL and the secret are set (exit 78, EX_CONFIG)."""
    example = (SYSTEMD / "director.env.example").read_text()
    command = [sys.executable, "-m", "director.cli", "--env-file"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    result = run([*command, str(SYSTEMD / "director.env.example"), "config", "check"], env=env)
    assert result.returncode == 78, result.stderr
    for name in ("DATABASE_URL", "BASE_URL", "BETTER_AUTH_SECRET"):
        assert name in result.stderr
    completed = tmp_path / "director.env"
    completed.write_text(
        example.replace("\nDATABASE_URL=\n", "\nDATABASE_URL=postgres://d:p@db.example.com/d\n")
        .replace("\nBASE_URL=\n", "\nBASE_URL=https://director.example.com\n")
        .replace("\nBETTER_AUTH_SECRET=\n", f"\nBETTER_AUTH_SECRET={SECRET}\n"))
    result = run([*command, str(completed), "config", "check", "--json"], env=env)
    assert result.returncode == 0, result.stderr
    assert '"environment": "production"' in result.stdout


@pytest.mark.parametrize("script", ["director.postinst", "director.prerm", "director.postrm",
                                    "rules"])
def test_maintainer_scripts_parse(script: str) -> None:
    path = DEBIAN / script
    assert os.access(path, os.X_OK) or script != "rules", "debian/rules must be executable"
    if script == "rules":
        result = run(["make", "-n", "-f", str(path), "override_dh_strip"], cwd=ROOT)
    else:
        result = run(["sh", "-n", str(path)])
    assert result.returncode == 0, result.stderr


def test_changelog_version_is_the_source_version() -> None:
    assert package_version().rsplit("-", 1)[0] == source_version(), (
        "add a packaging/debian/changelog entry for the new version: "
        f"dch -c packaging/debian/changelog -v {source_version()}-1"
    )


# --- the .deb ------------------------------------------------------------------------------


def deb_sources() -> list[Path]:
    listed = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--",
                  "setup.cfg", "pyproject.toml", "README.rst", "src", "systemd", "docs",
                  "packaging"], cwd=ROOT)
    return [ROOT / name for name in listed.stdout.splitlines() if (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def deb() -> Path:
    target = ROOT / "dist" / f"director_{package_version()}_amd64.deb"
    newest = max(path.stat().st_mtime for path in deb_sources())
    fresh = target.exists() and target.stat().st_mtime > newest
    if not fresh:
        if os.environ.get("DIRECTOR_TEST_DEB") != "1":
            pytest.skip("no dist/*.deb newer than its sources; DIRECTOR_TEST_DEB=1 builds one "
                        "(about 2 minutes; make deb-test)")
        started = time.monotonic()
        result = run([str(ROOT / "packaging" / "build-deb")], cwd=ROOT)
        assert result.returncode == 0, (result.stdout[-3000:] + result.stderr[-3000:])
        print(f"built {target.name} in {time.monotonic() - started:.0f} s")
    assert target.exists()
    return target


slow = pytest.mark.slow_packaging


@slow
def test_deb_metadata(deb: Path) -> None:
    fields = run(["dpkg-deb", "-f", str(deb), "Package", "Version", "Depends", "Recommends"])
    assert fields.returncode == 0, fields.stderr
    assert f"Version: {package_version()}" in fields.stdout
    for dependency in ("python3 (>= 3.11)", "python3 (<< 3.12)", "adduser"):
        assert dependency in fields.stdout
    assert "Recommends: postgresql-15 | postgresql (>= 15)" in fields.stdout
    contents = run(["dpkg-deb", "-c", str(deb)]).stdout
    for path in ("./lib/systemd/system/director.service", "./lib/systemd/system/director@.service",
                 "./lib/systemd/system/director-stdio.socket",
                 "./lib/systemd/system/director-stdio@.service",
                 "./usr/lib/tmpfiles.d/director.conf",
                 "./lib/systemd/system/director.socket", "./usr/share/director/director.env.example",
                 "./usr/share/director/socket-activation.conf", "./etc/default/director",
                 "./usr/share/doc/director/operations.rst",  # named by the units' Documentation=
                 "./opt/venvs/director/bin/director"):
        assert f" {path}\n" in contents or f" {path} " in contents, path
    assert "./usr/bin/director -> /opt/venvs/director/bin/director" in contents
    assert ("./usr/lib/director/stdio-supervisor -> /opt/venvs/director/lib/python3.11/"
            "site-packages/director/sandbox/supervisor.py") in contents
    assert "dropin.cache" not in contents
    # The venv holds director and its interpreter: no pip, setuptools, activate scripts or
    # the dependencies' console scripts (twistd, trial, conch, ...).
    names = [line.split()[5] for line in contents.splitlines()]
    scripts = {name.rsplit("/", 1)[1] for name in names
               if name.startswith("./opt/venvs/director/bin/") and not name.endswith("/")}
    assert scripts == VENV_BIN, sorted(scripts - VENV_BIN)
    site = "./opt/venvs/director/lib/python3.11/site-packages/"
    installers = [name for name in names if name.startswith(site) and
                  name[len(site):].split("/")[0].split("-")[0] in
                  ("pip", "setuptools", "pkg_resources", "_distutils_hack",
                   "distutils", "wheel")]
    assert installers == [], installers[:5]
    control = Path(run(["mktemp", "-d"]).stdout.strip())
    try:
        run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
        # The generated environment file is not a conffile (it holds this host's own secret).
        assert (control / "conffiles").read_text().split() == ["/etc/default/director"]
        assert not (control / "shlibs").exists() and not (control / "triggers").exists()
    finally:
        shutil.rmtree(control)


@slow
def test_deb_extracted_runs(deb: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    venv = root / "opt" / "venvs" / "director"
    # The console script's shebang names /opt/venvs/director; call it through the venv's python.
    command = [str(venv / "bin" / "python"), str(venv / "bin" / "director")]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    version = run([*command, "--version"], env=env)
    assert (version.returncode, version.stdout.strip()) == (0, f"director {source_version()}")
    example = root / "usr" / "share" / "director" / "director.env.example"
    refused = run([*command, "--env-file", str(example), "config", "check"], env=env)
    assert refused.returncode == 78, refused.stdout + refused.stderr
    env_file = tmp_path / "director.env"
    env_file.write_text("NODE_ENV=production\nDATABASE_URL=postgres://d:p@db.example.com/d\n"
                        "BASE_URL=https://director.example.com\n"
                        f"BETTER_AUTH_SECRET={SECRET}\n")
    accepted = run([*command, "--env-file", str(env_file), "config", "check", "--json"], env=env)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert json.loads(accepted.stdout)["database"] == \
        "external (d at db.example.com port 5432, database d)"


@slow
def test_deb_lintian_clean(deb: Path) -> None:
    """No lintian error or warning beyond packaging/debian/director.lintian-overrides."""
    if shutil.which("lintian") is None:
        pytest.skip("lintian is not installed (apt-get install lintian)")
    result = run(["lintian", "--fail-on", "error,warning", str(deb)], timeout=300)
    findings = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert (result.returncode, findings) == (0, []), result.stdout + result.stderr


class Overlay:
    """A chroot over a copy-on-write overlay of this machine's root; the host is never touched.

    Each ``run`` enters a fresh mount namespace and mounts the same upper directory again, so
    state (the dpkg database, /etc, /var/lib) carries over from one step to the next.
    """

    SETUP = """
set -e
mount --make-rprivate /
mount -t overlay overlay -o lowerdir=/,upperdir="$1/upper",workdir="$1/work" "$1/merged"
for d in proc sys dev; do mount --rbind "/$d" "$1/merged/$d"; done
mount -t tmpfs -o size=256m tmpfs "$1/merged/dev/shm"
exec chroot "$1/merged" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive /bin/sh -c "$2"
"""

    def __init__(self, base: Path) -> None:
        self.base = base
        for name in ("upper", "work", "merged"):
            (base / name).mkdir()

    def run(self, script: str) -> subprocess.CompletedProcess[str]:
        return run(["unshare", "--mount", "sh", "-c", self.SETUP, "overlay", str(self.base),
                    script], timeout=300)

    def check(self, script: str) -> str:
        result = self.run(script)
        assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
        return result.stdout + result.stderr

    def put(self, path: str, content: str | bytes, mode: int = 0o644) -> None:
        """Write a file into the root (it lands in the upper directory)."""
        target = self.base / "upper" / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)
        target.chmod(mode)


@pytest.fixture
def overlay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Overlay]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("installing the .deb into a throwaway root needs root and unshare")
    # The upper directory must be on a real file system (here: the root's), not on tmpfs
    # that would vanish with the namespace, nor on an overlay.
    base = tmp_path_factory.mktemp("deb-root")
    root = Overlay(base)
    probe = root.run("true")
    if probe.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"no overlay over / in a mount namespace here: {probe.stderr.strip()}")
    yield root
    shutil.rmtree(base, ignore_errors=True)


# Records what the maintainer scripts ask of systemd; says every director unit is enabled and
# running, as on a host where the operator started the service. Offline operations (--root=,
# e.g. deb-systemd-helper's `preset`) go to the real systemctl, which makes the symlinks.
STUB_SYSTEMCTL = """#!/bin/sh
echo "systemctl $*" >> /var/log/systemctl.calls
case " $* " in
    *" --root="*) exec /usr/bin/systemctl.real "$@" ;;
    *" list-units "*) echo "director.service loaded active running Director MCP gateway" ;;
    *" is-enabled "*) echo enabled ;;
esac
exit 0
"""


def service_calls(overlay: Overlay) -> str:
    """The stub's systemctl calls, but for the stdio sandbox's socket (always enabled and
    started by debhelper's snippets, whatever the service's state)."""
    calls = overlay.check("cat /var/log/systemctl.calls 2>/dev/null || true")
    return "".join(line for line in calls.splitlines(keepends=True)
                   if "director-stdio.socket" not in line)


def pretend_systemd(overlay: Overlay) -> None:
    """A booted systemd as the maintainer scripts see it, with a normal service policy."""
    overlay.put("/run/systemd/system/.keep", "")
    overlay.check("test -e /usr/bin/systemctl.real || cp -p /usr/bin/systemctl /usr/bin/systemctl.real")
    overlay.put("/usr/bin/systemctl", STUB_SYSTEMCTL, 0o755)
    # Containers often carry a policy-rc.d that forbids starting services (exit 101).
    overlay.check("rm -f /usr/sbin/policy-rc.d")


def serve_as_the_service(overlay: Overlay) -> str:
    """Run the installed ``director serve`` as the unit does (user director, the env file, the
    state directory) until /api/health says 200; its output."""
    port = free_port()
    script = f"""
setpriv --reuid=director --regid=director --init-groups \
    env -i PATH=/usr/bin:/bin HOME=/var/lib/director STATE_DIRECTORY=/var/lib/director \
    LANG=C.UTF-8 PORT={port} HOST=127.0.0.1 \
    /usr/bin/director --env-file /etc/director/director.env serve > /tmp/serve.log 2>&1 &
pid=$!
healthy=1
for attempt in $(seq 600); do
    if curl -fsS http://127.0.0.1:{port}/api/health; then healthy=0; break; fi
    kill -0 $pid 2>/dev/null || break
    sleep 0.1
done
kill -TERM $pid 2>/dev/null || true
wait $pid || true
[ $healthy = 0 ] || cat /tmp/serve.log
exit $healthy
"""
    return overlay.check(script)


def fresh_root(overlay: Overlay, deb: Path) -> None:
    """The deb in the overlay, and none of what a `make run` as root may have left on this
    host (/var/lib/director is also its embedded default), as on a fresh machine."""
    overlay.put("/tmp/director.deb", deb.read_bytes())
    overlay.check("rm -rf /var/lib/director /var/cache/director /etc/director; "
                  "deluser --system director >/dev/null 2>&1 || true; "
                  "delgroup --system director >/dev/null 2>&1 || true")


PROVISIONED = ("NODE_ENV=production\nDATABASE_URL=postgres://d:p@db.example.com/d\n"
               "BASE_URL=https://director.example.com\nBETTER_AUTH_SECRET={}\n")


@slow
def test_deb_install_upgrade_purge(deb: Path, overlay: Overlay) -> None:
    fresh_root(overlay, deb)
    # The embedded cluster of the upgrade and of the start below needs PostgreSQL's server
    # binaries, as the rest of the suite does.
    assert list(Path("/usr/lib/postgresql").glob("*/bin/postgres")), \
        "no PostgreSQL server binaries (Debian: apt-get install postgresql)"

    # First install, nothing configured: account, directories, env file; nothing started.
    output = overlay.check("dpkg -i /tmp/director.deb")
    assert "created /etc/director/director.env with a new BETTER_AUTH_SECRET" in output
    assert "director: not started" in output
    assert "sudo" not in output  # a minimal Debian has none
    modes = overlay.check("stat -c '%n %a %U:%G' /etc/director /etc/director/director.env "
                          f"/var/lib/director {STATE_MARKER}").splitlines()
    assert modes == ["/etc/director 750 root:director",
                     "/etc/director/director.env 640 root:director",
                     "/var/lib/director 700 director:director",
                     f"{STATE_MARKER} 644 root:root"]
    account = overlay.check("getent passwd director")
    # The stdio sandbox: its group, its directory (systemd-tmpfiles), its supervisor in place.
    assert overlay.check("getent group director-stdio").startswith("director-stdio:x:")
    sandbox = overlay.check("stat -c '%a %U:%G' /var/cache/director-stdio; "
                            "test -f /usr/lib/director/stdio-supervisor && echo supervisor")
    assert sandbox.split("\n")[:2] == ["2710 director:director-stdio", "supervisor"], sandbox
    assert re.fullmatch(r"director:x:\d+:\d+:[^:]*:/var/lib/director:/usr/sbin/nologin\n", account)
    cache = overlay.check("stat -c %a /opt/venvs/director/lib/python3.11/site-packages/"
                          "twisted/plugins/dropin.cache")
    assert int(cache, 8) & 0o004, "the plugin cache must be there, readable by the service's user"
    enabled = overlay.run("ls /etc/systemd/system/multi-user.target.wants/director.service")
    assert enabled.returncode != 0, "a half-configured service must not be enabled"
    env_file = overlay.check("cat /etc/director/director.env")
    assert env_file.startswith("# Created by the director package on "), env_file[:200]
    secret = re.search(r"^BETTER_AUTH_SECRET=(\S+)$", env_file, re.M)
    assert secret and len(secret.group(1)) >= 32

    version = overlay.check("director --version")
    assert f"director {source_version()}" in version
    refused = overlay.run("director config check")
    assert refused.returncode == 78, refused.stdout + refused.stderr
    verified = overlay.run("systemd-analyze verify /lib/systemd/system/director.service "
                           "/lib/systemd/system/director@.service "
                           "/lib/systemd/system/director@second.service "
                           "/lib/systemd/system/director.socket "
                           "/lib/systemd/system/director-stdio.socket "
                           "/lib/systemd/system/director-stdio@0-1-2.service")
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")

    # Upgrade (the same version again) with the opt-in: migrations run as user director, on the
    # private cluster; the env file and the state directory's marker are kept.
    overlay.check("sed -i 's/^NODE_ENV=production/NODE_ENV=development/' "
                  "/etc/director/director.env && "
                  "sed -i 's/^DIRECTOR_UPGRADE_DB=no/DIRECTOR_UPGRADE_DB=yes/' /etc/default/director")
    output = overlay.check("dpkg -i /tmp/director.deb")
    assert "DIRECTOR_UPGRADE_DB=yes: running director db upgrade" in output
    assert "/var/lib/director was" not in output  # its owner was right: nothing to say
    # As the operator checks it (as root: /etc/director/director.env, /var/lib/director).
    status = overlay.check("director db status; stat -c %U /var/lib/director/postgres/data")
    assert "up to date" in status and status.strip().endswith("director"), status
    kept = overlay.check(f"grep '^BETTER_AUTH_SECRET=' /etc/director/director.env; "
                         f"test -f {STATE_MARKER}")
    assert kept.strip() == f"BETTER_AUTH_SECRET={secret.group(1)}"

    # The installed venv lacks pip, setuptools and the other console scripts, and still serves.
    health = serve_as_the_service(overlay)
    assert '{"status": "ok"}' in health, health

    # With systemd running and the service active: restarted after the upgrade.
    pretend_systemd(overlay)
    overlay.check("dpkg -i /tmp/director.deb")
    calls = service_calls(overlay)
    assert "restart director.service" in calls, calls
    assert " start " not in calls and " stop " not in calls, calls

    # Purge: what the package and the service created is gone; the account stays.
    output = overlay.check("dpkg --purge director")
    gone = overlay.run("ls -d /etc/director /var/lib/director /var/cache/director "
                       "/var/cache/director-stdio /opt/venvs/director /usr/bin/director")
    assert gone.stdout == "", gone.stdout
    assert "kept the system user and group director" in output, output
    assert "kept /" not in output, output
    assert overlay.check("getent passwd director").startswith("director:x:")
    assert overlay.check("getent group director").startswith("director:x:")

    # A host whose env file was provisioned before the install gets an enabled, started service,
    # provided the file is valid; the account of the earlier installation is reused.
    overlay.check("rm -f /var/log/systemctl.calls")
    overlay.put("/etc/director/director.env", PROVISIONED.format("short"), 0o600)
    output = overlay.check("dpkg -i /tmp/director.deb")
    assert "is not valid yet" in output and "BETTER_AUTH_SECRET" in output, output
    assert "director: not started" in output
    assert "start" not in service_calls(overlay)
    # The stdio sandbox's socket needs no configuration: enabled and started at once.
    assert "start director-stdio.socket" in overlay.check("cat /var/log/systemctl.calls")
    output = overlay.check("dpkg --purge director")
    assert "kept /etc/director/director.env: the package did not create it" in output, output
    overlay.put("/etc/director/director.env", PROVISIONED.format(SECRET), 0o600)
    output = overlay.check("dpkg -i /tmp/director.deb")
    assert "director.service is enabled and started" in output, output
    overlay.check("test -L /etc/systemd/system/multi-user.target.wants/director.service")
    assert "start director.service" in overlay.check("cat /var/log/systemctl.calls")
    kept = overlay.check("cat /etc/director/director.env")
    assert kept == PROVISIONED.format(SECRET), "a provisioned env file is kept as it is"

    # Removal stops every director unit.
    overlay.check("dpkg --remove director")
    calls = overlay.check("cat /var/log/systemctl.calls")
    assert "stop director.socket director.service director@*.service" in calls, calls


@slow
def test_deb_purge_keeps_what_it_did_not_create(deb: Path, overlay: Overlay) -> None:
    """A /var/lib/director and an env file that were there before the install (another
    cluster, its secret; configuration management) survive a purge; the install gives the
    directory to the service's user and says so; without a running systemd the service is
    enabled, not started, and the package says that too."""
    fresh_root(overlay, deb)
    overlay.put("/var/lib/director/postgres/data/PG_VERSION", "15\n")
    overlay.put("/var/lib/director/auth-secret", "someone else's secret\n", 0o600)
    overlay.check("chmod 0755 /var/lib/director")  # root:root, as `make run` as root leaves it
    overlay.put("/etc/director/director.env", PROVISIONED.format(SECRET), 0o600)

    output = overlay.check("dpkg -i /tmp/director.deb")
    assert ("director: /var/lib/director was root:root mode 755; now director:director mode "
            "700 (the files in it keep their owners until the service's first start)"
            ) in output, output
    owners = overlay.check("stat -c '%n %a %U:%G' /var/lib/director "
                           "/var/lib/director/auth-secret").splitlines()
    assert owners == ["/var/lib/director 700 director:director",
                      "/var/lib/director/auth-secret 600 root:root"]
    overlay.check(f"test ! -e {STATE_MARKER}")
    # No systemd here: enabled (the links), not started, and said so in one line.
    assert ("director: /etc/director/director.env is complete; director.service is enabled but "
            "not started: systemd is not running here (it starts at the next boot)") in output
    assert "enabled and started" not in output
    overlay.check("test -L /etc/systemd/system/multi-user.target.wants/director.service")

    output = overlay.check("dpkg --purge director")
    assert "kept /var/lib/director: the package did not create it" in output, output
    assert "kept /etc/director/director.env: the package did not create it" in output, output
    assert "kept the system user and group director" in output, output
    left = overlay.check("cat /var/lib/director/auth-secret /var/lib/director/postgres/data/"
                         "PG_VERSION /etc/director/director.env")
    assert left == "someone else's secret\n15\n" + PROVISIONED.format(SECRET)
    overlay.check("test ! -e /opt/venvs/director && getent passwd director")
