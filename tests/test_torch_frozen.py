"""layer.frozen() of pyrnn.torch's layers: the layer's eval outputs bit for bit, a snapshot of
its weights, torch's calling convention (batched or not, batch_first, hx), and clear errors."""

from __future__ import annotations

import pytest

import pyrnn

torch = pytest.importorskip("torch")
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402

import pyrnn.torch as pt  # noqa: E402

pytestmark = pytest.mark.skipif(not pyrnn.backend_info()["cpp_available"],
                                reason="pyrnn.torch runs the C++ core")

LAYERS = {"lstm": (pt.LSTM, {}), "gru": (pt.GRU, {}),
          "rnn_relu": (pt.RNN, {"nonlinearity": "relu"}), "lstm_proj": (pt.LSTM, {"proj_size": 5}),
          "gru_reset_before": (pt.GRU, {"reset_after": False})}


def states(layer: torch.nn.Module, batch: int | None, dtype: torch.dtype, seed: int = 1):
    """Random hx for layer: (h_0, c_0) for an LSTM, h_0 otherwise; unbatched when batch is None."""
    g = torch.Generator().manual_seed(seed)
    D = 2 if layer.bidirectional else 1  # noqa: N806
    lead = (layer.num_layers * D,) if batch is None else (layer.num_layers * D, batch)
    h = torch.randn(*lead, layer.proj_size or layer.hidden_size, generator=g, dtype=dtype)
    if layer.mode != "LSTM":
        return h
    return h, torch.randn(*lead, layer.hidden_size, generator=g, dtype=dtype)


def assert_same(got, want) -> None:
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert_same(a, b)
        return
    assert isinstance(got, torch.Tensor) and not got.requires_grad
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_frozen_gives_the_layers_eval_outputs_bit_for_bit(kind, batch_first, dtype):
    cls, extra = LAYERS[kind]
    torch.manual_seed(0)
    layer = cls(6, 9, num_layers=2, bidirectional=True, batch_first=batch_first, dropout=0.5,
                dtype=dtype, **extra)
    fast = layer.frozen()
    layer.eval()
    x = torch.randn((4, 7, 6) if batch_first else (7, 4, 6), dtype=dtype)
    with torch.no_grad():
        for hx in (None, states(layer, 4, dtype)):
            assert_same(fast(x, hx), layer(x, hx))
        unbatched = torch.randn(7, 6, dtype=dtype)  # (T, I) whichever batch_first
        for hx in (None, states(layer, None, dtype)):
            assert_same(fast(unbatched, hx), layer(unbatched, hx))


def test_frozen_is_a_snapshot_of_the_weights():
    torch.manual_seed(0)
    layer = pt.GRU(4, 8)
    x = torch.randn(5, 2, 4)
    fast = layer.frozen()
    with torch.no_grad():
        want = layer(x)[0]
        for p in layer.parameters():
            p.add_(1.0)
        assert not torch.equal(layer(x)[0], want)
        assert torch.equal(fast(x)[0], want)
        assert torch.equal(layer.frozen()(x)[0], layer(x)[0])


def test_frozen_runs_outside_no_grad_on_inputs_without_grad():
    layer = pt.LSTM(3, 4)
    out, (h_n, c_n) = layer.frozen()(torch.randn(2, 1, 3))
    assert out.shape == (2, 1, 4) and h_n.shape == c_n.shape == (1, 1, 4)
    assert not out.requires_grad


def test_frozen_follows_torchs_thread_count(default_threads):
    layer = pt.LSTM(8, 64, num_layers=2)
    x = torch.randn(6, 3, 8)
    fast = layer.frozen()
    with torch.no_grad():
        want = layer(x)[0]
    for n in (1, 2, 1):
        torch.set_num_threads(n)
        assert torch.equal(fast(x)[0], want)
        assert pyrnn.get_num_threads() == n


def test_frozen_refuses_what_it_cannot_run():
    layer = pt.LSTM(3, 4)
    fast = layer.frozen()
    x = torch.randn(5, 2, 3)
    packed = pack_padded_sequence(x, torch.tensor([5, 3]))
    with pytest.raises(TypeError, match="input is a PackedSequence"):
        fast(packed)
    with pytest.raises(TypeError, match="input must be a Tensor, got ndarray"):
        fast(x.numpy())
    with pytest.raises(ValueError, match="expected input to be 2-D or 3-D, got a 4-D"):
        fast(x[None])
    with pytest.raises(TypeError, match=r"input is torch.float64, expected the layer's "
                                        r"torch.float32"):
        fast(x.double())
    with pytest.raises(RuntimeError, match="input requires grad"):
        fast(x.requires_grad_())
    x = x.detach()
    with pytest.raises(ValueError, match=r"input.size\(-1\) must be the input size, 3; got 7"):
        fast(torch.randn(5, 2, 7))
    h0, c0 = states(layer, 2, torch.float32)
    with pytest.raises(TypeError, match=r"hx must be an \(h_0, c_0\) pair of Tensors"):
        fast(x, h0)
    with pytest.raises(RuntimeError, match="for batched 3-D input, c_0 should be 3-D, got 2-D"):
        fast(x, (h0, c0[0]))
    with pytest.raises(TypeError, match="hx must be a Tensor"):
        pt.GRU(3, 4).frozen()(x, (h0,))
    with pytest.raises(RuntimeError, match=r"expected h_0 of size \(1, 2, 4\), got \(1, 1, 4\)"):
        fast(x, (h0[:, :1], c0))
    with pytest.raises(RuntimeError, match=r"expected c_0 of size \(1, 2, 4\), got \(1, 2, 3\)"):
        fast(x, (h0, c0[..., :3]))
    with pytest.raises(TypeError, match="float32 or float64"):
        pt.GRU(3, 4, dtype=torch.bfloat16).frozen()
