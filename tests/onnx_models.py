"""ONNX Runtime as an oracle: one recurrent layer as one ONNX LSTM or GRU node, run by ORT.

``ort_layer(cell, x, h0, c0, entries, lengths)`` runs one layer (one or two directions) of a
kernel-contract stack through ONNX Runtime and returns (out (T, B, D*H), h_n (D, B, H), c_n or
None). Our weights are mapped onto ONNX's layout here, and only here:

- ONNX stacks the LSTM's gates as i, o, f, c (ours: i, f, g, o), its peepholes P as
  [p_i, p_o, p_f] (ours: w_ci, w_cf, w_co), the GRU's as z, r, h (ours: r, z, n); W, R and B
  hold every direction at once, B as [Wb, Rb].
- The coupled LSTM (ours: i = 1 - f) runs as ORT's input_forget=1, which computes f = 1 - i from
  the input gate: the negated f block (-W_f, -R_f, -b_f, and -w_cf as p_i) goes into ORT's i
  slot, since sigma(-a) = 1 - sigma(a) makes ORT's i our 1 - f and its f our f. ORT's f slot is
  left zero (it is not read).
- The reset-before GRU is ONNX's GRU with linear_before_reset=0, its default.

Tests import this module after ``pytest.importorskip("onnx")`` and ``("onnxruntime")``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from pyrnn._cells import CELLS

OPSET = 17
_ELEM = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}


def _blocks(a: np.ndarray, gates: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The gate blocks of a (G*H, ...) array (or a (G*H,) bias) by gate name."""
    H = a.shape[0] // len(gates)  # noqa: N806
    return {g: a[k * H:(k + 1) * H] for k, g in enumerate(gates)}


def _onnx_lstm_direction(cell: str, entry: tuple) -> tuple[np.ndarray, ...]:
    """W (4H, I), R (4H, H), B (8H,), P (3H,) of one direction in ONNX's order (i, o, f, c)."""
    spec = CELLS[cell]
    coupled = "i" not in spec.gates
    w_peep = entry[4] if len(entry) > 4 else None
    peep = {} if w_peep is None else dict(zip(spec.peepholes, w_peep, strict=True))
    zeros = np.zeros(entry[1].shape[1], entry[1].dtype)

    def onnx_order(a: np.ndarray) -> np.ndarray:
        block = _blocks(a, spec.gates)
        if coupled:  # ORT's i slot holds our negated f; its f slot is not read
            block = {"i": -block["f"], "f": np.zeros_like(block["f"]), "g": block["g"],
                     "o": block["o"]}
        return np.concatenate([block[g] for g in ("i", "o", "f", "g")])

    W, R, b_w, b_r = (onnx_order(a) for a in entry[:4])  # noqa: N806
    p_i, p_f = (-peep.get("f", zeros), zeros) if coupled else (peep.get("i", zeros),
                                                               peep.get("f", zeros))
    P = np.concatenate([p_i, peep.get("o", zeros), p_f])  # noqa: N806
    return W, R, np.concatenate([b_w, b_r]), P


def _onnx_gru_direction(entry: tuple) -> tuple[np.ndarray, ...]:
    """W (3H, I), R (3H, H), B (6H,) of one direction in ONNX's order (z, r, h)."""
    parts = []
    for a in entry[:4]:
        block = _blocks(a, ("r", "z", "n"))
        parts.append(np.concatenate([block["z"], block["r"], block["n"]]))
    W, R, b_w, b_r = parts  # noqa: N806
    return W, R, np.concatenate([b_w, b_r])


def _model(op: str, inputs: dict[str, np.ndarray | None], initializers: dict[str, np.ndarray],
           outputs: list[str], dtype: np.dtype, **attributes) -> onnx.ModelProto:
    """One node; `inputs` are the graph's inputs in the node's order (None: left out, as ONNX
    lets optional inputs be given as an empty name)."""
    elem = _ELEM[np.dtype(dtype)]
    order = list(inputs)
    names = [n if (n in initializers or inputs[n] is not None) else "" for n in order]
    while names and names[-1] == "":
        names.pop()
    node = helper.make_node(op, names, outputs, **attributes)
    graph_inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT32 if n == "sequence_lens" else elem,
                                      list(inputs[n].shape))
        for n in order if n not in initializers and inputs[n] is not None
    ]
    ranks = {"Y": ["T", "D", "B", "H"], "Y_h": ["D", "B", "H"], "Y_c": ["D", "B", "H"]}
    graph_outputs = [helper.make_tensor_value_info(n, elem, ranks[n]) for n in outputs]
    graph = helper.make_graph([node], f"pyrnn_oracle_{op}", graph_inputs, graph_outputs,
                              [numpy_helper.from_array(a, n) for n, a in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def ort_layer(cell: str, x: np.ndarray, h0: np.ndarray, c0: np.ndarray | None,
              entries: list[tuple], lengths: np.ndarray | None):
    """One layer of `cell` through ONNX Runtime: x (T, B, I), h0 and c0 (D, B, H), entries the
    D weights tuples of the kernel contract (unprojected). Returns (out (T, B, D*H), h_n, c_n)."""
    D = len(entries)  # noqa: N806
    H = h0.shape[2]  # noqa: N806
    direction = "bidirectional" if D == 2 else "forward"
    is_lstm = CELLS[cell].has_c
    if is_lstm:
        per_dir = [_onnx_lstm_direction(cell, e) for e in entries]
        names = ("W", "R", "B", "P")
    else:
        per_dir = [_onnx_gru_direction(e) for e in entries]
        names = ("W", "R", "B")
    initializers = {n: np.stack([d[k] for d in per_dir]) for k, n in enumerate(names)}
    feeds = {"X": x, "initial_h": h0}
    seq = None if lengths is None else np.asarray(lengths, np.int32)
    if is_lstm:
        op, outputs = "LSTM", ["Y", "Y_h", "Y_c"]
        inputs = {"X": x, "W": None, "R": None, "B": None, "sequence_lens": seq,
                  "initial_h": h0, "initial_c": c0, "P": None}
        feeds["initial_c"] = c0
        attributes = {"input_forget": 0 if "i" in CELLS[cell].gates else 1}
    else:
        op, outputs = "GRU", ["Y", "Y_h"]
        inputs = {"X": x, "W": None, "R": None, "B": None, "sequence_lens": seq,
                  "initial_h": h0}
        attributes = {"linear_before_reset": 1 if cell == "gru" else 0}
    if seq is not None:
        feeds["sequence_lens"] = seq
    model = _model(op, inputs, initializers, outputs, x.dtype, hidden_size=H,
                   direction=direction, **attributes)
    results = _run(model, feeds)
    y = results[0]  # (T, D, B, H)
    out = np.ascontiguousarray(y.transpose(0, 2, 1, 3)).reshape(y.shape[0], y.shape[2], D * H)
    return out, results[1], results[2] if is_lstm else None


def ort_stack(cell: str, x: np.ndarray, h0: np.ndarray, c0: np.ndarray | None,
              weights: list[tuple], bidirectional: bool, lengths: np.ndarray | None,
              residual: bool = False):
    """A stack of layers, one ONNX node per layer, each reading the previous one's output
    (residual: plus that output, above the first layer)."""
    D = 2 if bidirectional else 1  # noqa: N806
    outs_h, outs_c, layer_input = [], [], x
    for layer in range(len(weights) // D):
        s = slice(layer * D, (layer + 1) * D)
        out, h_n, c_n = ort_layer(cell, layer_input, h0[s], None if c0 is None else c0[s],
                                  list(weights[s]), lengths)
        layer_input = out + layer_input if residual and layer > 0 else out
        outs_h.append(h_n)
        outs_c.append(c_n)
    c_n = None if c0 is None else np.concatenate(outs_c)
    return layer_input, np.concatenate(outs_h), c_n
