"""Which parser ``director`` builds: ``serve`` (the daemon) parses with its own family alone,
so that the daemon never imports the other command families (``test_idle_imports.py``);
everything else gets them all.
"""

from __future__ import annotations

import pytest

from director.cli import build_parser, runs_serve


@pytest.mark.parametrize(("argv", "serve"), [
    (["serve"], True),
    (["--env-file=", "serve"], True),
    (["--env-file", "/etc/director/director.env", "serve", "--listen", "tcp:8080"], True),
    (["--env", "director.env", "serve"], True),  # argparse takes a prefix of an option
    (["serve", "--help"], True),
    (["--env-file", "serve"], False),  # serve is the file's name: no command
    (["--help", "serve"], False),
    (["-h"], False),
    (["--version"], False),
    (["--", "serve"], False),
    (["config", "check"], False),
    ([], False),
])
def test_serve_alone_is_parsed_by_its_own_family(argv: list[str], serve: bool) -> None:
    assert runs_serve(argv) is serve


@pytest.mark.parametrize("argv", [["serve"], ["--env-file=", "serve", "--listen", "tcp:8080"]])
def test_serves_parser_reads_serve_as_the_whole_parser_does(argv: list[str]) -> None:
    alone, whole = build_parser(serve_only=True), build_parser()
    assert vars(alone.parse_args(argv)) == vars(whole.parse_args(argv))

