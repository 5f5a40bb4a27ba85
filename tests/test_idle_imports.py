"""What the daemon imports at start: nothing that only some requests or other commands need
(each module stays in its memory for its whole life; ``bench --only memory`` measures it).
"""

from __future__ import annotations

import subprocess
import sys


def director_modules_after(statements: str) -> set[str]:
    """The modules loaded by a fresh interpreter that ran ``statements``."""
    program = f"import sys\n{statements}\nprint(' '.join(sorted(sys.modules)))"
    return set(subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                              check=True).stdout.split())


def test_the_daemon_imports_no_other_command_family() -> None:
    loaded = director_modules_after("from director.cli import build_parser, runs_serve\n"
                                    "build_parser(serve_only=runs_serve(['serve']))")
    assert {name for name in loaded if name.startswith("director.cli.")} == {
        "director.cli.base", "director.cli.serve"}


def test_the_service_tree_imports_no_yaml_nor_multipart() -> None:
    """PyYAML only when a playbook document is read or written, multipart only when the Studio
    receives an upload."""
    loaded = director_modules_after("import director.service")
    assert "director.playbooks.documents" in loaded  # the modules that use them are loaded
    assert not {"yaml", "multipart", "director.playbooks.yaml_text"} & loaded


def test_serves_twistd_options_know_our_plugin_and_unpickle_no_other_plugin_cache() -> None:
    """twistd's own plugin search would import the interfaces that every cache on the path
    names (twisted.trial's, and unittest with it)."""
    loaded = director_modules_after(
        "from director.cli.serve import server_options\n"
        "config = server_options()\n"
        "commands = [command[0] for command in config.subCommands]\n"
        "assert commands == ['director'], commands\n"
        "assert config.loadedPlugins['director'].tapname == 'director'")
    assert "twisted.plugins.director_plugin" in loaded
    assert not {"twisted.trial", "unittest", "twisted.plugins.twisted_web"} & loaded
