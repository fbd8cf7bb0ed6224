"""``convert``: torch.nn's recurrent layers inside a model swapped for pyrnn's, in place."""

from __future__ import annotations

import torch

from .modules import GRU, LSTM, RNN, _RNNBase

__all__ = ["convert"]

_REPLACEMENTS: dict[type, type[_RNNBase]] = {torch.nn.LSTM: LSTM, torch.nn.GRU: GRU,
                                             torch.nn.RNN: RNN}


def convert(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every torch.nn.RNN, LSTM and GRU inside ``model`` (at any depth, ``model`` itself
    included) by pyrnn's module of the same class, and return the model.

    The new modules hold the very Parameter objects of the old ones (an optimizer built before
    the call keeps updating them), their hooks, mode and settings. Only those exact classes are
    replaced: a subclass may have changed forward and is left alone. The old module objects are
    left as they were.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert: expected a torch.nn.Module, got {type(model).__name__}")
    if type(model) in _REPLACEMENTS:
        return adopt(model)
    replaced: dict[int, _RNNBase] = {}  # a layer registered in two places stays one layer
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and type(child) in _REPLACEMENTS:
                if id(child) not in replaced:
                    replaced[id(child)] = adopt(child)
                setattr(parent, name, replaced[id(child)])
    return model


def adopt(module: torch.nn.Module) -> _RNNBase:
    """A pyrnn module sharing ``module``'s parameters, hooks and settings (``module`` is one of
    torch.nn.RNN, LSTM or GRU). Containers are copied, their contents shared, so that registering
    something on one module later does not change the other."""
    cls = _REPLACEMENTS[type(module)]
    new = cls.__new__(cls)
    torch.nn.Module.__init__(new)
    for key, value in module.__dict__.items():
        if isinstance(value, dict | list | set):
            value = type(value)(value)
        object.__setattr__(new, key, value)
    new._init_flat_weights()
    return new
