"""pyrnn inside PyTorch: torch.nn's RNN, LSTM and GRU run by pyrnn's C++ core.

    import pyrnn.torch
    model = pyrnn.torch.convert(model)        # every torch.nn.RNN/LSTM/GRU inside, in place
    lstm = pyrnn.torch.LSTM(64, 256, num_layers=2, batch_first=True)   # torch.nn's constructor

The modules take torch.nn's arguments and return its outputs, with its parameters; forward and
backward run as the operators ``torch.ops.pyrnn.rnn_forward`` / ``rnn_backward``, which
``torch.compile(fullgraph=True)`` traces. See docs/torch.md. Needs the ``torch`` extra
(``pip install "pyrnn[torch]"``); ``import pyrnn`` alone never imports torch.
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401
except ImportError as _error:
    raise ImportError("pyrnn.torch needs PyTorch, which is not installed here: "
                      "pip install 'pyrnn[torch]'") from _error

from ._convert import convert
from ._ops import kernel_threads
from .frozen import FrozenLayer
from .modules import GRU, LSTM, RNN, from_module

__all__ = ["RNN", "LSTM", "GRU", "FrozenLayer", "convert", "from_module", "kernel_threads"]
