"""The recurrent cells as data: everything the Python side asks of a cell, in one table.

A ``Cell`` gives the kernels' name for it, its gate blocks in the order the weight matrices
stack them (PyTorch's), whether it carries a cell state ``c`` besides ``h``, and the arrays each
layer and direction holds (PyTorch's parameter names, the kernel contract's names, the shapes in
the contract's symbols). ``functional``, ``modules``, ``reference``, the argument checks, the
benchmark and the tests read sizes and names from here, never from a cell's name.

A new cell, or a variant of one (another gate layout, another parameter), is one more entry:
``Cell("name", gates, has_c, params)``, with a parameter's dims drawn from ``Cell.sizes``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple


class Param(NamedTuple):
    """One array of a layer and direction."""

    name: str  # PyTorch's name before "_l{k}[_reverse]", e.g. "weight_ih"
    part: str  # its name in a weights tuple of the kernel contract, e.g. "w_ih"
    dims: tuple[str, ...]  # its shape in symbols of Cell.sizes, e.g. ("G*H", "I_k")
    bias: bool  # absent when a module has bias=False (the kernels then take zeros)


PARAMS = (
    Param("weight_ih", "w_ih", ("G*H", "I_k"), False),
    Param("weight_hh", "w_hh", ("G*H", "H"), False),
    Param("bias_ih", "b_ih", ("G*H",), True),
    Param("bias_hh", "b_hh", ("G*H",), True),
)


@dataclass(frozen=True, eq=False)  # one object per cell: compared and hashed by identity
class Cell:
    name: str  # the kernels' name: "rnn_tanh", "lstm", ...
    gates: tuple[str, ...]  # the gate blocks, stacked in this order in w_ih, w_hh and biases
    has_c: bool  # carries a cell state c (c0, c_n, dc0) besides h
    params: tuple[Param, ...] = PARAMS  # per layer and direction, in the weights tuple's order

    @property
    def num_gates(self) -> int:
        """G: the weight matrices have G*H rows."""
        return len(self.gates)

    @functools.cached_property
    def parts(self) -> tuple[str, ...]:
        """The kernel contract's names of a weights tuple, e.g. ("w_ih", "w_hh", "b_ih", "b_hh")."""
        return tuple(p.part for p in self.params)

    def sizes(self, fan_in: int, hidden: int) -> dict[str, int]:
        """What the symbols of Param.dims stand for in a layer reading fan_in features."""
        return {"G*H": self.num_gates * hidden, "H": hidden, "I_k": fan_in}

    @functools.cache  # noqa: B019 - cells are constants, and this runs on every call
    def shapes(self, fan_in: int, hidden: int) -> tuple[tuple[int, ...], ...]:
        """The shapes of one layer and direction's arrays, in the order of params."""
        sizes = self.sizes(fan_in, hidden)
        return tuple(tuple(sizes[d] for d in p.dims) for p in self.params)

    @functools.cache  # noqa: B019 - as shapes
    def spelled_shapes(self) -> tuple[str, ...]:
        """The shapes in symbols, for messages: ("(G*H, I_k)", "(G*H, H)", "(G*H,)", ...)."""
        return tuple(f"({', '.join(p.dims)}{',' if len(p.dims) == 1 else ''})"
                     for p in self.params)

    @functools.cache  # noqa: B019 - as shapes
    def parameter_count(self, fan_in: int, hidden: int, bias: bool = True) -> int:
        """How many numbers one layer and direction holds."""
        count = 0
        for param, shape in zip(self.params, self.shapes(fan_in, hidden), strict=True):
            if bias or not param.bias:
                count += _product(shape)
        return count


def _product(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


CELLS: dict[str, Cell] = {
    cell.name: cell
    for cell in (
        Cell("rnn_tanh", ("h",), has_c=False),
        Cell("rnn_relu", ("h",), has_c=False),
        Cell("lstm", ("i", "f", "g", "o"), has_c=True),
        Cell("gru", ("r", "z", "n"), has_c=False),
    )
}

# For messages: "only 'lstm' has a cell state".
WITH_C = tuple(name for name, cell in CELLS.items() if cell.has_c)
