"""The recurrent cells as data: everything the Python side asks of a cell, in one table.

A ``Cell`` gives the kernels' name for it, its gate blocks in the order the weight matrices
stack them (PyTorch's), whether it carries a cell state ``c`` besides ``h``, and which gates see
that state through peepholes. From these follow the arrays each layer and direction holds: the
kernel contract's weights tuple (``Part``, shapes in the contract's symbols) and a module's
parameters (``Param``, PyTorch's names). ``functional``, ``modules``, ``cells``, ``reference``,
the argument checks, the benchmark and the tests read sizes and names from here, never from a
cell's name.

A weights tuple has 4 parts (w_ih, w_hh, b_ih, b_hh), or 6 (..., w_peep, w_hr) when the cell has
peepholes or the stack is projected (an LSTM's ``proj_size``), with None for the one of those
two it lacks: one form per cell and projection (see the kernel contract in pyrnn/_backend.py).

A new cell, or a variant of one, is one more entry: ``Cell("name", gates, has_c, peepholes)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple


class Part(NamedTuple):
    """One array of a weights tuple of the kernel contract."""

    name: str  # e.g. "w_ih"
    dims: tuple[str, ...]  # its shape in symbols of Cell.sizes, e.g. ("G*H", "I_k")
    bias: bool  # absent when a module has bias=False (the kernels then take zeros)


PARTS = (
    Part("w_ih", ("G*H", "I_k"), False),
    Part("w_hh", ("G*H", "P"), False),
    Part("b_ih", ("G*H",), True),
    Part("b_hh", ("G*H",), True),
    Part("w_peep", ("K", "H"), False),  # one row per gate in Cell.peepholes
    Part("w_hr", ("P", "H"), False),  # the projection of a projected LSTM
)
BASE_PARTS = 4  # w_ih, w_hh, b_ih, b_hh: the whole tuple of a plain cell


class Param(NamedTuple):
    """One parameter of a module's layer and direction, and where it lies in a weights tuple."""

    name: str  # PyTorch's name before "_l{k}[_reverse]", e.g. "weight_ih", "weight_ci"
    part: int  # the index of its part in the weights tuple
    row: int | None  # a peephole vector is one row of w_peep; None: the whole part
    dims: tuple[str, ...]  # its own shape, in symbols of Cell.sizes
    bias: bool  # absent when a module has bias=False


_BASE_PARAMS = (
    Param("weight_ih", 0, None, PARTS[0].dims, False),
    Param("weight_hh", 1, None, PARTS[1].dims, False),
    Param("bias_ih", 2, None, PARTS[2].dims, True),
    Param("bias_hh", 3, None, PARTS[3].dims, True),
)


@dataclass(frozen=True, eq=False)  # one object per cell: compared and hashed by identity
class Cell:
    name: str  # the kernels' name: "rnn_tanh", "lstm", ...
    gates: tuple[str, ...]  # the gate blocks, stacked in this order in w_ih, w_hh and biases
    has_c: bool  # carries a cell state c (c0, c_n, dc0) besides h; such a cell may be projected
    peepholes: tuple[str, ...] = ()  # the gates reading c through w_peep, its rows in this order

    @property
    def num_gates(self) -> int:
        """G: the weight matrices have G*H rows."""
        return len(self.gates)

    @property
    def can_project(self) -> bool:
        """An LSTM cell, which may carry a projection w_hr (PyTorch's proj_size)."""
        return self.has_c

    @functools.cache  # noqa: B019 - cells are constants, and this runs on every call
    def parts(self, projected: bool = False) -> tuple[Part | None, ...]:
        """The weights tuple's form: 4 parts, or 6 with None for w_peep or w_hr if absent."""
        if not self.peepholes and not projected:
            return PARTS[:BASE_PARTS]
        return (*PARTS[:BASE_PARTS], PARTS[4] if self.peepholes else None,
                PARTS[5] if projected else None)

    @functools.cache  # noqa: B019 - as parts
    def part_names(self, projected: bool = False) -> tuple[str, ...]:
        """The names of the weights tuple's slots, e.g. ("w_ih", "w_hh", "b_ih", "b_hh")."""
        return tuple(p.name for p in PARTS[:len(self.parts(projected))])

    def sizes(self, fan_in: int, hidden: int, proj: int = 0) -> dict[str, int]:
        """What the symbols of the dims stand for in a layer reading fan_in features; P is the
        width of h (proj, or hidden without projection)."""
        return {"G*H": self.num_gates * hidden, "H": hidden, "P": proj or hidden, "I_k": fan_in,
                "K": len(self.peepholes)}

    @functools.cache  # noqa: B019 - as parts
    def shapes(self, fan_in: int, hidden: int,
               proj: int = 0) -> tuple[tuple[int, ...] | None, ...]:
        """The shapes of one layer and direction's weights tuple (None for an absent part)."""
        sizes = self.sizes(fan_in, hidden, proj)
        return tuple(None if p is None else tuple(sizes[d] for d in p.dims)
                     for p in self.parts(bool(proj)))

    @functools.cache  # noqa: B019 - as parts
    def spelled_shapes(self, projected: bool = False) -> tuple[str | None, ...]:
        """The shapes in symbols, for messages: ("(G*H, I_k)", "(G*H, P)", "(G*H,)", ...)."""
        return tuple(None if p is None else _spelled(p.dims) for p in self.parts(projected))

    @functools.cache  # noqa: B019 - as parts
    def params(self, projected: bool = False) -> tuple[Param, ...]:
        """A module's parameters per layer and direction, in PyTorch's order (weight_hr last)."""
        peep = tuple(Param(f"weight_c{gate}", 4, row, ("H",), False)
                     for row, gate in enumerate(self.peepholes))
        proj = (Param("weight_hr", 5, None, PARTS[5].dims, False),) if projected else ()
        return _BASE_PARAMS + peep + proj

    @functools.cache  # noqa: B019 - as parts
    def parameter_count(self, fan_in: int, hidden: int, bias: bool = True,
                        proj: int = 0) -> int:
        """How many numbers one layer and direction holds."""
        sizes = self.sizes(fan_in, hidden, proj)
        return sum(_product(sizes[d] for d in p.dims)
                   for p in self.params(bool(proj)) if bias or not p.bias)


def _spelled(dims: tuple[str, ...]) -> str:
    return f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"


def _product(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


CELLS: dict[str, Cell] = {
    cell.name: cell
    for cell in (
        Cell("rnn_tanh", ("h",), has_c=False),
        Cell("rnn_relu", ("h",), has_c=False),
        Cell("lstm", ("i", "f", "g", "o"), has_c=True),
        Cell("gru", ("r", "z", "n"), has_c=False),
        # Gers and Schmidhuber's peepholes, as ONNX's LSTM input P: i and f read c_{t-1}, o c_t.
        Cell("lstm_peephole", ("i", "f", "g", "o"), has_c=True, peepholes=("i", "f", "o")),
        # The coupled input and forget gate: i = 1 - f.
        Cell("lstm_coupled", ("f", "g", "o"), has_c=True),
        Cell("lstm_coupled_peephole", ("f", "g", "o"), has_c=True, peepholes=("f", "o")),
        # The original GRU: the reset gate applies to h_{t-1} before the recurrent product.
        Cell("gru_reset_before", ("r", "z", "n"), has_c=False),
    )
}

# The four cells every build of the C++ core runs (a build says what more it runs).
PLAIN_CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")


def features_needed(cell: str, projected: bool = False, residual: bool = False) -> set[str]:
    """What a stack of that cell and options asks of a backend, in the words of the C++ core's
    features(): its cell's name, "projection", "residual"."""
    return {cell} | ({"projection"} if projected else set()) | ({"residual"} if residual else set())


def rnn_cell(nonlinearity: str) -> str:
    """The cell of pyrnn.RNN(nonlinearity=...) ("tanh" or "relu", checked by the caller)."""
    return f"rnn_{nonlinearity}"


def lstm_cell(peephole: bool = False, coupled_gates: bool = False) -> str:
    """The cell of pyrnn.LSTM(peephole=..., coupled_gates=...)."""
    return "lstm" + ("_coupled" if coupled_gates else "") + ("_peephole" if peephole else "")


def gru_cell(reset_after: bool = True) -> str:
    """The cell of pyrnn.GRU(reset_after=...)."""
    return "gru" if reset_after else "gru_reset_before"
