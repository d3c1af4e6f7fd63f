"""The command line's parser (:mod:`deepmetric.cli`): instant help, every option explained."""

from __future__ import annotations

import argparse

from deepmetric import cli


def test_help_is_instant_and_explains_itself() -> None:
    """Parsing imports neither torch nor a model: ``--help`` needs no heavy import."""
    import subprocess
    import sys

    probe = "import sys, deepmetric.cli as c; c.build_parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
    version = subprocess.run(
        [sys.executable, "-m", "deepmetric", "--version"], capture_output=True, text=True
    )
    assert version.returncode == 0 and version.stdout.startswith("deepmetric ")
    text = subprocess.run(
        [sys.executable, "-m", "deepmetric", "train", "--help"], capture_output=True, text=True
    ).stdout
    assert "``" not in text  # no RST markup in the help
    for flag in ("--epochs", "--p", "--metric", "--scheduler", "--dataset", "--trunk"):
        assert flag in text
    assert "folder:PATH" in text and "[auto]" in text


# -- help -----------------------------------------------------------------------------------------
def _subcommands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                found += [command, *_subcommands(command)]
    return found


def test_every_option_of_every_command_is_explained() -> None:
    commands = _subcommands(cli.build_parser())
    assert {c.prog for c in commands} >= {
        "deepmetric index build",
        "deepmetric index remove",
        "deepmetric enroll",
        "deepmetric train",
        "deepmetric search",
    }
    for command in commands:
        for action in command._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{command.prog} {action.option_strings} has no help"
    text = next(c for c in commands if c.prog == "deepmetric index build").format_help()
    for default in ("[1024]", "[32]", "[64]", "[flat]"):
        assert default in text
