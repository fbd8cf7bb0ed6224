"""The ``pyrnn`` command: one subcommand per application (see ``pyrnn --help``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np

from . import __version__
from .apps import addition, charrnn, classify, gradflow
from .apps._common import AppError, Diverged, Parser, restored_threads

EXIT_STATUS = """exit status:
  0    done
  2    a user error: a bad argument, an unwritable output path, a missing or damaged file,
       a run too large for this machine's memory, a missing optional dependency
  3    training diverged (a loss or weights that are not finite); nothing non-finite is saved
  130  interrupted (Ctrl-C)
  141  standard output closed early (as in `pyrnn charrnn sample | head`)"""

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
    parser = Parser(
        prog="pyrnn",
        description="Recurrent networks trained end to end with pyrnn, no deep-learning framework.",
        epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pyrnn {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for app in APPS:
        app.register(commands)
    register_bench(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments), run the chosen app, return its exit
    status (EXIT_STATUS lists them).

    Every user error is one line on stderr, ``pyrnn <command>: error: ...``, naming the argument:
    argparse's own (raised as SystemExit(2)) and those found later (returned as 2).
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command line as given, for results that record how they were made
    prog = getattr(args, "parser", parser).prog
    try:
        # The apps check losses and weights for nan and inf and say what went wrong; NumPy's
        # warnings about them, on the way, would say it less clearly.
        with restored_threads(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return int(args.run(args) or 0)
    except Diverged as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 3
    except AppError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{prog}: error: out of memory; try smaller sizes", file=sys.stderr)
        return 2
    except BrokenPipeError:
        _discard_stdout()
        return 141
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _discard_stdout() -> None:
    """The reader of stdout has gone (`| head`): send what is still buffered nowhere, so that
    the interpreter's flush at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout without a descriptor (a test's)
        pass
