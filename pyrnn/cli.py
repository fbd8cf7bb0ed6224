"""The ``pyrnn`` command: one subcommand per application (see ``pyrnn --help``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .apps import addition, charrnn, classify, gradflow
from .apps._common import AppError, restored_threads

APPS = (charrnn, addition, classify, gradflow)


def register_bench(commands: argparse._SubParsersAction) -> None:
    """``pyrnn bench``: the repository's bench/ runner, which the wheel installs as pyrnn.bench."""
    try:
        from .bench import run as bench_run
    except ModuleNotFoundError as error:
        if error.name != f"{__package__}.bench":
            raise
        return  # pyrnn imported from a source tree, not installed: there it is `python -m bench`
    bench_run.register(commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyrnn",
        description="Recurrent networks trained end to end with pyrnn, no deep-learning framework.",
    )
    parser.add_argument("--version", action="version", version=f"pyrnn {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for app in APPS:
        app.register(commands)
    register_bench(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments), run the chosen app, return its exit code.

    Bad arguments exit with status 2 and argparse's message; a problem the user can fix (a missing
    file, a missing optional dependency) prints ``pyrnn: error: ...`` and returns 1.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command line as given, for results that record how they were made
    try:
        with restored_threads():
            return int(args.run(args) or 0)
    except AppError as error:
        print(f"pyrnn {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
