"""pyrnn's stack of recurrent layers as two torch operators, ``pyrnn::rnn_forward`` and
``pyrnn::rnn_backward``, defined with ``torch.library``.

The forward operator runs the kernel contract's ``stack_forward`` (``pyrnn/_backend.py``) on the
tensors' own memory: contiguous CPU float32/float64 tensors are passed to the core without a copy,
and the outputs are NumPy arrays the returned tensors share. In training it also returns a
*handle*: a one-element int64 tensor (of value 0) whose memory owns the kernel's tape. The tape
lives as long as that memory (the tensor's storage), and in eager mode also as long as the
autograd node that saved it; ``rnn_backward`` finds it again by the memory's address, which no
other live handle shares. So the tape is freed with the graph, backward never runs a second
forward, and any number of graphs may be alive in any threads. Under ``torch.compile`` the handle
is an ordinary graph tensor, and the fake (meta) implementations below let ``fullgraph=True``
trace through both operators; every call returns equal values, as torch.library.opcheck requires.

The cell variants (the kernel contract's cells "lstm_peephole", "lstm_coupled",
"lstm_coupled_peephole", "gru_reset_before", a projected LSTM, residual stacks) run through the
same operators: ``cell`` names the variant, and the schema arguments ``projected`` and
``residual`` (forward) and ``hidden_size`` (backward) default to the plain stack, so calls and
traced graphs from before them keep their meaning. A call runs on the C++ core when its
``features()`` lists what the stack needs, else on the NumPy reference kernels (same contract,
slower); the backward pass runs on the kernels of its forward pass.

Arguments are checked by the modules (``pyrnn.torch.modules``) before they call these.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence

import numpy as np
import torch

from .. import _backend, _checks
from .._cells import CELLS, PLAIN_CELLS

__all__ = ["rnn_forward", "rnn_backward", "kernel_threads", "kernel_backend"]

Tensor = torch.Tensor

FORWARD_SCHEMA = (
    "(str cell, Tensor x, Tensor h0, Tensor? c0, Tensor[] weights, bool has_biases, "
    "bool bidirectional, Tensor? lengths, Tensor[] dropout_masks, bool keep_tape, "
    "bool projected=False, bool residual=False) -> (Tensor, Tensor, Tensor, Tensor)"
)
BACKWARD_SCHEMA = (
    "(Tensor handle, Tensor d_out, Tensor? d_h_n, Tensor? d_c_n, str cell, SymInt input_size, "
    "int num_layers, bool bidirectional, bool has_biases, SymInt hidden_size=0) -> Tensor[]"
)


# ----------------------------------------------------------------------------------- threads

def kernel_threads() -> int:
    """Make the core use torch's intra-op thread count, unless the user set pyrnn's own
    (``pyrnn.set_num_threads``); returns the count the next kernel call uses. The core and torch
    share one OpenMP runtime in a process, so a team of this size reuses torch's pool threads."""
    if not _backend.threads_set_by_user():
        wanted = torch.get_num_threads()
        if _backend.get_num_threads() != wanted:
            _backend.set_core_threads(wanted)
    return _backend.get_num_threads()


# ------------------------------------------------------------------------------------ tapes

class _TapeHandle(np.ndarray):
    """The handle's memory: one int64 (0), with the kernel tape as an attribute, so that
    whatever owns the memory (the handle tensor's storage) owns the tape."""

    tape: object
    spec: object  # the forward's Cell and (T, B, I, H, L, D), to weigh the backward's memory
    dims: tuple[int, ...]
    backend: str  # the kernels that ran the forward pass ("cpp" or "numpy"), for its backward


# Live handles' memory by address. An entry leaves when its memory is freed; a later handle at the
# same address replaces it only after that (the weak dictionary drops dead entries only).
_tapes: weakref.WeakValueDictionary[int, _TapeHandle] = weakref.WeakValueDictionary()
_tapes_lock = threading.Lock()


def _new_handle(tape: object) -> tuple[Tensor, _TapeHandle]:
    """A handle tensor for the tape, and its memory (which holds the tape)."""
    memory = np.zeros(1, dtype=np.int64).view(_TapeHandle)
    memory.tape = tape
    with _tapes_lock:
        _tapes[memory.ctypes.data] = memory
    return torch.from_numpy(memory), memory


def _tape_memory(handle: Tensor) -> _TapeHandle | None:
    """The tape's owner for a real handle tensor (None for a fake one, met while tracing, or for
    a handle whose tape was freed)."""
    if type(handle) is not torch.Tensor or handle.device.type != "cpu" or handle.numel() != 1:
        return None
    with _tapes_lock:
        return _tapes.get(handle.data_ptr())


def live_tapes() -> int:
    """How many tapes are alive (for tests: graphs freed must leave none behind)."""
    with _tapes_lock:
        return len(_tapes)


# -------------------------------------------------------------------------- NumPy views

def _array(t: Tensor) -> np.ndarray:
    """t's memory as a C-contiguous array (a copy only when t is not contiguous)."""
    if t.requires_grad:  # a parameter: below autograd it still says so, and numpy() refuses it
        t = t.detach()
    return (t if t.is_contiguous() else t.contiguous()).numpy()


def _kernel_weights(weights: Sequence[Tensor], cell: str, has_biases: bool, projected: bool,
                    entries: int) -> list[tuple[np.ndarray | None, ...]]:
    """The flat parameter list as the kernel's tuples. Per layer and direction the list holds
    w_ih, w_hh[, b_ih, b_hh], then the cell's K peephole vectors (H,) (its gates' order), then
    w_hr (P, H) if projected: torch's ``_flat_weights`` order, pyrnn's names in between. Zero
    arrays stand in for absent biases; the peephole vectors are stacked into one w_peep (K, H)
    (a copy), and the tuple has 6 parts when the cell has peepholes or the stack is projected."""
    peepholes = len(CELLS[cell].peepholes)
    base = 4 if has_biases else 2
    per_entry = base + peepholes + projected
    arrays = [_array(w) for w in weights]
    zeros = None if has_biases else np.zeros(arrays[1].shape[0], arrays[1].dtype)
    result = []
    for k in range(entries):
        own = arrays[per_entry * k:per_entry * (k + 1)]
        entry = tuple(own[:4]) if has_biases else (own[0], own[1], zeros, zeros)
        if peepholes or projected:
            w_peep = np.stack(own[base:base + peepholes]) if peepholes else None
            entry += (w_peep, own[-1] if projected else None)
        result.append(entry)
    return result


def _flat_grads(d_weights: Sequence[tuple[np.ndarray | None, ...]], has_biases: bool
                ) -> list[Tensor]:
    """The kernel's weight gradients in the flat list's order (_kernel_weights): the gradients
    of the zero biases that stood in are dropped, w_peep's rows are the vectors' gradients."""
    flat = []
    for entry in d_weights:
        flat += entry[:4] if has_biases else entry[:2]
        if len(entry) > 4:
            flat += [] if entry[4] is None else list(entry[4])
            flat += [] if entry[5] is None else [entry[5]]
    return [torch.from_numpy(g) for g in flat]


def kernel_backend(cell: str, projected: bool = False, residual: bool = False) -> str:
    """The kernels that run such a stack: "cpp" when the loaded C++ core's features() lists
    all it needs, else "numpy" (the reference). residual counts only with more than one layer,
    where it does something (the callers pass it so)."""
    if cell in PLAIN_CELLS and not (projected or residual):  # every build of the core runs these
        return "cpp" if _backend.cpp_available() else "numpy"
    return "numpy" if _backend.missing_in_cpp(cell, projected, residual) else "cpp"


def _kernels(backend: str) -> _backend.Kernels:
    """The kernels without their argument checks: the modules have checked the arguments with
    torch's checks, and tensors' arrays are native, aligned and C-contiguous (_array), lengths
    int64. What a direct call to the operators gets wrong meets the core's guards, which raise."""
    return _backend.prechecked(backend)


# ------------------------------------------------------------------------ registration

# The operators are defined with torch.library's Library API (define, impl, register_fake) and an
# Autograd kernel of their own rather than with the torch.library.custom_op decorator, whose Python
# layers and generated autograd wrapper (for tensor lists) cost several times as much a call at
# batch 1 (figures in the commit that chose this, 67f4551).
_lib = torch.library.Library("pyrnn", "DEF")  # the registrations live as long as this object
_lib.define("rnn_forward" + FORWARD_SCHEMA)
_lib.define("rnn_backward" + BACKWARD_SCHEMA)


def _stack_forward(cell: str, x: Tensor, h0: Tensor, c0: Tensor | None, weights: list[Tensor],
                   has_biases: bool, bidirectional: bool, lengths: Tensor | None,
                   dropout_masks: list[Tensor], keep_tape: bool, projected: bool = False,
                   residual: bool = False
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, _TapeHandle | None]:
    """The kernel call: _forward_cpu's outputs and the handle's memory (None without a tape)."""
    kernel_threads()
    T, B, I = x.shape  # noqa: N806, E741
    D = 2 if bidirectional else 1  # noqa: N806
    L = h0.shape[0] // D  # noqa: N806
    H = c0.shape[2] if projected else h0.shape[2]  # noqa: N806 - the gates' width
    residual = residual and L > 1  # what the kernels and features() mean by it
    backend = kernel_backend(cell, projected, residual)
    _checks.call_fits("x", x.shape, _checks.stack_bytes(
        CELLS[cell], (T, B, I, H, L, D), x.element_size(), "train" if keep_tape else "infer",
        backend, (lengths is not None) * I), _checks.STACK_CALL)
    out, h_n, c_n, tape = _kernels(backend).stack_forward(
        cell, _array(x), _array(h0), None if c0 is None else _array(c0),
        _kernel_weights(weights, cell, has_biases, projected, h0.shape[0]), bidirectional,
        None if lengths is None else _array(lengths),
        [_array(m) for m in dropout_masks] or None, keep_tape, None, residual)
    c_n = torch.from_numpy(c_n) if c_n is not None else x.new_empty(0)
    if keep_tape:
        handle, memory = _new_handle(tape)
        memory.spec, memory.dims, memory.backend = CELLS[cell], (T, B, I, H, L, D), backend
    else:
        handle, memory = x.new_empty(0, dtype=torch.int64), None
    return torch.from_numpy(out), torch.from_numpy(h_n), c_n, handle, memory


def _forward_cpu(cell: str, x: Tensor, h0: Tensor, c0: Tensor | None, weights: list[Tensor],
                 has_biases: bool, bidirectional: bool, lengths: Tensor | None,
                 dropout_masks: list[Tensor], keep_tape: bool, projected: bool = False,
                 residual: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (T, B, I), h0 (L*D, B, P) and c0 (L*D, B, H) (P = H unless projected), weights as
    _kernel_weights reads them, lengths int64 (B,) or None, dropout_masks [] or L-1 tensors
    (T, B, D*P). Returns (out (T, B, D*P), h_n, c_n (an empty tensor for cells without c),
    handle (empty unless keep_tape))."""
    return _stack_forward(cell, x, h0, c0, weights, has_biases, bidirectional, lengths,
                          dropout_masks, keep_tape, projected, residual)[:4]


def _forward_fake(cell, x, h0, c0, weights, has_biases, bidirectional, lengths, dropout_masks,
                  keep_tape, projected=False, residual=False):
    T, B, _ = x.shape  # noqa: N806
    D = 2 if bidirectional else 1  # noqa: N806
    out = x.new_empty((T, B, D * h0.shape[2]))
    c_n = c0.new_empty(c0.shape) if c0 is not None else x.new_empty(0)
    handle = x.new_empty(1 if keep_tape else 0, dtype=torch.int64)
    return out, h0.new_empty(h0.shape), c_n, handle


def _backward_cpu(handle: Tensor, d_out: Tensor, d_h_n: Tensor | None, d_c_n: Tensor | None,
                  cell: str, input_size: int, num_layers: int, bidirectional: bool,
                  has_biases: bool, hidden_size: int = 0) -> list[Tensor]:
    """The gradients of the forward pass whose handle this is, from d_out (T, B, D*P) and d_h_n
    (L*D, B, P), d_c_n (L*D, B, H) or None (zero): [dx, dh0, dc0 (empty for cells without c),
    then the weight gradients in the order of the forward's weights]. hidden_size: H of a
    projected stack (0: not projected, H = P)."""
    memory = _tape_memory(handle)
    if memory is None:
        if handle.numel() == 0:
            raise RuntimeError("pyrnn::rnn_backward: the forward pass kept no tape "
                               "(keep_tape=False); run it with keep_tape=True")
        raise RuntimeError("pyrnn::rnn_backward: the tape of this forward pass has been freed "
                           "(its graph was released)")
    return _stack_backward(memory, d_out, d_h_n, d_c_n, has_biases)


def _stack_backward(memory: _TapeHandle, d_out: Tensor, d_h_n: Tensor | None,
                    d_c_n: Tensor | None, has_biases: bool) -> list[Tensor]:
    """The kernel call under _backward_cpu, given the handle's memory."""
    kernel_threads()
    _checks.call_fits("d_out", d_out.shape, _checks.stack_bytes(
        memory.spec, memory.dims, d_out.element_size(), "backward", memory.backend),
        _checks.STACK_CALL)
    dx, dh0, dc0, d_weights = _kernels(memory.backend).stack_backward(
        memory.tape, _array(d_out), None if d_h_n is None else _array(d_h_n),
        None if d_c_n is None else _array(d_c_n))
    dc0 = torch.from_numpy(dc0) if dc0 is not None else d_out.new_empty(0)
    return [torch.from_numpy(dx), torch.from_numpy(dh0), dc0, *_flat_grads(d_weights, has_biases)]


def _backward_fake(handle, d_out, d_h_n, d_c_n, cell, input_size, num_layers, bidirectional,
                   has_biases, hidden_size=0):
    T, B, DP = d_out.shape  # noqa: N806
    D = 2 if bidirectional else 1  # noqa: N806
    P = DP // D  # noqa: N806
    H = hidden_size or P  # noqa: N806
    spec = CELLS[cell]
    dc0 = d_out.new_empty((num_layers * D, B, H)) if spec.has_c else d_out.new_empty(0)
    flat = []
    for layer in range(num_layers):
        sizes = spec.sizes(input_size if layer == 0 else DP, H, P if hidden_size else 0)
        shapes = [tuple(sizes[d] for d in param.dims)
                  for param in spec.params(bool(hidden_size)) if has_biases or not param.bias]
        flat += [d_out.new_empty(shape) for _ in range(D) for shape in shapes]
    return [d_out.new_empty((T, B, input_size)), d_out.new_empty((num_layers * D, B, P)), dc0,
            *flat]


_lib.impl("rnn_forward", _forward_cpu, "CPU")
_lib.impl("rnn_backward", _backward_cpu, "CPU")
torch.library.register_fake("pyrnn::rnn_forward", _forward_fake, lib=_lib)
torch.library.register_fake("pyrnn::rnn_backward", _backward_fake, lib=_lib)


# ---------------------------------------------------------------------------- autograd

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _direct(*tensors: Tensor) -> bool:
    """Whether a call below autograd may run the CPU implementation itself rather than go back
    through the dispatcher to it: plain CPU tensors and no dispatch mode active (fake tensors,
    functionalization and tracing all take the dispatcher). It saves a crossing into C++ and
    back with the arguments converted both ways."""
    return (torch._C._len_torch_dispatch_stack() == 0
            and all(type(t) in _PLAIN and t.device.type == "cpu" for t in tensors))


def _forward_below_autograd(*args):
    if _direct(args[1], args[2]):  # x, h0
        return _forward_cpu(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.pyrnn.rnn_forward.default(*args)


def _backward_below_autograd(*args):
    if _direct(args[0], args[1]):  # handle, d_out
        return _backward_cpu(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.pyrnn.rnn_backward.default(*args)


class _StackFunction(torch.autograd.Function):
    """The forward operator under autograd. meta = (cell, has_biases, bidirectional, lengths,
    dropout_masks, projected, residual); the tensor inputs are x, h0, c0 (None for cells
    without one), weights."""

    @staticmethod
    def forward(ctx, meta, x, h0, c0, *weights):
        cell, has_biases, bidirectional, lengths, dropout_masks, projected, residual = meta
        args = (cell, x, h0, c0, list(weights), has_biases, bidirectional, lengths,
                dropout_masks, True, projected, residual)
        if _direct(x, h0):
            out, h_n, c_n, handle, memory = _stack_forward(*args)
        else:  # tracing: fake tensors, no tape to hold
            with torch._C._AutoDispatchBelowAutograd():
                out, h_n, c_n, handle = torch.ops.pyrnn.rnn_forward.default(*args)
            memory = None
        ctx.save_for_backward(handle)
        ctx.mark_non_differentiable(handle)
        ctx.meta = (cell, x.shape[2], h0.shape[0] // (2 if bidirectional else 1), bidirectional,
                    has_biases, c0.shape[2] if projected else 0)
        # Eager mode: the autograd node holds the tape too, so that it outlives any copy that
        # saved-tensor hooks (offloading, say) make of the handle.
        ctx.tape = memory
        return out, h_n, c_n, handle

    @staticmethod
    def backward(ctx, d_out, d_h_n, d_c_n, _d_handle):
        cell, input_size, num_layers, bidirectional, has_biases, hidden_size = ctx.meta
        has_c = CELLS[cell].has_c
        d_c_n = d_c_n if has_c else None
        if ctx.tape is not None and not torch.is_grad_enabled() and _direct(d_out):
            grads = _stack_backward(ctx.tape, d_out, d_h_n, d_c_n, has_biases)
        else:  # tracing, or create_graph=True: through the operator (and its autograd)
            (handle,) = ctx.saved_tensors
            grads = torch.ops.pyrnn.rnn_backward.default(
                handle, d_out, d_h_n, d_c_n, cell, input_size, num_layers, bidirectional,
                has_biases, hidden_size)
        dc0 = grads[2] if has_c else None
        return (None, grads[0], grads[1], dc0, *grads[3:])


def _forward_autograd(cell, x, h0, c0, weights, has_biases, bidirectional, lengths,
                      dropout_masks, keep_tape, projected=False, residual=False):
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or h0.requires_grad or (c0 is not None and c0.requires_grad)
        or any(w.requires_grad for w in weights))
    if not needs_grad:
        return _forward_below_autograd(cell, x, h0, c0, weights, has_biases, bidirectional,
                                       lengths, dropout_masks, keep_tape, projected, residual)
    meta = (cell, has_biases, bidirectional, lengths, dropout_masks, projected, residual)
    return _StackFunction.apply(meta, x, h0, c0, *weights)


class _NoDoubleBackward(torch.autograd.Function):
    """rnn_backward's outputs when its inputs require grad: differentiating them raises."""

    @staticmethod
    def forward(ctx, args, *tensors):
        return tuple(_backward_below_autograd(*args))

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "pyrnn: double backward through a pyrnn recurrent layer (differentiating its "
            "gradients, as autograd.grad(..., create_graph=True) followed by another backward "
            "does) is not supported; keep torch.nn's module for that layer")


def _backward_autograd(handle, d_out, d_h_n, d_c_n, cell, input_size, num_layers,
                       bidirectional, has_biases, hidden_size=0):
    args = (handle, d_out, d_h_n, d_c_n, cell, input_size, num_layers, bidirectional,
            has_biases, hidden_size)
    tensors = [t for t in (d_out, d_h_n, d_c_n) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return list(_NoDoubleBackward.apply(args, *tensors))
    return _backward_below_autograd(*args)


_lib.impl("rnn_forward", _forward_autograd, "Autograd")
_lib.impl("rnn_backward", _backward_autograd, "Autograd")


def _eager() -> bool:
    """Whether nothing but autograd would run between a call of the operator and its kernels:
    no compiler, tracer, profiler, torch.func transform or torch-function mode, which must see
    the operator itself."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing()
                or torch._C._is_torch_function_mode_enabled()
                or torch._C._are_functorch_transforms_active()
                or torch.autograd.profiler._is_profiler_enabled)


def rnn_forward(cell: str, x: Tensor, h0: Tensor, c0: Tensor | None, weights: list[Tensor],
                has_biases: bool, bidirectional: bool, lengths: Tensor | None,
                dropout_masks: list[Tensor], keep_tape: bool, projected: bool = False,
                residual: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``torch.ops.pyrnn.rnn_forward`` (see _forward_cpu for the arguments). In plain eager
    mode on plain CPU tensors, its Autograd kernel is called here rather than through the
    dispatcher, which would call that same kernel after a crossing into C++ and back with every
    argument converted both ways (about 20 us a call)."""
    args = (cell, x, h0, c0, weights, has_biases, bidirectional, lengths, dropout_masks,
            keep_tape, projected, residual)
    if _eager() and _direct(x, h0):
        return _forward_autograd(*args)
    return torch.ops.pyrnn.rnn_forward.default(*args)


def rnn_backward(handle: Tensor, d_out: Tensor, d_h_n: Tensor | None, d_c_n: Tensor | None,
                 cell: str, input_size: int, num_layers: int, bidirectional: bool,
                 has_biases: bool, hidden_size: int = 0) -> list[Tensor]:
    """``torch.ops.pyrnn.rnn_backward``: see _backward_cpu for the arguments."""
    return torch.ops.pyrnn.rnn_backward.default(handle, d_out, d_h_n, d_c_n, cell, input_size,
                                                num_layers, bidirectional, has_biases,
                                                hidden_size)
