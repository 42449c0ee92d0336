"""The aerialseg CLI run in this process, as a user's shell would: its exit code and what it printed to stderr."""

import sys

import pytest

from aerialseg import cli


def exit_and_stderr(argv: list[str], capsys) -> tuple[int, str]:
    """Run ``aerialseg ARGV`` through cli.main (which always exits); returns (exit code, stderr)."""
    old = sys.argv
    sys.argv = ["aerialseg", *argv]
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
    finally:
        sys.argv = old
    return exit_info.value.code, capsys.readouterr().err
