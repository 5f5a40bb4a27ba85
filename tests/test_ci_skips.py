"""tests/conftest.py under DIRECTOR_CI=1 (as ``.ci/run`` sets it): every kind of skip fails,
giving its reason; expected failures and passes are left alone; without the variable a skip
is a skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SAMPLE = '''
import pytest

def test_skips_itself():
    pytest.skip("no widget here")

@pytest.mark.skipif(True, reason="marked off")
def test_marked_off():
    pass

@pytest.fixture
def widget():
    pytest.skip("the fixture has no widget")

def test_needs_a_fixture_that_skips(widget):
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_to_fail():
    assert False

def test_passes():
    pass
'''

MODULE_SKIP = 'import pytest\npytest.importorskip("no_such_module_here")\n'


def run_suite(folder: Path, ci: bool) -> subprocess.CompletedProcess[str]:
    """pytest on ``folder`` with this suite's conftest loaded as a plugin."""
    env = {key: value for key, value in os.environ.items() if key != "DIRECTOR_CI"}
    if ci:
        env["DIRECTOR_CI"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider",
                           "-p", "tests.conftest", "--rootdir", str(folder), str(folder)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    return tmp_path


def test_every_skip_fails_under_director_ci(sample: Path) -> None:
    result = run_suite(sample, ci=True)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "1 failed, 1 passed, 1 xfailed, 2 errors" in out, out
    for reason in ("no widget here", "marked off", "the fixture has no widget"):
        assert f"skipped under DIRECTOR_CI=1, where every test must run: Skipped: {reason}" \
            in out, out


def test_a_module_that_skips_fails_under_director_ci(tmp_path: Path) -> None:
    (tmp_path / "test_module.py").write_text(MODULE_SKIP)
    result = run_suite(tmp_path, ci=True)
    assert result.returncode != 0, result.stdout
    assert "could not import 'no_such_module_here'" in result.stdout, result.stdout


def test_skips_are_skips_elsewhere(sample: Path) -> None:
    result = run_suite(sample, ci=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 3 skipped, 1 xfailed" in result.stdout, result.stdout
