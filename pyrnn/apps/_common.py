"""What every application shares: common flags, argument types, progress bar, JSON, plots."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from .. import _backend
from ..module import Module, no_grad


class AppError(RuntimeError):
    """A problem the user can fix (missing file, missing extra); printed without a traceback."""


# --- argument types: each raises ArgumentTypeError, which argparse turns into a clear message ---

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def probability(text: str) -> float:
    """A number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


SMALL_MODEL_THREADS = 1
SMALL_MODEL_NOTE = (
    "its model is small, and measured on 2 shared cores a second thread cost more in "
    "synchronisation at every time step than it saved"
)


def add_common_arguments(parser: argparse.ArgumentParser, plot_default: str | None = None,
                         threads_default: int | None = None) -> None:
    """--seed, --json, --plot, --backend, --threads, --no-progress."""
    group = parser.add_argument_group("common options")
    group.add_argument("--seed", type=non_negative_int, default=0,
                       help="random seed: the same seed gives the same run (default: 0)")
    group.add_argument("--json", metavar="PATH", help="write the final figures to PATH as JSON")
    group.add_argument("--plot", metavar="PATH", default=plot_default,
                       help="write the loss curve to PATH as PNG (needs matplotlib)"
                       + (f" (default: {plot_default})" if plot_default else ""))
    group.add_argument("--backend", choices=_backend.BACKENDS, default="auto",
                       help="kernels: C++ core, NumPy reference, or auto (default: auto)")
    group.add_argument("--threads", type=positive_int, default=threads_default,
                       help="threads for the C++ core (default: "
                       + (f"{threads_default}: {SMALL_MODEL_NOTE})" if threads_default
                          else "all cores)"))
    group.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def check_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fail before any work: unwritable output folders, --plot without matplotlib."""
    for flag in ("json", "plot"):
        path = getattr(args, flag, None)
        if path:
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                parser.error(f"--{flag}: folder {folder!r} does not exist")
    if getattr(args, "plot", None) and not matplotlib_available():
        parser.error("--plot needs matplotlib, which is not installed: pip install 'pyrnn[plot]'")


def setup_runtime(args: argparse.Namespace) -> str:
    """Apply --threads and resolve --backend; returns the concrete backend name."""
    try:
        backend = _backend.resolve(args.backend)
    except RuntimeError as error:
        raise AppError(str(error)) from None
    if args.threads is not None:
        _backend.set_num_threads(args.threads)
    single_threaded_blas()
    return backend


def single_threaded_blas() -> None:
    """Keep NumPy's BLAS to one thread when threadpoolctl is there (it comes with scikit-learn).

    The apps' NumPy work (output layers, norms, optimizer updates) is small, and a second BLAS
    thread pool competing with the C++ core's OpenMP team for the same cores made training
    steps several times slower on a 2-core machine.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(1, user_api="blas")


@contextlib.contextmanager
def restored_threads() -> Iterator[None]:
    """Put the core's and BLAS's thread counts back afterwards (an app run inside a longer
    Python process, such as a test session, must not change them for what follows)."""
    core_threads = _backend.get_num_threads()
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        blas = contextlib.nullcontext()
    else:
        blas = ThreadpoolController().limit(limits=None)  # a snapshot restored on exit
    with blas:
        try:
            yield
        finally:
            _backend.set_num_threads(core_threads)


def runtime_figures(backend: str) -> dict[str, object]:
    return {
        "backend": backend,
        "threads": _backend.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             disable: bool = False, **kwargs: object) -> tqdm:
    return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True,
                leave=True, **kwargs)


@contextlib.contextmanager
def evaluating(model: Module) -> Iterator[Module]:
    """Eval mode (no dropout) and no tape inside the block; the previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            yield model
    finally:
        model.train(was_training)


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def write_json(path: str | None, figures: dict[str, object]) -> None:
    """Write flat figures (numbers, strings, bools, short lists) as pretty JSON."""
    if not path:
        return
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_plain(figures), f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"wrote {path}")


def _plain(value: object) -> object:
    """NumPy scalars and arrays -> JSON-native values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_curves(path: str | None, curves: dict[str, tuple[Sequence[float], Sequence[float]]],
                *, title: str, xlabel: str, ylabel: str, logy: bool = False) -> None:
    """One line per named (x, y) curve, saved as a PNG."""
    if not path:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=name)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction, for readable loss curves."""
    out, average = [], 0.0
    for step, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**step))
    return out
