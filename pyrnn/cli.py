"""The ``pyrnn`` command: one subcommand per application (see ``pyrnn --help``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .apps import addition, charrnn, classify, gradflow
from .apps._common import AppError, restored_threads

APPS = (charrnn, addition, classify, gradflow)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyrnn",
        description="Recurrent networks trained end to end with pyrnn, no deep-learning framework.",
    )
    parser.add_argument("--version", action="version", version=f"pyrnn {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for app in APPS:
        app.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments), run the chosen app, return its exit code.

    Bad arguments exit with status 2 and argparse's message; a problem the user can fix (a missing
    file, a missing optional dependency) prints ``pyrnn: error: ...`` and returns 1.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with restored_threads():
            return int(args.run(args) or 0)
    except AppError as error:
        print(f"pyrnn {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
