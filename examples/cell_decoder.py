"""N -> M with a step-by-step decoder: an LSTM reads 8 digits, an LSTMCell writes them sorted.

The encoder is a whole-sequence pyrnn.LSTM; its final state (h, c) starts a pyrnn.LSTMCell that
the Python loop below drives one token at a time, as a decoder that chooses its next input
must. In training each step reads the right previous digit (teacher forcing), and the backward
pass walks the same steps in reverse: every cell.backward undoes the most recent step not yet
undone, and the dh0 it returns joins the gradient of the h that step was given. At test time
each step reads the digit it wrote the step before (greedy decoding). Runs in a few seconds.
"""

import numpy as np

import pyrnn
from pyrnn import optim
from pyrnn.layers import Embedding, Linear
from pyrnn.losses import cross_entropy

DIGITS, LENGTH, BATCH, HIDDEN, STEPS = 10, 8, 64, 64, 400
START = DIGITS  # the decoder's first input


def make_batch(rng, batch):
    """Digits (LENGTH, batch), their sorted order as targets, and the decoder's inputs."""
    digits = rng.integers(0, DIGITS, size=(LENGTH, batch))
    targets = np.sort(digits, axis=0)
    decoder_in = np.vstack([np.full((1, batch), START), targets[:-1]])
    return digits, decoder_in, targets


rng = np.random.default_rng(0)
enc_embed, dec_embed = Embedding(DIGITS, 16, seed=0), Embedding(DIGITS + 1, 16, seed=1)
encoder, decoder = pyrnn.LSTM(16, HIDDEN, seed=2), pyrnn.LSTMCell(16, HIDDEN, seed=3)
head = Linear(HIDDEN, DIGITS, seed=4)
model = [enc_embed, dec_embed, encoder, decoder, head]
adam = optim.Adam(model, lr=1e-2)

for step in range(1, STEPS + 1):
    digits, decoder_in, targets = make_batch(rng, BATCH)
    for module in model:
        module.zero_grad()
    _, (h_n, c_n) = encoder(enc_embed(digits))
    state, hs = (h_n[0], c_n[0]), []
    for x in dec_embed(decoder_in):  # one step per call: the cell keeps each step's tape
        state = decoder(x, state)
        hs.append(state[0])
    loss, d_logits = cross_entropy(head(np.stack(hs)), targets)
    d_hs, d_x = head.backward(d_logits), []
    d_h, d_c = np.zeros_like(hs[0]), None  # what the step after passed back to this state
    for t in reversed(range(LENGTH)):  # the steps in reverse: the last one is undone first
        dx, (d_h, d_c) = decoder.backward(d_hs[t] + d_h, d_c)
        d_x.append(dx)
    dec_embed.backward(np.stack(d_x[::-1]))
    d_enc_x, _ = encoder.backward(None, (d_h[None], d_c[None]))
    enc_embed.backward(d_enc_x)
    optim.clip_grad_norm(model, 1.0)
    adam.step()
    if step % 100 == 0:
        print(f"step {step}: loss {loss:.4f}")


def sort_greedily(digits):
    """Each step reads the digit the previous step wrote."""
    with pyrnn.no_grad():
        _, (h_n, c_n) = encoder(enc_embed(digits))
        state, token, written = (h_n[0], c_n[0]), np.full(digits.shape[1], START), []
        for _ in range(LENGTH):
            state = decoder(dec_embed(token[None])[0], state)
            token = head(state[0]).argmax(-1)
            written.append(token)
    return np.stack(written)


digits, _, targets = make_batch(np.random.default_rng(1), 1000)
written = sort_greedily(digits)
print(f"held-out sequences sorted exactly: {(written == targets).all(axis=0).mean():.3f}, "
      f"digits right: {(written == targets).mean():.3f}")
for b in range(3):
    print(f"  {''.join(map(str, digits[:, b]))} -> {''.join(map(str, written[:, b]))}")
