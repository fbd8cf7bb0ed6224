"""Every argument check of the modules and the functional layer, for both backends.

Each bad input must raise the right exception type with a message naming the argument; odd
but valid layouts (non-contiguous, byte-swapped) must give exactly the results of plain arrays.
"""

from __future__ import annotations

import numpy as np
import pytest

import pyrnn
from pyrnn import functional

T, B, I, H = 5, 3, 4, 2  # noqa: E741


def lstm(backend: str, **kwargs) -> pyrnn.LSTM:
    kwargs = {"dtype": np.float64, "seed": 0, "backend": backend, **kwargs}
    return pyrnn.LSTM(I, H, **kwargs)


def gru(backend: str, **kwargs) -> pyrnn.GRU:
    kwargs = {"dtype": np.float64, "seed": 0, "backend": backend, **kwargs}
    return pyrnn.GRU(I, H, **kwargs)


def strided(a: np.ndarray) -> np.ndarray:
    """Same values, every other element of a bigger buffer (not contiguous)."""
    big = np.zeros((*a.shape[:-1], 2 * a.shape[-1]), a.dtype)
    big[..., ::2] = a
    return big[..., ::2]


def inputs(seed: int = 0, layers: int = 1, directions: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B, I))
    h0 = rng.standard_normal((layers * directions, B, H))
    c0 = rng.standard_normal((layers * directions, B, H))
    return x, h0, c0


# ------------------------------------------------------------------------------- x


@pytest.mark.parametrize("shape", [(T, I), (T, B, I, 1), (I,)])
def test_rejects_x_with_wrong_number_of_dimensions(backend, shape):
    with pytest.raises(ValueError, match=r"x: expected a 3-D array"):
        gru(backend)(np.zeros(shape))


def test_rejects_x_with_an_empty_dimension(backend):
    with pytest.raises(ValueError, match=r"x: .*every dimension >= 1"):
        gru(backend)(np.zeros((0, B, I)))


@pytest.mark.parametrize("dtype", [np.int64, np.float16, np.complex128, np.bool_])
def test_rejects_x_of_non_float32_64_dtype(backend, dtype):
    pattern = rf"x: expected dtype float32 or float64, got {np.dtype(dtype)}"
    with pytest.raises(TypeError, match=pattern):
        gru(backend)(np.zeros((T, B, I), dtype))


def test_rejects_x_that_is_not_an_array(backend):
    with pytest.raises(TypeError, match=r"x: expected a numpy array, got list"):
        gru(backend)(np.zeros((T, B, I)).tolist())


def test_rejects_x_whose_dtype_differs_from_the_module(backend):
    with pytest.raises(TypeError, match=r"x: expected dtype float64 .*got float32"):
        gru(backend)(np.zeros((T, B, I), np.float32))


def test_rejects_x_with_the_wrong_input_size(backend):
    with pytest.raises(ValueError, match=rf"x: expected input size {I} .*got shape \(5, 3, 7\)"):
        gru(backend)(np.zeros((T, B, 7)))


# ------------------------------------------------------------------------------- states


def test_rejects_h0_of_wrong_shape(backend):
    x, h0, _ = inputs()
    with pytest.raises(ValueError, match=r"h0: expected shape \(L\*D, B, H\) = \(1, 3, 2\)"):
        gru(backend)(x, h0[:, :2])


def test_rejects_h0_of_wrong_dtype(backend):
    x, h0, _ = inputs()
    with pytest.raises(TypeError, match=r"h0: expected dtype float64 .*got float32"):
        gru(backend)(x, h0.astype(np.float32))


def test_rejects_h0_missing_the_reverse_direction(backend):
    x, h0, _ = inputs()
    with pytest.raises(ValueError, match=r"h0: expected shape .* = \(2, 3, 2\), got \(1, 3, 2\)"):
        gru(backend, bidirectional=True)(x, h0)


def test_rejects_c0_of_wrong_shape(backend):
    x, h0, c0 = inputs()
    with pytest.raises(ValueError, match=r"c0: expected shape"):
        lstm(backend)(x, (h0, c0[..., :1]))


def test_rejects_c0_of_wrong_dtype(backend):
    x, h0, c0 = inputs()
    with pytest.raises(TypeError, match=r"c0: expected dtype float64"):
        lstm(backend)(x, (h0, c0.astype(np.float32)))


def test_rejects_lstm_hx_that_is_not_a_pair(backend):
    x, h0, _ = inputs()
    with pytest.raises(TypeError, match=r"hx: expected a pair \(h0, c0\)"):
        lstm(backend)(x, h0)


def test_rejects_a_state_pair_for_gru(backend):
    x, h0, c0 = inputs()
    with pytest.raises(TypeError, match=r"hx: expected one array"):
        gru(backend)(x, (h0, c0))


def test_rejects_c0_for_a_cell_without_cell_state(backend):
    x, h0, c0 = inputs()
    weights = [(np.zeros((3 * H, I)), np.zeros((3 * H, H)), None, None)]
    with pytest.raises(ValueError, match=r"c0: only 'lstm' has a cell state"):
        functional.rnn_forward("gru", x, weights, h0, c0, backend=backend)


# ------------------------------------------------------------------------------- lengths


@pytest.mark.parametrize("lengths", [[5, 4], [5, 4, 3, 2]])
def test_rejects_lengths_with_the_wrong_count(backend, lengths):
    with pytest.raises(ValueError, match=r"lengths: expected a 1-D array of B = 3"):
        gru(backend)(inputs()[0], lengths=np.array(lengths))


def test_rejects_empty_lengths_by_their_count(backend):
    with pytest.raises(ValueError, match=r"lengths: expected B = 3 lengths .*got none"):
        gru(backend)(inputs()[0], lengths=[])


@pytest.mark.parametrize("lengths", [[5.0, 4.0, 3.0], [True, True, True]])
def test_rejects_lengths_that_are_not_integers(backend, lengths):
    with pytest.raises(TypeError, match=r"lengths: expected integers"):
        gru(backend)(inputs()[0], lengths=np.array(lengths))


def test_rejects_a_zero_length(backend):
    with pytest.raises(ValueError, match=r"lengths: .*\[1, T\] = \[1, 5\], got 0 at index 1"):
        gru(backend)(inputs()[0], lengths=np.array([5, 0, 3]))


def test_rejects_lengths_longer_than_T(backend):
    with pytest.raises(ValueError, match=r"lengths: .*\[1, 5\], got 6 at index 2"):
        gru(backend)(inputs()[0], lengths=[5, 1, 6])


def test_rejects_two_dimensional_lengths(backend):
    with pytest.raises(ValueError, match=r"lengths: expected a 1-D array .*got shape \(3, 1\)"):
        gru(backend)(inputs()[0], lengths=np.array([[5], [4], [3]]))


def test_accepts_lengths_as_a_list_of_any_integer_type(backend):
    x = inputs()[0]
    want, _ = gru(backend)(x, lengths=np.array([5, 2, 3]))
    for lengths in ([5, 2, 3], np.array([5, 2, 3], np.int32), np.array([5, 2, 3], ">u2")):
        got, _ = gru(backend)(x, lengths=lengths)
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------- backward


def test_rejects_d_out_of_wrong_shape(backend):
    m = gru(backend)
    out, _ = m(inputs()[0])
    with pytest.raises(ValueError, match=r"d_out: expected shape \(T, B, D\*H\) = \(5, 3, 2\)"):
        m.backward(out[:, :, :1])


def test_rejects_batch_first_d_out_in_time_major_layout(backend):
    m = gru(backend, batch_first=True)
    out, _ = m(np.zeros((B, T, I)))
    with pytest.raises(ValueError, match=r"d_out: expected shape \(B, T, D\*H\) = \(3, 5, 2\)"):
        m.backward(np.zeros((T, B, H)))


def test_rejects_d_out_of_wrong_dtype(backend):
    m = gru(backend)
    out, _ = m(inputs()[0])
    with pytest.raises(TypeError, match=r"d_out: expected dtype float64 .*got float32"):
        m.backward(out.astype(np.float32))


def test_rejects_d_h_n_of_wrong_shape(backend):
    m = gru(backend)
    out, h_n = m(inputs()[0])
    with pytest.raises(ValueError, match=r"d_h_n: expected shape"):
        m.backward(out, h_n[0])


def test_rejects_lstm_d_hx_that_is_not_a_pair(backend):
    m = lstm(backend)
    out, (h_n, _) = m(inputs()[0])
    with pytest.raises(TypeError, match=r"d_hx: expected a pair \(d_h_n, d_c_n\)"):
        m.backward(out, h_n)


def test_rejects_backward_before_forward(backend):
    with pytest.raises(RuntimeError, match=r"GRU.backward: no forward pass has run yet"):
        gru(backend).backward(np.zeros((T, B, H)))


def test_rejects_backward_after_an_eval_mode_forward(backend):
    m = gru(backend)
    m.eval()
    out, _ = m(inputs()[0])
    with pytest.raises(RuntimeError, match=r"kept no tape .*eval mode"):
        m.backward(out)


def test_rejects_backward_after_a_no_grad_forward(backend):
    m = lstm(backend)
    with pyrnn.no_grad():
        out, _ = m(inputs()[0])
    with pytest.raises(RuntimeError, match=r"kept no tape .*no_grad"):
        m.backward(out)


def test_rejects_a_second_backward_for_one_forward(backend):
    m = lstm(backend)
    out, _ = m(inputs()[0])
    m.backward(out)
    with pytest.raises(RuntimeError, match=r"backward was already called"):
        m.backward(out)


def test_a_rejected_backward_keeps_the_tape_for_a_corrected_call(backend):
    m = gru(backend)
    out, _ = m(inputs()[0])
    with pytest.raises(ValueError, match="d_out"):
        m.backward(out[:2])
    dx, _ = m.backward(out)
    assert dx.shape == (T, B, I)


def test_functional_backward_rejects_a_missing_or_foreign_tape():
    with pytest.raises(ValueError, match=r"tape: got None"):
        functional.rnn_backward(None, np.zeros((T, B, H)))
    with pytest.raises(TypeError, match=r"tape: expected the Tape returned by rnn_forward"):
        functional.rnn_backward(object(), np.zeros((T, B, H)))


# ------------------------------------------------------------------------------- functional


def test_functional_rejects_an_unknown_cell(backend):
    with pytest.raises(ValueError, match=r"cell: expected one of"):
        functional.rnn_forward("lstmp", inputs()[0], [], backend=backend)


@pytest.mark.parametrize("count", [0, 3])
def test_functional_rejects_a_weight_count_that_is_not_a_multiple_of_D(backend, count):
    entry = (np.zeros((H, I)), np.zeros((H, H)), None, None)
    with pytest.raises(ValueError, match=r"weights: expected L\*D entries .*D = 2"):
        functional.rnn_forward("rnn_tanh", inputs()[0], [entry] * count, bidirectional=True,
                               backend=backend)


def test_functional_rejects_a_weight_of_wrong_shape(backend):
    entries = [(np.zeros((H, I)), np.zeros((H, H)), None, None),
               (np.zeros((H, I)), np.zeros((H, H)), np.zeros(H), None)]  # layer 1 reads H
    with pytest.raises(ValueError, match=r"weights\[1\] w_ih: expected shape .* = \(2, 2\)"):
        functional.rnn_forward("rnn_tanh", inputs()[0], entries, backend=backend)


def test_functional_rejects_a_weight_of_wrong_dtype(backend):
    entry = (np.zeros((H, I)), np.zeros((H, H)), np.zeros(H, np.float32), None)
    with pytest.raises(TypeError, match=r"weights\[0\] b_ih: expected dtype float64"):
        functional.rnn_forward("rnn_tanh", inputs()[0], [entry], backend=backend)


def test_functional_accepts_weights_in_any_layout_with_identical_results(backend):
    # Contiguous native weights skip the conversions; every other layout must still be converted
    # (and a subclass taken as its values), not passed to the kernels as it is.
    x = inputs()[0]
    rng = np.random.default_rng(4)
    shapes = ((4 * H, I), (4 * H, H), (4 * H,), (4 * H,))
    weights = [tuple(rng.standard_normal(shape) for shape in shapes)]
    want = functional.rnn_forward("lstm", x, weights, backend=backend)[0]
    variants = {
        "strided": strided,
        "fortran": lambda a: np.asfortranarray(a) if a.ndim == 2 else strided(a),
        "byte-swapped": lambda a: a.astype(a.dtype.newbyteorder(">")),
        "subclass": lambda a: a.view(np.ma.MaskedArray),
    }
    for label, make in variants.items():
        entry = tuple(make(a) for a in weights[0])
        got = functional.rnn_forward("lstm", x, [entry], backend=backend)[0]
        np.testing.assert_array_equal(got, want, err_msg=label)


def test_functional_rejects_a_rng_that_is_not_a_generator(backend):
    entry = (np.zeros((H, I)), np.zeros((H, H)), None, None)
    with pytest.raises(TypeError, match=r"rng: expected a numpy.random.Generator"):
        functional.rnn_forward("rnn_tanh", inputs()[0], [entry], rng=42, backend=backend)


@pytest.mark.parametrize("name", ["batch_first", "bidirectional", "training", "keep_tape"])
def test_functional_rejects_flags_that_are_not_bools(backend, name):
    entry = (np.zeros((H, I)), np.zeros((H, H)), None, None)
    with pytest.raises(TypeError, match=rf"{name}: expected a bool"):
        functional.rnn_forward("rnn_tanh", inputs()[0], [entry], backend=backend, **{name: 1})


# ------------------------------------------------------------------------------- state dicts


def test_load_state_dict_rejects_a_missing_key(backend):
    m = lstm(backend)
    sd = m.state_dict()
    del sd["bias_hh_l0"]
    with pytest.raises(KeyError, match=r"missing \['bias_hh_l0'\]"):
        m.load_state_dict(sd)


def test_load_state_dict_rejects_an_unexpected_key(backend):
    m = lstm(backend, bias=False)
    sd = lstm(backend).state_dict()  # has biases
    with pytest.raises(KeyError, match=r"unexpected \['bias_hh_l0', 'bias_ih_l0'\]"):
        m.load_state_dict(sd)


def test_load_state_dict_rejects_a_wrong_shape_and_changes_nothing(backend):
    m = lstm(backend)
    before = m.state_dict()
    sd = lstm(backend, seed=1).state_dict()
    sd["weight_hh_l0"] = sd["weight_hh_l0"][:, :1]
    with pytest.raises(ValueError, match=r"state_dict\['weight_hh_l0'\] has shape \(8, 1\)"):
        m.load_state_dict(sd)
    for name, value in m.state_dict().items():
        np.testing.assert_array_equal(value, before[name])


def test_load_state_dict_rejects_timedelta_values(backend):
    m = lstm(backend)
    sd = m.state_dict()
    sd["bias_hh_l0"] = sd["bias_hh_l0"].astype(np.int64).astype("timedelta64[s]")
    with pytest.raises(TypeError, match=r"state_dict\['bias_hh_l0'\] has dtype timedelta64"):
        m.load_state_dict(sd)


def test_load_state_dict_names_a_value_that_is_not_an_array(backend):
    m = lstm(backend)
    sd = m.state_dict()
    sd["bias_ih_l0"] = [[0.0], [1.0, 2.0]]
    with pytest.raises(ValueError, match=r"state_dict\['bias_ih_l0'\] is not an array"):
        m.load_state_dict(sd)


def test_rejects_params_replaced_by_arrays_of_another_hidden_size(backend):
    m = gru(backend)
    other = pyrnn.GRU(I, H + 2, dtype=np.float64, backend=backend)
    m.params.update(other.params)   # consistent among themselves, another hidden size
    expected = rf"params\['weight_hh_l0'\]: expected shape \({3 * H}, {H}\)"
    with pytest.raises(ValueError, match=expected):
        m(inputs()[0])
    with pytest.raises(ValueError, match=expected):
        m.frozen()


# ------------------------------------------------------------------------------- constructor


def test_parameter_count_computed_before_allocating_is_the_allocated_one():
    for net in (pyrnn.LSTM(3, 5, num_layers=3, bidirectional=True), pyrnn.GRU(4, 2, bias=False),
                pyrnn.RNN(2, 7, num_layers=2)):
        assert net._parameter_count() == net.num_parameters()


@pytest.mark.parametrize("make", [lambda: pyrnn.LSTM(1, 2**31), lambda: pyrnn.RNN(2**62, 2**62),
                                  lambda: pyrnn.GRU(1, 1, num_layers=2**40)])
def test_rejects_sizes_whose_parameters_exceed_the_memory_before_allocating(make):
    with pytest.raises(ValueError, match=r"\) with its gradients would hold [\d,]+ numbers, "
                                         r".* GiB: more than this machine's"):
        make()


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"input_size": 0}, ValueError, r"input_size: expected a positive int, got 0"),
        ({"input_size": 2.5}, TypeError, r"input_size: expected a positive int, got 2.5"),
        ({"hidden_size": -3}, ValueError, r"hidden_size: expected a positive int, got -3"),
        ({"hidden_size": True}, TypeError, r"hidden_size: expected a positive int, got True"),
        ({"num_layers": 0}, ValueError, r"num_layers: expected a positive int"),
        ({"dropout": 1.0}, ValueError, r"dropout: expected a float in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, ValueError, r"dropout: expected a float in \[0, 1\)"),
        ({"dropout": "0.5"}, TypeError, r"dropout: expected a float in \[0, 1\), got '0.5'"),
        ({"dtype": np.float16}, TypeError, r"dtype: expected float32 or float64"),
        ({"dtype": np.int32}, TypeError, r"dtype: expected float32 or float64"),
        ({"dtype": None}, TypeError, r"dtype: expected float32 or float64, got None"),
        ({"backend": "gpu"}, ValueError, r"backend: expected one of \('auto', .*got 'gpu'"),
        ({"bias": "yes"}, TypeError, r"bias: expected a bool, got 'yes'"),
        ({"batch_first": 1}, TypeError, r"batch_first: expected a bool, got 1"),
        ({"bidirectional": None}, TypeError, r"bidirectional: expected a bool"),
        ({"seed": -1}, ValueError, r"seed: expected None or a non-negative int, got -1"),
        ({"seed": 1.5}, TypeError, r"seed: expected None or a non-negative int, got 1.5"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, pattern):
    args = {"input_size": I, "hidden_size": H, **kwargs}
    for cls in (pyrnn.RNN, pyrnn.LSTM, pyrnn.GRU):
        with pytest.raises(error, match=pattern):
            cls(**args)


def test_rnn_rejects_an_unknown_nonlinearity():
    with pytest.raises(ValueError, match=r"nonlinearity: expected one of \('tanh', 'relu'\)"):
        pyrnn.RNN(I, H, nonlinearity="sigmoid")


def test_dropout_with_one_layer_warns_that_it_does_nothing():
    with pytest.warns(UserWarning, match=r"dropout .*num_layers=1"):
        pyrnn.GRU(I, H, dropout=0.2)


def test_constructor_accepts_dtype_spellings():
    for spelling in (np.float64, "float64", np.dtype(">f8"), "d"):
        assert pyrnn.GRU(I, H, dtype=spelling).dtype == np.float64


# ------------------------------------------------------------------------------- layouts, NaN


def run_lstm_step(backend, x, h0, c0, d_out, d_h_n, lengths):
    m = lstm(backend, num_layers=2, bidirectional=True)
    out, (h_n, c_n) = m(x, (h0, c0), lengths=lengths)
    dx, (dh0, dc0) = m.backward(d_out, (d_h_n, None))
    return [out, h_n, c_n, dx, dh0, dc0, *m.grads.values()]


def test_non_contiguous_and_byte_swapped_inputs_give_identical_results(backend):
    x, h0, c0 = inputs(layers=2, directions=2)
    rng = np.random.default_rng(9)
    d_out, d_h_n = rng.standard_normal((T, B, 2 * H)), rng.standard_normal((4, B, H))
    lengths = np.array([5, 2, 4])
    want = run_lstm_step(backend, x, h0, c0, d_out, d_h_n, lengths)
    variants = {
        "strided": strided,
        "fortran": np.asfortranarray,
        "byte-swapped": lambda a: a.astype(a.dtype.newbyteorder(">")),
        "negative strides": lambda a: np.flip(np.flip(a, 0).copy(), 0),
    }
    strided_lengths = np.array([5, 0, 2, 0, 4, 0])[::2]
    for label, make in variants.items():
        args = [make(a) for a in (x, h0, c0, d_out, d_h_n)]
        assert not any(a.flags.c_contiguous and a.dtype.isnative for a in args), label
        got = run_lstm_step(backend, *args, strided_lengths)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w, err_msg=label)


def test_nan_in_the_input_propagates_without_crashing(backend):
    x, h0, _ = inputs()
    x[2, 1, 0] = np.nan
    m = gru(backend)
    out, h_n = m(x, h0)
    assert np.isnan(out[2:, 1]).all()  # sequence 1 from step 2 on
    assert np.isfinite(out[:2]).all() and np.isfinite(out[:, [0, 2]]).all()  # nothing else
    assert np.isnan(h_n[:, 1]).all() and np.isfinite(h_n[:, [0, 2]]).all()
    dx, dh0 = m.backward(np.ones_like(out))
    assert np.isnan(dx[:3, 1]).any() and np.isnan(m.grads["weight_hh_l0"]).any()
    assert np.isfinite(dx[:, [0, 2]]).all()


# ------------------------------------------------------------------- modes, threads, functional


def test_no_grad_is_per_thread_and_overlapping_blocks_restore_it():
    import threading

    inside, release = threading.Event(), threading.Event()
    seen_in_worker = []

    def worker():
        with pyrnn.no_grad():
            seen_in_worker.append(pyrnn.is_grad_enabled())
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    inside.wait(10)
    try:
        assert pyrnn.is_grad_enabled()  # the worker's block does not reach this thread
        net = pyrnn.GRU(2, 3, seed=0)
        out, _ = net(np.ones((2, 1, 2), np.float32))
        net.backward(np.ones_like(out))  # this thread's forward kept its tape
        with pyrnn.no_grad():            # overlaps the worker's block, ends first
            assert not pyrnn.is_grad_enabled()
    finally:
        release.set()
        thread.join(10)
    assert seen_in_worker == [False] and pyrnn.is_grad_enabled()


@pytest.mark.parametrize("bad", ["no", 1, None])
def test_train_rejects_a_mode_that_is_not_a_bool(bad):
    with pytest.raises(TypeError, match="mode: expected a bool"):
        pyrnn.GRU(2, 3).train(bad)


def test_a_child_set_to_none_or_deleted_leaves_the_parameters():
    class Model(pyrnn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = pyrnn.GRU(2, 3, seed=0)
            self.head = pyrnn.Linear(3, 1, seed=0)

    model = Model()
    model.head = None
    assert not any(k.startswith("head.") for k in model.state_dict())
    del model.rnn
    assert model.state_dict() == {} and model.num_parameters() == 0
    model.rnn = pyrnn.GRU(2, 3, seed=0)                   # registered again by assignment
    assert "rnn.weight_hh_l0" in model.state_dict()


def test_set_num_threads_takes_numpy_ints_and_refuses_counts_past_the_core_limit():
    from pyrnn import _backend

    before = pyrnn.get_num_threads()
    try:
        pyrnn.set_num_threads(np.int64(1))
        if _backend.cpp_available():
            assert pyrnn.get_num_threads() == 1
            limit = _backend._core.max_threads
            for bad in (limit + 1, 2**31, 2**70):
                with pytest.raises(ValueError, match=f"n must be at most {limit}"):
                    pyrnn.set_num_threads(bad)
            assert pyrnn.get_num_threads() == 1
    finally:
        pyrnn.set_num_threads(before)


@pytest.mark.parametrize("change,error,match", [
    ({"rng": "seed"}, TypeError, "rng: expected a numpy.random.Generator"),
    ({"num_layers": 2.5}, TypeError, "num_layers: expected a positive int"),
    ({"num_layers": 0}, ValueError, "num_layers: expected a positive int"),
    ({"shape": (4, 2)}, TypeError, "shape: expected 3 positive ints"),
    ({"shape": (4, 0, 3)}, ValueError, r"shape\[1\]: expected a positive int"),
    ({"p": -1.0}, ValueError, r"p: expected a float in \[0, 1\)"),
    ({"p": 1.0}, ValueError, r"p: expected a float in \[0, 1\)"),
    ({"p": float("nan")}, ValueError, r"p: expected a float in \[0, 1\)"),
    ({"dtype": int}, TypeError, "dtype: expected float32 or float64"),
])
def test_dropout_masks_checks_its_arguments(change, error, match):
    args = {"rng": np.random.default_rng(0), "num_layers": 2, "shape": (4, 2, 3), "p": 0.5,
            "dtype": np.float32} | change
    with pytest.raises(error, match=match):
        functional.dropout_masks(**args)


def test_dropout_masks_keep_units_with_probability_one_minus_p():
    [mask] = functional.dropout_masks(None, 2, [200, 10, 10], 0.25, np.float64)
    assert mask.dtype == np.float64 and set(np.unique(mask)) <= {0.0, 1 / 0.75}
    assert abs((mask > 0).mean() - 0.75) < 0.02


def test_rejects_a_weights_entry_of_three_arrays_without_printing_them(backend):
    net = pyrnn.GRU(2, 3, seed=0)
    w_ih, w_hh, b_ih, _ = net._weights()[0]
    with pytest.raises(ValueError, match=r"weights\[0\]: expected 4 entries .*got 3 items$"):
        functional.rnn_forward("gru", np.ones((2, 1, 2), np.float32), [(w_ih, w_hh, b_ih)],
                               backend=backend)
