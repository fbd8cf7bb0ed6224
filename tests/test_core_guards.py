"""The compiled extension called directly, past every Python check, with bad arguments.

pyrnn/_checks.py checks the arguments of every public entry point; the extension modules
(``pyrnn._core_*``, reached here through ``pyrnn._core._impl``) keep only guards against reading or
writing out of bounds. Each call below would make the core touch memory it should not: it must
raise a Python exception instead (the interpreter surviving the test run is the other half of
the proof).
"""

from __future__ import annotations

import numpy as np
import pytest

from pyrnn import _backend, reference

if not _backend.cpp_available():
    pytest.skip("the C++ extension is not built", allow_module_level=True)

from pyrnn import _core  # noqa: E402

raw = _core._impl  # the extension module itself, without pyrnn._core's Python checks

T, B, I, H = 5, 3, 4, 6  # noqa: E741


def lstm_args(dtype=np.float64, layers=2, bidirectional=True):
    """Valid stack_forward arguments in the core's form, as a dict to break one at a time."""
    rng = np.random.default_rng(0)
    D = 2 if bidirectional else 1  # noqa: N806
    weights = []
    for k in range(layers * D):
        fan_in = I if k < D else D * H
        weights.append(tuple(rng.standard_normal(s).astype(dtype)
                             for s in ((4 * H, fan_in), (4 * H, H), (4 * H,), (4 * H,))))
    return {
        "cell": "lstm", "x": rng.standard_normal((T, B, I)).astype(dtype),
        "h0": np.zeros((layers * D, B, H), dtype), "c0": np.zeros((layers * D, B, H), dtype),
        "weights": weights, "bidirectional": bidirectional,
        "lengths": np.array([5, 2, 4], np.int64),
        "dropout_masks": [np.ones((T, B, D * H), dtype)] * (layers - 1), "keep_tape": True,
    }


def forward(**changes):
    return raw.stack_forward(**(lstm_args() | changes))


def strided(a):
    big = np.zeros(a.shape + (2,), a.dtype)
    big[..., 0] = a
    return big[..., 0]


def unaligned(a):
    raw_bytes = np.zeros(a.nbytes + 1, np.uint8)[1:]
    out = raw_bytes.view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def replace_weight(k, j, make):
    weights = [list(entry) for entry in lstm_args()["weights"]]
    weights[k][j] = make(weights[k][j])
    return weights


def test_core_runs_the_arguments_these_tests_break():
    out, h_n, c_n, tape = forward()
    assert out.shape == (T, B, 2 * H) and tape is not None


# ------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [np.int64, np.float16, np.complex128])
def test_core_rejects_x_of_wrong_dtype_directly(dtype):
    with pytest.raises(TypeError, match="x: expected dtype float32 or float64"):
        forward(x=lstm_args()["x"].astype(dtype))


def test_core_rejects_h0_of_another_dtype_than_x_directly():
    with pytest.raises(TypeError, match="h0: expected dtype float64"):
        forward(h0=lstm_args()["h0"].astype(np.float32))


def test_core_rejects_byte_swapped_weights_directly():
    weights = replace_weight(1, 1, lambda w: w.astype(">f8"))
    with pytest.raises(TypeError, match=r"weights\[1\] w_hh: expected dtype float64 in native"):
        forward(weights=weights)


def test_core_rejects_lengths_that_are_not_int64_directly():
    with pytest.raises(TypeError, match="lengths: expected dtype int64"):
        forward(lengths=np.array([5, 2, 4], np.int32))


# ------------------------------------------------------------------------------- shapes


def test_core_rejects_h0_of_wrong_shape_directly():
    with pytest.raises(ValueError, match=r"h0: expected shape \(4, 3, 6\), got \(4, 2, 6\)"):
        forward(h0=np.zeros((4, 2, 6)))


@pytest.mark.parametrize("shape", [(4, 3), (3, 3, 6), (0, 3, 6), (4, 3, 0)])
def test_core_rejects_h0_that_names_no_stack_directly(shape):
    with pytest.raises(ValueError, match=r"h0: expected shape \(L\*D, B, H\)"):
        forward(h0=np.zeros(shape))


@pytest.mark.parametrize("shape", [(T, B), (0, B, I), (T, B, I, 1)])
def test_core_rejects_x_of_wrong_shape_directly(shape):
    with pytest.raises(ValueError, match="x: expected shape"):
        forward(x=np.zeros(shape))


def test_core_rejects_c0_of_wrong_shape_directly():
    with pytest.raises(ValueError, match=r"c0: expected shape \(4, 3, 6\)"):
        forward(c0=np.zeros((4, 3, 5)))


def test_core_rejects_an_upper_layer_weight_sized_for_the_input_directly():
    weights = replace_weight(2, 0, lambda w: np.zeros((4 * H, I)))
    with pytest.raises(ValueError, match=r"weights\[2\] w_ih: expected shape \(24, 12\)"):
        forward(weights=weights)


def test_core_rejects_a_bias_of_wrong_length_directly():
    with pytest.raises(ValueError, match=r"weights\[0\] b_hh: expected shape \(24,\)"):
        forward(weights=replace_weight(0, 3, lambda b: b[:-1].copy()))


def test_core_rejects_a_dropout_mask_of_wrong_shape_directly():
    with pytest.raises(ValueError, match=r"dropout_masks\[0\]: expected shape \(5, 3, 12\)"):
        forward(dropout_masks=[np.ones((T, B, H))])


# ------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("name", ["x", "h0", "c0"])
def test_core_rejects_non_contiguous_arrays_directly(name):
    with pytest.raises(ValueError, match=f"{name}: expected a C-contiguous, aligned array"):
        forward(**{name: strided(lstm_args()[name])})


def test_core_rejects_fortran_ordered_weights_directly():
    weights = replace_weight(0, 0, np.asfortranarray)
    with pytest.raises(ValueError, match=r"weights\[0\] w_ih: expected a C-contiguous"):
        forward(weights=weights)


def test_core_rejects_unaligned_arrays_directly():
    with pytest.raises(ValueError, match="x: expected a C-contiguous, aligned array"):
        forward(x=unaligned(lstm_args()["x"]))


# ------------------------------------------------------------------------------- lists, None


@pytest.mark.parametrize("count", [0, 3, 5])
def test_core_rejects_a_weight_list_of_wrong_length_directly(count):
    weights = (lstm_args()["weights"] * 2)[:count]
    with pytest.raises(ValueError, match=f"weights: expected 4 entries, got {count}"):
        forward(weights=weights)


def test_core_rejects_a_weight_entry_of_three_arrays_directly():
    weights = [entry[:3] for entry in lstm_args()["weights"]]
    with pytest.raises(ValueError, match=r"weights\[0\]: expected 4 entries, got 3"):
        forward(weights=weights)


def test_core_rejects_dropout_masks_of_wrong_count_directly():
    with pytest.raises(ValueError, match="dropout_masks: expected 1 entries, got 2"):
        forward(dropout_masks=lstm_args()["dropout_masks"] * 2)


@pytest.mark.parametrize("bad", [None, "weights", 3])
def test_core_rejects_weights_that_are_not_a_list_directly(bad):
    with pytest.raises(TypeError, match="weights: expected a list"):
        forward(weights=bad)


def test_core_rejects_none_for_h0_directly():
    with pytest.raises(ValueError, match="h0: required"):
        forward(h0=None)


def test_core_rejects_none_for_c0_of_an_lstm_directly():
    with pytest.raises(ValueError, match="c0: required for cell 'lstm'"):
        forward(c0=None)


def test_core_rejects_none_for_a_weight_directly():
    with pytest.raises(TypeError, match=r"weights\[1\] b_ih: expected a numpy array, got NoneType"):
        forward(weights=replace_weight(1, 2, lambda b: None))


@pytest.mark.parametrize("bad", [None, [[1.0]], 3.0])
def test_core_rejects_x_that_is_not_an_array_directly(bad):
    with pytest.raises(TypeError, match="x: expected a numpy array"):
        forward(x=bad)


def test_core_rejects_an_unknown_cell_directly():
    with pytest.raises(ValueError, match="cell must be one of"):
        forward(cell="lstmp")


# ------------------------------------------------------------------------------- lengths


@pytest.mark.parametrize("lengths", [[0, 2, 4], [5, 6, 4], [-1, 2, 4], [5, 2, 2**40]])
def test_core_rejects_lengths_out_of_range_directly(lengths):
    with pytest.raises(ValueError, match=r"lengths: every length must be in \[1, T\] = \[1, 5\]"):
        forward(lengths=np.array(lengths, np.int64))


def test_core_rejects_lengths_of_wrong_count_directly():
    with pytest.raises(ValueError, match=r"lengths: expected shape \(3,\), got \(2,\)"):
        forward(lengths=np.array([5, 2], np.int64))


# ------------------------------------------------------------------------------- packs


def test_core_rejects_packs_of_another_type_directly():
    with pytest.raises(TypeError, match="packs: expected None or a PackCache"):
        forward(keep_tape=False, packs=_core.PackCache())  # the Python wrapper, not the core's


def test_core_rejects_packs_with_a_tape_directly():
    with pytest.raises(ValueError, match="packs: only for inference"):
        forward(packs=raw.PackCache())


# ------------------------------------------------------------------------------- backward


@pytest.fixture
def tape_and_grads():
    args = lstm_args()
    tape = raw.stack_forward(**args)[3]
    rng = np.random.default_rng(1)
    return tape, {"d_out": rng.standard_normal((T, B, 2 * H)), "d_h_n": None, "d_c_n": None}


def test_core_rejects_a_tape_of_another_type_directly(tape_and_grads):
    _, grads = tape_and_grads
    args = lstm_args()
    args["keep_tape"] = True
    foreign = reference.stack_forward(**args)[3]
    for bad in (foreign, None, "tape"):
        with pytest.raises(TypeError, match="tape: expected the Tape returned by this module"):
            raw.stack_backward(bad, **grads)


def test_core_rejects_d_out_of_another_dtype_than_the_tape_directly(tape_and_grads):
    tape, grads = tape_and_grads
    with pytest.raises(TypeError, match="d_out: expected dtype float64"):
        raw.stack_backward(tape, **grads | {"d_out": grads["d_out"].astype(np.float32)})


def test_core_rejects_none_for_d_out_directly(tape_and_grads):
    tape, grads = tape_and_grads
    with pytest.raises(TypeError, match="d_out: expected a numpy array, got NoneType"):
        raw.stack_backward(tape, **grads | {"d_out": None})


def test_core_rejects_d_h_n_of_wrong_shape_directly(tape_and_grads):
    tape, grads = tape_and_grads
    with pytest.raises(ValueError, match=r"d_h_n: expected shape \(4, 3, 6\)"):
        raw.stack_backward(tape, **grads | {"d_h_n": np.zeros((2, 3, 6))})


def test_core_rejects_d_c_n_for_a_cell_without_one_directly():
    args = lstm_args() | {"cell": "gru", "c0": None}
    args["weights"] = [tuple(a[: 3 * H] for a in entry) for entry in args["weights"]]
    args["weights"] = [tuple(np.ascontiguousarray(a) for a in entry) for entry in args["weights"]]
    tape = raw.stack_forward(**args)[3]
    with pytest.raises(ValueError, match="d_c_n: only 'lstm' has a cell state"):
        raw.stack_backward(tape, np.zeros((T, B, 2 * H)), None, np.zeros((4, B, H)))


def targets_like(tape_args):
    return [tuple(np.zeros_like(a) for a in entry) for entry in tape_args["weights"]]


@pytest.mark.parametrize("case", ["read-only", "strided", "wrong shape", "too few", "not a list"])
def test_core_rejects_bad_accumulate_into_directly(tape_and_grads, case):
    tape, grads = tape_and_grads
    targets = [list(entry) for entry in targets_like(lstm_args())]
    error = ValueError
    match = r"accumulate_into\[0\] dw_hh: expected a C-contiguous, aligned, writable"
    if case == "read-only":
        targets[0][1].flags.writeable = False
    elif case == "strided":
        targets[0][1] = strided(targets[0][1])
    elif case == "wrong shape":
        targets[0][1] = np.zeros((4 * H, H + 1))
        match = r"accumulate_into\[0\] dw_hh: expected shape \(24, 6\)"
    elif case == "too few":
        targets, match = targets[:3], "accumulate_into: expected 4 entries, got 3"
    else:
        targets, error, match = "targets", TypeError, "accumulate_into: expected a list"
    with pytest.raises(error, match=match):
        raw.stack_backward(tape, **grads, accumulate_into=targets)


# ------------------------------------------------------------------------------- Linear, Adam


def test_core_rejects_a_linear_weight_of_wrong_shape_directly():
    x, weight = np.ones((8, 3), np.float32), np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match=r"weight: expected shape \(2, 3\), got \(2, 4\)"):
        raw.linear_forward(x, weight, None)


def test_core_rejects_a_linear_bias_of_wrong_shape_directly():
    x, weight = np.ones((8, 3), np.float32), np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"bias: expected shape \(2,\), got \(3,\)"):
        raw.linear_forward(x, weight, np.ones(3, np.float32))


def test_core_rejects_a_read_only_linear_target_directly():
    x, weight, d_y = np.ones((8, 3)), np.ones((2, 3)), np.ones((8, 2))
    d_weight = np.broadcast_to(np.zeros(3), (2, 3))
    with pytest.raises(ValueError, match=r"accumulate_into\[0\] d_weight: expected a C-contiguous"):
        raw.linear_backward(x, weight, d_y, False, (d_weight, None))


def test_core_rejects_a_linear_d_y_of_wrong_shape_directly():
    x, weight = np.ones((8, 3)), np.ones((2, 3))
    with pytest.raises(ValueError, match=r"d_y: expected shape \(8, 2\)"):
        raw.linear_backward(x, weight, np.ones((7, 2)), True, None)


ADAM_SCALARS = (-0.1, 0.1, 0.999, 0.5, 1e-8, 0.0)


@pytest.mark.parametrize("case", ["grad shape", "exp_avg read-only", "param strided", "None"])
def test_core_rejects_bad_adam_arrays_directly(case):
    param, grad, exp_avg, exp_avg_sq = (np.zeros(6, np.float32) for _ in range(4))
    error, match = ValueError, r"grad: expected shape \(6,\), got \(5,\)"
    if case == "grad shape":
        grad = grad[:5]
    elif case == "exp_avg read-only":
        exp_avg.flags.writeable = False
        match = "exp_avg: expected a C-contiguous, aligned, writable array"
    elif case == "param strided":
        param, match = np.zeros(12, np.float32)[::2], "param: expected a C-contiguous"
    else:
        exp_avg_sq, error, match = None, TypeError, "exp_avg_sq: expected a numpy array"
    with pytest.raises(error, match=match):
        raw.adam_update(param, grad, exp_avg, exp_avg_sq, None, *ADAM_SCALARS)
