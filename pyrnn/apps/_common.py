"""What every application shares: common flags, argument types, checks made before any work
(output paths, memory), progress bar, JSON, plots."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from .. import _backend, _checks
from ..module import Module, no_grad


class AppError(RuntimeError):
    """A problem the user can fix (a bad argument, a missing or damaged file, a missing extra):
    printed on one line without a traceback; the command exits with status 2."""


class Diverged(AppError):
    """Training stopped at a loss or weights that are not finite; the command exits with 3."""


class Parser(argparse.ArgumentParser):
    """argparse's parser with its errors on one line, as every other user error (the usage it
    would print first is one --help away). Subcommands' parsers are of this class too."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def cache_dir() -> str:
    """Where the apps write by default: $XDG_CACHE_HOME/pyrnn, else ~/.cache/pyrnn."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # unset, or relative, which the XDG spec says to ignore
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pyrnn")


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


def check_common_arguments(args: argparse.Namespace, *outputs: str) -> None:
    """Fail before any work: --threads beyond the core's limit, --plot without matplotlib,
    output paths (--json, --plot and the app's own `outputs` flags) that cannot be written."""
    limit = getattr(_backend._core, "max_threads", None)
    if args.threads is not None and limit is not None and args.threads > limit:
        raise AppError(f"--threads {args.threads}: the C++ core runs at most {limit} threads")
    if getattr(args, "plot", None) and not matplotlib_available():
        raise AppError("--plot needs matplotlib, which is not installed: pip install 'pyrnn[plot]'")
    check_outputs(args, ("json", "plot", *outputs))


def check_outputs(args: argparse.Namespace, flags: Sequence[str]) -> None:
    """Every output path given (or defaulted) can be written, and no two are the same file."""
    seen: dict[str, str] = {}
    for flag in flags:
        path = getattr(args, flag, None)
        if not path:
            continue
        target = check_output_path(f"--{flag.replace('_', '-')}", path)
        if target in seen:
            raise AppError(f"--{flag.replace('_', '-')} {path}: the same file as {seen[target]}")
        seen[target] = f"--{flag.replace('_', '-')}"


def check_output_path(flag: str, path: str) -> str:
    """The file `path` names (a symbolic link followed, as writing it would), after checking
    that it can be written: its folder exists (pyrnn's own cache folder is made) and is writable,
    and it is not a folder or a read-only file."""
    target = os.path.realpath(path)
    folder = os.path.dirname(target)
    if folder == os.path.realpath(cache_dir()):
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:
            raise AppError(f"{flag} {path}: cannot make {folder}: {error.strerror}") from None
    if os.path.isdir(target):
        raise AppError(f"{flag} {path}: is a folder; give a file name")
    if not os.path.isdir(folder):
        raise AppError(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise AppError(f"{flag} {path}: folder {folder} is not writable")
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise AppError(f"{flag} {path}: the file is not writable")
    return target


def check_fits(parts: Mapping[str, int], itemsize: int) -> None:
    """Refuse a run whose arrays cannot fit in this machine's memory, before any is allocated.
    parts: what needs how many numbers of `itemsize` bytes, each named by the flags that size
    it; the message names the largest."""
    largest = max(parts, key=lambda part: parts[part])
    try:
        _checks.fits_in_memory(f"{largest} (with the rest of the run)", sum(parts.values()),
                               itemsize)
    except ValueError as error:
        raise AppError(str(error)) from None


def check_finite_loss(loss: float, where: str, args: argparse.Namespace, kept: str = "") -> None:
    """Stop at the first loss that is nan or inf, before its gradients reach the weights.
    where: "step 12", say; kept: what the checkpoint holds, as the end of a sentence."""
    if not math.isfinite(loss):
        raise Diverged(f"training diverged at {where}: the loss is {loss}; try a smaller --lr "
                       f"than {args.lr:g}{kept}")


def weights_finite(model: Module) -> bool:
    return all(np.isfinite(value).all() for _, value, _ in model.named_parameters())


def setup_runtime(args: argparse.Namespace) -> str:
    """Apply --threads and resolve --backend; returns the concrete backend name."""
    try:
        backend = _backend.resolve(args.backend)
    except RuntimeError as error:
        raise AppError(f"--backend {args.backend}: {error}") from None
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
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(_plain(figures), f, indent=2, sort_keys=True)
            f.write("\n")
    except OSError as error:
        raise AppError(f"--json {path}: cannot write it: {error.strerror}") from None
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
    save_figure(fig, path, dpi=120)


def save_figure(fig: object, path: str, dpi: int) -> None:
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=dpi)
    except OSError as error:
        raise AppError(f"--plot {path}: cannot write it: {error.strerror}") from None
    finally:
        plt.close(fig)
    print(f"wrote {path}")


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction, for readable loss curves."""
    out, average = [], 0.0
    for step, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**step))
    return out
