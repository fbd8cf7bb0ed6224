"""pyrnn: fast CPU recurrent neural networks (RNN, LSTM, GRU) for NumPy.

The hot loops run in a C++ core (Eigen + OpenMP); every kernel has a pure-NumPy twin in
``pyrnn.reference`` that serves as fallback and oracle.
"""

from ._backend import backend_info, get_num_threads, set_num_threads
from .module import Module, is_grad_enabled, no_grad

__version__ = "0.1.0"

__all__ = [
    "Module",
    "backend_info",
    "get_num_threads",
    "is_grad_enabled",
    "no_grad",
    "set_num_threads",
]
