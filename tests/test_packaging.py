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

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
DEBIAN = ROOT / "packaging" / "debian"
UNITS = ("director.service", "director@.service", "director.socket")
MAX_EXPOSURE = 2.0  # docs/operations.rst records 1.5; a regression past this fails
SECRET = "test-secret-" + "x" * 40



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
                 "./lib/systemd/system/director.socket", "./usr/share/director/director.env.example",
                 "./usr/share/director/socket-activation.conf", "./etc/default/director",
                 "./usr/share/doc/director/operations.rst",  # named by the units' Documentation=
                 "./opt/venvs/director/bin/director"):
        assert f" {path}\n" in contents or f" {path} " in contents, path
    assert "./usr/bin/director -> /opt/venvs/director/bin/director" in contents
    assert "dropin.cache" not in contents
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
    assert '"database": "external"' in accepted.stdout


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


def pretend_systemd(overlay: Overlay) -> None:
    """A booted systemd as the maintainer scripts see it, with a normal service policy."""
    overlay.put("/run/systemd/system/.keep", "")
    overlay.check("test -e /usr/bin/systemctl.real || cp -p /usr/bin/systemctl /usr/bin/systemctl.real")
    overlay.put("/usr/bin/systemctl", STUB_SYSTEMCTL, 0o755)
    # Containers often carry a policy-rc.d that forbids starting services (exit 101).
    overlay.check("rm -f /usr/sbin/policy-rc.d")


@slow
def test_deb_install_upgrade_purge(deb: Path, overlay: Overlay) -> None:
    overlay.put("/tmp/director.deb", deb.read_bytes())
    # The overlay starts from this host's files: drop what a `make run` as root may have left
    # (/var/lib/director is also its embedded default), as a fresh machine has none of it.
    overlay.check("rm -rf /var/lib/director /var/cache/director /etc/director")

    # First install, nothing configured: account, directories, env file; nothing started.
    output = overlay.check("dpkg -i /tmp/director.deb")
    assert "created /etc/director/director.env with a new BETTER_AUTH_SECRET" in output
    assert "director: not started" in output
    modes = overlay.check("stat -c '%n %a %U:%G' /etc/director /etc/director/director.env "
                          "/var/lib/director").splitlines()
    assert modes == ["/etc/director 750 root:director",
                     "/etc/director/director.env 640 root:director",
                     "/var/lib/director 700 director:director"]
    account = overlay.check("getent passwd director")
    assert re.fullmatch(r"director:x:\d+:\d+:[^:]*:/var/lib/director:/usr/sbin/nologin\n", account)
    cache = overlay.check("stat -c %a /opt/venvs/director/lib/python3.11/site-packages/"
                          "twisted/plugins/dropin.cache")
    assert int(cache, 8) & 0o004, "the plugin cache must be there, readable by the service's user"
    enabled = overlay.run("ls /etc/systemd/system/multi-user.target.wants/director.service")
    assert enabled.returncode != 0, "a half-configured service must not be enabled"
    secret = re.search(r"^BETTER_AUTH_SECRET=(\S+)$",
                       overlay.check("cat /etc/director/director.env"), re.M)
    assert secret and len(secret.group(1)) >= 32

    version = overlay.check("director --version")
    assert f"director {source_version()}" in version
    refused = overlay.run("director config check")
    assert refused.returncode == 78, refused.stdout + refused.stderr
    verified = overlay.run("systemd-analyze verify /lib/systemd/system/director.service "
                           "/lib/systemd/system/director@.service "
                           "/lib/systemd/system/director@second.service "
                           "/lib/systemd/system/director.socket")
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")

    # Upgrade (the same version again) with the opt-in: migrations run as user director, on the
    # private cluster when the system has PostgreSQL server binaries; the env file is kept.
    have_postgres = bool(list(Path("/usr/lib/postgresql").glob("*/bin/postgres")))
    if have_postgres:
        overlay.check("sed -i 's/^NODE_ENV=production/NODE_ENV=development/' "
                      "/etc/director/director.env && "
                      "sed -i 's/^DIRECTOR_UPGRADE_DB=no/DIRECTOR_UPGRADE_DB=yes/' /etc/default/director")
        output = overlay.check("dpkg -i /tmp/director.deb")
        assert "DIRECTOR_UPGRADE_DB=yes: running director db upgrade" in output
        # As the operator checks it (sudo: /etc/director/director.env, /var/lib/director).
        status = overlay.check("director db status; stat -c %U /var/lib/director/postgres/data")
        assert "up to date" in status and status.strip().endswith("director"), status
        kept = overlay.check("grep '^BETTER_AUTH_SECRET=' /etc/director/director.env")
        assert kept.strip() == f"BETTER_AUTH_SECRET={secret.group(1)}"

        # With systemd running and the service active: restarted after the upgrade.
        pretend_systemd(overlay)
        overlay.check("dpkg -i /tmp/director.deb")
        calls = overlay.check("cat /var/log/systemctl.calls")
        assert "restart director.service" in calls, calls
        assert " start " not in calls and " stop " not in calls, calls

    # Purge: everything the package and the service created is gone.
    overlay.check("dpkg --purge director")
    gone = overlay.run("ls -d /etc/director /var/lib/director /var/cache/director "
                       "/opt/venvs/director /usr/bin/director; getent passwd director; "
                       "getent group director")
    assert gone.stdout == "", gone.stdout

    # A host whose env file was provisioned before the install gets an enabled, started service,
    # provided the file is valid.
    pretend_systemd(overlay)
    overlay.check("rm -f /var/log/systemctl.calls")
    provisioned = ("NODE_ENV=production\nDATABASE_URL=postgres://d:p@db.example.com/d\n"
                   "BASE_URL=https://director.example.com\nBETTER_AUTH_SECRET={}\n")
    overlay.put("/etc/director/director.env", provisioned.format("short"), 0o600)
    output = overlay.check("dpkg -i /tmp/director.deb")
    assert "is not valid yet" in output and "BETTER_AUTH_SECRET" in output, output
    assert "director: not started" in output
    assert "start" not in overlay.check("cat /var/log/systemctl.calls 2>/dev/null || true")
    overlay.check("dpkg --purge director")
    overlay.put("/etc/director/director.env", provisioned.format(SECRET), 0o600)
    output = overlay.check("dpkg -i /tmp/director.deb")
    assert "director.service is enabled and started" in output, output
    overlay.check("test -L /etc/systemd/system/multi-user.target.wants/director.service")
    assert "start director.service" in overlay.check("cat /var/log/systemctl.calls")
    kept = overlay.check("cat /etc/director/director.env")
    assert kept == provisioned.format(SECRET), "a provisioned env file is kept as it is"

    # Removal stops every director unit.
    overlay.check("dpkg --remove director")
    calls = overlay.check("cat /var/log/systemctl.calls")
    assert "stop director.socket director.service director@*.service" in calls, calls
