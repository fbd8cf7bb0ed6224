"""pyrnn: fast CPU recurrent neural networks (RNN, LSTM, GRU) for NumPy.

The hot loops run in a C++ core (Eigen + OpenMP); every kernel has a pure-NumPy twin in
``pyrnn.reference`` that serves as fallback and oracle.
"""

import importlib as _importlib

from . import functional
from ._backend import (
    backend_info,
    get_num_threads,
    memory_info,
    release_memory,
    set_adaptive_threads,
    set_memory_cache_limit,
    set_num_threads,
)
from .cells import GRUCell, LSTMCell, RNNCell
from .module import Module, is_grad_enabled, no_grad
from .modules import GRU, LSTM, RNN, FrozenRNN

__version__ = "0.1.0"

# The training building blocks load on first use, so `import pyrnn` stays light and a
# problem in one of them cannot break the recurrent core.
_LAZY_MODULES = ("layers", "losses", "optim", "checkpoint")
_LAZY_NAMES = {"Linear": "layers", "Embedding": "layers", "one_hot": "layers"}

__all__ = [
    "FrozenRNN",
    "GRU",
    "GRUCell",
    "LSTM",
    "LSTMCell",
    "Module",
    "RNN",
    "RNNCell",
    "backend_info",
    "functional",
    "get_num_threads",
    "is_grad_enabled",
    "memory_info",
    "no_grad",
    "release_memory",
    "set_adaptive_threads",
    "set_memory_cache_limit",
    "set_num_threads",
    *_LAZY_MODULES,
    *_LAZY_NAMES,
]


def __getattr__(name: str) -> object:
    if name in _LAZY_MODULES:
        return _importlib.import_module(f".{name}", __name__)
    if name in _LAZY_NAMES:
        module = _importlib.import_module(f".{_LAZY_NAMES[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'pyrnn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
