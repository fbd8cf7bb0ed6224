"""Several Python threads on one module: each thread's backward pairs with its own forward pass,
concurrent backward passes add their gradients into ``grads`` exactly, optimizer steps never see
half-added gradients, and concurrent calls into the core return the bits a serial run returns.
See docs/threads.md for the contract these tests hold."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import pyrnn
from pyrnn import _backend, optim
from pyrnn.layers import Embedding, Linear
from pyrnn.module import Module

needs_cpp = pytest.mark.skipif(not _backend.cpp_available(), reason="C++ core not built")
WORKERS = 4
ROUNDS = 6  # calls per worker


@pytest.fixture
def threads():
    before = pyrnn.get_num_threads()
    yield pyrnn.set_num_threads
    pyrnn.set_num_threads(before)


class Tagger(Module):
    """Embedding -> 2-layer LSTM -> Linear: every kind of layer that keeps a tape."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.embed = Embedding(11, 6, dtype=np.float64, seed=1)
        self.rnn = pyrnn.LSTM(6, 9, num_layers=2, dtype=np.float64, seed=2, backend=backend)
        self.head = Linear(9, 5, dtype=np.float64, seed=3, backend=backend)

    def step(self, tokens: np.ndarray, d_logits: np.ndarray) -> np.ndarray:
        """Forward and backward of one batch; returns the LSTM input's gradient."""
        out, _ = self.rnn(self.embed(tokens))
        self.head(out)
        d_x, _ = self.rnn.backward(self.head.backward(d_logits))
        self.embed.backward(d_x)
        return d_x


def batches(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [(rng.integers(0, 11, (4 + i % 3, 3)), rng.standard_normal((4 + i % 3, 3, 5)))
            for i in range(count)]


def run_in_threads(work, workers: int = WORKERS) -> None:
    """work(w) in `workers` threads at once; re-raises the first error a thread raised."""
    errors: list[BaseException] = []

    def guarded(w: int) -> None:
        try:
            work(w)
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            errors.append(error)

    pool = [threading.Thread(target=guarded, args=(w,)) for w in range(workers)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in pool), "a worker thread hung"
    if errors:
        raise errors[0]


def grads_of(model: Module) -> dict[str, np.ndarray]:
    return {name: grad.copy() for name, _, grad in model.named_parameters()}


@pytest.mark.parametrize("lockstep", [True, False], ids=["lockstep", "free"])
def test_threads_training_one_model_match_a_serial_run(backend, threads, lockstep):
    # lockstep: every thread runs its forward pass before any runs backward, so that a tape
    # shared between threads would make all but one backward use another thread's input.
    threads(2)
    data = batches(WORKERS * ROUNDS)
    serial = Tagger(backend)
    want_dx = [serial.step(tokens, d_logits) for tokens, d_logits in data]
    want_grads = grads_of(serial)

    model = Tagger(backend)
    got_dx: list = [None] * len(data)
    meet = threading.Barrier(WORKERS)

    def work(w: int) -> None:
        for r in range(ROUNDS):
            i = r * WORKERS + w
            tokens, d_logits = data[i]
            out, _ = model.rnn(model.embed(tokens))
            model.head(out)
            if lockstep:
                meet.wait(timeout=30)
            d_x, _ = model.rnn.backward(model.head.backward(d_logits))
            model.embed.backward(d_x)
            got_dx[i] = d_x

    run_in_threads(work)
    for i, (got, want) in enumerate(zip(got_dx, want_dx, strict=True)):
        np.testing.assert_array_equal(got, want, err_msg=f"dx of call {i}")
    got_grads = grads_of(model)
    for name, want in want_grads.items():  # the same sums, added in another order
        np.testing.assert_allclose(got_grads[name], want, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_threads_training_each_cell_add_every_gradient(backend, threads, kind):
    threads(2)
    make = {"rnn": pyrnn.RNN, "gru": pyrnn.GRU, "lstm": pyrnn.LSTM}[kind]
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((5, 2, 3)) for _ in range(WORKERS * ROUNDS)]
    serial = make(3, 8, bidirectional=True, dtype=np.float64, seed=4, backend=backend)
    want = [serial.backward(serial(x)[0] * 0.5)[0] for x in xs]
    model = make(3, 8, bidirectional=True, dtype=np.float64, seed=4, backend=backend)
    got: list = [None] * len(xs)
    meet = threading.Barrier(WORKERS)  # every forward pass of a round before any backward

    def work(w: int) -> None:
        for i in range(w, len(xs), WORKERS):
            out, _ = model(xs[i])
            meet.wait(timeout=30)
            got[i] = model.backward(out * 0.5)[0]

    run_in_threads(work)
    for i in range(len(xs)):
        np.testing.assert_array_equal(got[i], want[i], err_msg=f"dx of call {i}")
    for name, grad in serial.grads.items():
        np.testing.assert_allclose(model.grads[name], grad, rtol=1e-12, atol=1e-12, err_msg=name)


def test_threads_decoding_with_one_cell_undo_their_own_steps(backend, threads):
    threads(2)
    rng = np.random.default_rng(5)
    runs = [rng.standard_normal((3, 2, 4)) for _ in range(WORKERS * 2)]  # (steps, B, I) each

    def decode(cell: pyrnn.LSTMCell, xs: np.ndarray, meet=None) -> list[np.ndarray]:
        state = None
        for x in xs:  # the steps of several threads interleave on the cell
            state = cell(x, state)
            if meet is not None:
                meet.wait(timeout=30)
        dxs, d_c = [], None
        d_h = np.ones_like(state[0])
        for _ in xs:  # undoes this thread's steps, most recent first
            dx, (d_h, d_c) = cell.backward(d_h, d_c)
            dxs.append(dx)
        return dxs

    serial = pyrnn.LSTMCell(4, 6, dtype=np.float64, seed=8, backend=backend)
    want = [decode(serial, xs) for xs in runs]
    cell = pyrnn.LSTMCell(4, 6, dtype=np.float64, seed=8, backend=backend)
    got: list = [None] * len(runs)
    meet = threading.Barrier(WORKERS)

    def work(w: int) -> None:
        for i in range(w, len(runs), WORKERS):
            got[i] = decode(cell, runs[i], meet)

    run_in_threads(work)
    for i in range(len(runs)):
        for step, (g, w) in enumerate(zip(got[i], want[i], strict=True)):
            np.testing.assert_array_equal(g, w, err_msg=f"dx of run {i}, undo {step}")
    for name, grad in serial.grads.items():
        np.testing.assert_allclose(cell.grads[name], grad, rtol=1e-12, atol=1e-12, err_msg=name)


def forward_in_another_thread(call) -> None:
    worker = threading.Thread(target=call)
    worker.start()
    worker.join()


def test_backward_of_a_forward_run_in_another_thread_raises(backend):
    lstm = pyrnn.LSTM(3, 4, seed=0, backend=backend)
    x = np.ones((2, 1, 3), np.float32)
    forward_in_another_thread(lambda: lstm(x))
    with pytest.raises(RuntimeError, match="no forward pass has run yet in this thread"):
        lstm.backward(np.ones((2, 1, 4), np.float32))
    lstm(x)  # this thread's own pass, then the other thread's, leave this one's tape in place
    forward_in_another_thread(lambda: lstm(x))
    dx, _ = lstm.backward(np.ones((2, 1, 4), np.float32))
    assert dx.shape == x.shape


def test_layer_backward_of_a_forward_run_in_another_thread_raises(backend):
    head = Linear(3, 2, seed=0, backend=backend)
    embed = Embedding(5, 3, seed=0)
    forward_in_another_thread(lambda: (head(np.ones((4, 3), np.float32)), embed(np.arange(4))))
    with pytest.raises(RuntimeError, match="in this thread"):
        head.backward(np.ones((4, 2), np.float32))
    with pytest.raises(RuntimeError, match="in this thread"):
        embed.backward(np.ones((4, 3), np.float32))


def test_backward_waits_for_a_step_holding_the_gradients(backend):
    # While another holder (an optimizer step, zero_grad) has the module's gradients, a backward
    # pass computes its gradients and adds them only once the holder lets go.
    lstm = pyrnn.LSTM(3, 4, dtype=np.float64, seed=0, backend=backend)
    x, d_out = np.ones((2, 1, 3)), np.ones((2, 1, 4))
    lstm(x)
    lstm.backward(d_out)
    once = {name: grad.copy() for name, grad in lstm.grads.items()}
    lstm.zero_grad()
    with lstm._grad_lock:
        worker = threading.Thread(target=lambda: (lstm(x), lstm.backward(d_out)))
        worker.start()
        worker.join(timeout=0.3)
        assert worker.is_alive(), "backward added into grads while another thread held them"
        assert all(not grad.any() for grad in lstm.grads.values())
    worker.join(timeout=30)
    for name, grad in once.items():
        np.testing.assert_array_equal(lstm.grads[name], grad, err_msg=name)


@pytest.mark.parametrize("action", ["step", "zero_grad", "clip_grad_norm", "clip_grad_value"])
def test_optimizer_waits_for_a_backward_adding_gradients(action):
    model = Tagger("numpy")
    opt = optim.Adam(model, lr=0.1)
    calls = {"step": opt.step, "zero_grad": opt.zero_grad,
             "clip_grad_norm": lambda: optim.clip_grad_norm(model, 1.0),
             "clip_grad_value": lambda: optim.clip_grad_value(model, 1.0)}
    with model.rnn._grad_lock:  # as a backward pass holds it while it adds
        worker = threading.Thread(target=calls[action])
        worker.start()
        worker.join(timeout=0.3)
        assert worker.is_alive(), f"{action} ran while a backward pass was adding gradients"
    worker.join(timeout=30)
    assert not worker.is_alive()


def test_module_zero_grad_waits_for_a_backward_adding_gradients():
    model = Tagger("numpy")
    with model.head._grad_lock:
        worker = threading.Thread(target=model.zero_grad)
        worker.start()
        worker.join(timeout=0.3)
        assert worker.is_alive()
    worker.join(timeout=30)


def test_eval_and_no_grad_calls_from_threads_match_serial_ones(backend, threads):
    threads(2)
    lstm = pyrnn.LSTM(4, 16, num_layers=2, bidirectional=True, seed=5, backend=backend)
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((6, 1 + i % 4, 4)).astype(np.float32) for i in range(16)]
    lstm.eval()
    want = [lstm(x) for x in xs]
    lstm.train()
    got: list = [None] * len(xs)

    def work(w: int) -> None:
        for i in range(w, len(xs), WORKERS):
            if w % 2:  # half the threads in no_grad on a training-mode module
                with pyrnn.no_grad():
                    got[i] = lstm(xs[i])
            else:
                got[i] = lstm.frozen()(xs[i])

    run_in_threads(work)
    for (out, (h, c)), (w_out, (w_h, w_c)) in zip(got, want, strict=True):
        for a, b in ((out, w_out), (h, w_h), (c, w_c)):
            np.testing.assert_array_equal(a, b)
    lstm.eval()

    def work_eval(w: int) -> None:
        for i in range(w, len(xs), WORKERS):
            got[i] = lstm(xs[i])

    run_in_threads(work_eval)
    for (out, _), (w_out, _) in zip(got, want, strict=True):
        np.testing.assert_array_equal(out, w_out)


@needs_cpp
def test_concurrent_core_calls_return_the_serial_bits(threads):
    # Concurrent calls share the core's threads (a call may run on fewer than set): the results
    # must not change, for every entry point that runs a team.
    threads(2)
    from pyrnn import _core as core

    rng = np.random.default_rng(2)
    H, I = 40, 12  # noqa: N806, E741
    weights = [tuple(rng.standard_normal(s).astype(np.float32) * 0.2
                     for s in ((4 * H, I if k < 2 else 2 * H), (4 * H, H), (4 * H,), (4 * H,)))
               for k in range(4)]
    cases = []
    for i in range(12):
        B = 1 + i % 5  # noqa: N806
        x = rng.standard_normal((7, B, I)).astype(np.float32)
        h0 = np.zeros((4, B, H), np.float32)
        d_out = rng.standard_normal((7, B, 2 * H)).astype(np.float32)
        rows = rng.standard_normal((64 + i, I)).astype(np.float32)
        cases.append((x, h0, d_out, rows))

    def run(case):
        x, h0, d_out, rows = case
        out, h_n, c_n, tape = core.stack_forward("lstm", x, h0, h0, weights, True, None, None, True)
        grads = core.stack_backward(tape, d_out, None, None)
        w = weights[0][0]
        dense = core.linear_backward(rows, w, rows @ w.T, True)
        return [out, h_n, c_n, grads[0], grads[1], grads[2], *grads[3][2], *dense]

    want = [run(case) for case in cases]
    got: list = [None] * len(cases)

    def work(w: int) -> None:
        for _ in range(2):
            for i in range(w, len(cases), WORKERS):
                got[i] = run(cases[i])

    run_in_threads(work)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        for a, b in zip(g, w, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"case {i}")


def test_a_deep_copy_has_its_own_lock_and_no_tape(backend):
    import copy

    model = Tagger(backend)
    model.rnn(np.ones((2, 1, 6)))
    twin = copy.deepcopy(model)
    assert twin.rnn._grad_lock is not model.rnn._grad_lock
    with pytest.raises(RuntimeError, match="no forward pass has run yet in this thread"):
        twin.rnn.backward(np.ones((2, 1, 9)))
    out, _ = twin.rnn(np.ones((2, 1, 6)))
    np.testing.assert_array_equal(out, model.rnn(np.ones((2, 1, 6)))[0])
    twin.rnn.backward(np.ones((2, 1, 9)))
    assert not any(g.any() for g in model.rnn.grads.values())
