"""The implementations under test, each behind the same small interface.

``BACKENDS[name]`` is a ``Backend``: ``unavailable()`` says why it cannot run here (None if it
can), ``unsupported(case)`` why it cannot run one case, and ``prepare(case, data)`` builds a
``Runner`` from the case's shared weights and inputs. A runner's ``call()`` is the work being
timed; ``result(value)`` turns what ``call()`` returned into named NumPy arrays for the
agreement check ("out", "h_n", "c_n"; in training also "dx" and every weight gradient by its
PyTorch name); ``scope()`` is entered around each batch of timed calls (thread settings).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import pyrnn
from pyrnn import _backend
from pyrnn._cells import CELLS

KERNEL_CELL = {"lstm": "lstm", "gru": "gru", "rnn": "rnn_tanh"}  # the bench's "rnn" is tanh's
PARAMS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


@dataclass(frozen=True)
class Case:
    """One row of the benchmark: a configuration, a cell, a mode and a thread count."""

    config: dict
    cell: str
    mode: str
    threads: int

    def __getattr__(self, key: str) -> Any:  # case.T, case.H, ... read the configuration
        if key in ("T", "B", "I", "H", "L", "D"):
            return self.config[key]
        raise AttributeError(key)

    @property
    def label(self) -> str:
        return f"{self.config['name']}/{self.cell}/{self.mode}/{self.threads}t"


@dataclass
class Data:
    """What every backend of a case shares: weights by PyTorch name, input, lengths, d_out."""

    weights: dict[str, np.ndarray]
    x: np.ndarray
    lengths: np.ndarray | None
    d_out: np.ndarray
    extra: dict = field(default_factory=dict)


def num_gates(cell: str) -> int:
    """G of a bench cell ("lstm", "gru", "rnn"): its weights have G*H rows."""
    return CELLS[KERNEL_CELL[cell]].num_gates


def param_names(case: Case) -> list[str]:
    """PyTorch's parameter names in kernel-contract order (l0, l0_reverse, l1, ...)."""
    suffixes = ["", "_reverse"][: case.D]
    return [f"{p}_l{k}{s}" for k in range(case.L) for s in suffixes for p in PARAMS]


def make_data(case: Case, seed: int = 0) -> Data:
    """Seeded weights (PyTorch's init range), input, lengths and upstream gradient."""
    rng = np.random.default_rng(seed)
    g_h, bound = num_gates(case.cell) * case.H, 1.0 / np.sqrt(case.H)
    weights = {}
    for name in param_names(case):
        layer = int(name.split("_l")[1].split("_")[0])
        fan_in = case.I if layer == 0 else case.D * case.H
        shape = {"weight_ih": (g_h, fan_in), "weight_hh": (g_h, case.H)}.get(
            name.rsplit("_l", 1)[0], (g_h,)
        )
        weights[name] = rng.uniform(-bound, bound, shape).astype(np.float32)
    x = rng.uniform(-1, 1, (case.T, case.B, case.I)).astype(np.float32)
    d_out = rng.standard_normal((case.T, case.B, case.D * case.H)).astype(np.float32)
    return Data(weights, x, draw_lengths(case), d_out)


def draw_lengths(case: Case) -> np.ndarray | None:
    spec = case.config.get("lengths")
    if spec is None:
        return None
    rng = np.random.default_rng(spec["seed"])
    lengths = rng.integers(spec["low"], spec["high"], size=case.B, endpoint=True)
    return np.minimum(lengths, case.T).astype(np.int64)


class Runner:
    def scope(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def call(self) -> Any:
        raise NotImplementedError

    def result(self, value: Any) -> dict[str, np.ndarray]:
        raise NotImplementedError


class Backend:
    name = ""

    def unavailable(self) -> str | None:
        return None

    def unsupported(self, case: Case) -> str | None:
        return None

    def prepare(self, case: Case, data: Data) -> Runner:
        raise NotImplementedError


# ---------------------------------------------------------------- pyrnn (public API or kernels)

def pyrnn_api() -> str:
    """"module" once pyrnn.LSTM/GRU/RNN exist (what users run), else "kernels" (the contract)."""
    return "module" if all(hasattr(pyrnn, n) for n in ("LSTM", "GRU", "RNN")) else "kernels"


class PyrnnModuleRunner(Runner):
    def __init__(self, case: Case, data: Data, backend: str):
        cls = {"lstm": pyrnn.LSTM, "gru": pyrnn.GRU, "rnn": pyrnn.RNN}[case.cell]
        kwargs = {"nonlinearity": "tanh"} if case.cell == "rnn" else {}
        self.net = cls(case.I, case.H, num_layers=case.L, bidirectional=case.D == 2,
                       dtype=np.float32, backend=backend, **kwargs)
        self.net.load_state_dict(data.weights)
        self.net.train(case.mode == "train")
        # Inference runs the frozen module, the weights packed once as ONNX Runtime's session
        # holds them; training runs the module, whose weights change between steps.
        self.run = self.net.frozen() if case.mode == "infer" else self.net
        self.case, self.data = case, data
        self.d_state = (None, None) if case.cell == "lstm" else None

    def scope(self):
        pyrnn.set_num_threads(self.case.threads)
        return contextlib.nullcontext()

    def forward(self):
        if self.data.lengths is None:
            return self.run(self.data.x)
        return self.run(self.data.x, lengths=self.data.lengths)

    def call(self):
        if self.case.mode == "infer":
            return self.forward()
        self.net.zero_grad()
        out, state = self.forward()
        dx, _ = self.net.backward(self.data.d_out, self.d_state)
        return out, state, dx

    def result(self, value):
        out, state = value[0], value[1]
        res = split_state(self.case, out, state)
        if self.case.mode == "train":
            res["dx"] = value[2]
            res.update({k: np.array(v) for k, v in self.net.grads.items()})
        return res


class PyrnnKernelRunner(Runner):
    """The kernel contract of pyrnn/_backend.py, called directly (before the modules exist)."""

    def __init__(self, case: Case, data: Data, backend: str):
        self.kernels = _backend.kernels(_backend.resolve(backend))
        names = param_names(case)
        self.weights = [tuple(data.weights[n] for n in names[i:i + 4])
                        for i in range(0, len(names), 4)]
        shape = (case.L * case.D, case.B, case.H)
        self.h0 = np.zeros(shape, np.float32)
        self.c0 = np.zeros(shape, np.float32) if case.cell == "lstm" else None
        self.cell = KERNEL_CELL[case.cell]
        self.names, self.case, self.data = names, case, data

    def scope(self):
        pyrnn.set_num_threads(self.case.threads)
        return contextlib.nullcontext()

    def call(self):
        train = self.case.mode == "train"
        out, h_n, c_n, tape = self.kernels.stack_forward(
            self.cell, self.data.x, self.h0, self.c0, self.weights, self.case.D == 2,
            self.data.lengths, None, train)
        if not train:
            return out, h_n, c_n
        d_c_n = np.zeros_like(self.c0) if self.c0 is not None else None
        grads = self.kernels.stack_backward(tape, self.data.d_out, np.zeros_like(self.h0), d_c_n)
        return out, h_n, c_n, grads

    def result(self, value):
        out, h_n, c_n = value[:3]
        res = {"out": out, "h_n": h_n} | ({"c_n": c_n} if c_n is not None else {})
        if self.case.mode == "train":
            dx, _, _, d_weights = value[3]
            res["dx"] = dx
            flat = [g for entry in d_weights for g in entry]
            res.update(dict(zip(self.names, flat, strict=True)))
        return res


def split_state(case: Case, out, state) -> dict[str, np.ndarray]:
    if case.cell == "lstm":
        return {"out": np.asarray(out), "h_n": np.asarray(state[0]), "c_n": np.asarray(state[1])}
    return {"out": np.asarray(out), "h_n": np.asarray(state)}


class Pyrnn(Backend):
    """pyrnn through its public modules (what users run); api="kernels" bypasses them."""

    def __init__(self, name: str, backend: str, api: str = "auto"):
        self.name, self.backend, self.api = name, backend, api

    def unavailable(self):
        if self.backend == "cpp" and not _backend.cpp_available():
            return "the C++ extension pyrnn._core is not available"
        return None

    def prepare(self, case, data):
        if self.api == "auto" and pyrnn_api() == "module":
            return PyrnnModuleRunner(case, data, self.backend)
        return PyrnnKernelRunner(case, data, self.backend)


# ---------------------------------------------------------------------------------- PyTorch

class TorchRunner(Runner):
    def __init__(self, case: Case, data: Data, mkldnn: bool):
        import torch

        cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[case.cell]
        kwargs = {"nonlinearity": "tanh"} if case.cell == "rnn" else {}
        self.torch, self.case, self.mkldnn = torch, case, mkldnn
        self.net = cls(case.I, case.H, num_layers=case.L, bidirectional=case.D == 2, **kwargs)
        with torch.no_grad():
            for name, p in self.net.named_parameters():
                p.copy_(torch.from_numpy(data.weights[name]))
        self.net.train(case.mode == "train")
        self.x = torch.from_numpy(data.x).requires_grad_(case.mode == "train")
        self.lengths = None if data.lengths is None else torch.from_numpy(data.lengths)
        self.d_out = torch.from_numpy(data.d_out)

    @contextlib.contextmanager
    def scope(self):
        self.torch.set_num_threads(self.case.threads)
        with warnings.catch_warnings():
            # Setting the oneDNN flags warns about Intel-GPU TF32, which means nothing here.
            warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
            with self.torch.backends.mkldnn.flags(enabled=self.mkldnn):
                yield

    def forward(self):
        if self.lengths is None:
            return self.net(self.x)
        rnn_utils = self.torch.nn.utils.rnn
        packed = rnn_utils.pack_padded_sequence(self.x, self.lengths, enforce_sorted=False)
        out, state = self.net(packed)
        out, _ = rnn_utils.pad_packed_sequence(out, total_length=self.case.T)
        return out, state

    def call(self):
        if self.case.mode == "infer":
            with self.torch.inference_mode():
                return self.forward()
        self.x.grad = None
        self.net.zero_grad(set_to_none=True)
        out, state = self.forward()
        out.backward(self.d_out)
        return out, state

    def result(self, value):
        out, state = value
        if self.case.cell == "lstm":
            state = tuple(s.detach().numpy() for s in state)
        else:
            state = state.detach().numpy()
        res = split_state(self.case, out.detach().numpy(), state)
        if self.case.mode == "train":
            res["dx"] = self.x.grad.numpy()
            res.update({n: p.grad.numpy() for n, p in self.net.named_parameters()})
        return res


class Torch(Backend):
    def __init__(self, name: str, mkldnn: bool):
        self.name, self.mkldnn = name, mkldnn

    def unavailable(self):
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            return f"torch is not installed ({exc})"
        return None

    def prepare(self, case, data):
        return TorchRunner(case, data, self.mkldnn)


# ----------------------------------------------------------------------------- ONNX Runtime

# ONNX stacks gates in its own order: LSTM i,o,f,c (torch i,f,g,o); GRU z,r,h (torch r,z,n).
ONNX_GATE_ORDER = {"lstm": [0, 3, 1, 2], "gru": [1, 0, 2], "rnn": [0]}
ONNX_OP = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


def onnx_reorder(case: Case, w: np.ndarray) -> np.ndarray:
    blocks = np.split(w, num_gates(case.cell), axis=0)
    return np.concatenate([blocks[i] for i in ONNX_GATE_ORDER[case.cell]], axis=0)


def onnx_layer_weights(case: Case, data: Data, layer: int):
    """W (D, G*H, I_k), R (D, G*H, H), B (D, 2*G*H) for one layer, in ONNX's gate order."""
    w, r, b = [], [], []
    for suffix in ["", "_reverse"][: case.D]:
        w_ih, w_hh, b_ih, b_hh = (onnx_reorder(case, data.weights[f"{p}_l{layer}{suffix}"])
                                  for p in PARAMS)
        w.append(w_ih)
        r.append(w_hh)
        b.append(np.concatenate([b_ih, b_hh]))
    return np.stack(w), np.stack(r), np.stack(b)


def onnx_model(case: Case, data: Data):
    """One ONNX graph: L single-layer RNN operators chained, outputs shaped like PyTorch's."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    init = lambda name, arr: inits.append(numpy_helper.from_array(arr, name))  # noqa: E731
    init("seq_shape", np.array([0, 0, -1], np.int64))
    if data.lengths is not None:
        init("lengths", data.lengths.astype(np.int32))
    direction = "bidirectional" if case.D == 2 else "forward"
    attrs = {"hidden_size": case.H, "direction": direction}
    if case.cell == "gru":
        attrs["linear_before_reset"] = 1
    x, h_outs, c_outs = "x", [], []
    for k in range(case.L):
        for name, arr in zip(("W", "R", "B"), onnx_layer_weights(case, data, k), strict=True):
            init(f"{name}{k}", arr)
        ins = [x, f"W{k}", f"R{k}", f"B{k}", "lengths" if data.lengths is not None else ""]
        outs = [f"Y{k}", f"Yh{k}"] + ([f"Yc{k}"] if case.cell == "lstm" else [])
        nodes.append(helper.make_node(ONNX_OP[case.cell], ins, outs, **attrs))
        # Y is (T, D, B, H); PyTorch's layout (T, B, D*H) is what the next layer reads.
        nodes.append(helper.make_node("Transpose", [f"Y{k}"], [f"Yt{k}"], perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", [f"Yt{k}", "seq_shape"], [f"X{k + 1}"]))
        x = f"X{k + 1}"
        h_outs.append(f"Yh{k}")
        c_outs += outs[2:]
    nodes.append(helper.make_node("Identity", [x], ["out"]))
    nodes.append(helper.make_node("Concat", h_outs, ["h_n"], axis=0))
    outputs = ["out", "h_n"]
    if case.cell == "lstm":
        nodes.append(helper.make_node("Concat", c_outs, ["c_n"], axis=0))
        outputs.append("c_n")
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, f"{case.cell}_stack",
        [helper.make_tensor_value_info("x", f32, [case.T, case.B, case.I])],
        [helper.make_tensor_value_info(o, f32, None) for o in outputs],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), outputs


class OrtRunner(Runner):
    def __init__(self, case: Case, data: Data):
        import onnxruntime as ort

        model, self.outputs = onnx_model(case, data)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = case.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self.feed = {"x": data.x}

    def call(self):
        return self.session.run(self.outputs, self.feed)

    def result(self, value):
        return dict(zip(self.outputs, value, strict=True))


class OnnxRuntime(Backend):
    name = "onnxruntime"

    def unavailable(self):
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return f"onnx/onnxruntime is not installed ({exc})"
        return None

    def unsupported(self, case):
        return "inference only" if case.mode != "infer" else None

    def prepare(self, case, data):
        return OrtRunner(case, data)


BACKENDS: dict[str, Backend] = {
    "pyrnn-cpp": Pyrnn("pyrnn-cpp", "cpp"),
    "pyrnn-numpy": Pyrnn("pyrnn-numpy", "numpy"),
    # The C++ kernels without the module layer: shows what the Python wrapper costs.
    "pyrnn-cpp-kernels": Pyrnn("pyrnn-cpp-kernels", "cpp", api="kernels"),
    "torch": Torch("torch", mkldnn=True),
    "torch-nomkldnn": Torch("torch-nomkldnn", mkldnn=False),
    "onnxruntime": OnnxRuntime(),
}
