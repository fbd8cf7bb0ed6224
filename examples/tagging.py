"""N -> N: tag every element of a sequence, with variable-length batches.

Each input is a sequence of 5 to 20 random digits; the tag of each position is the largest
digit seen so far. An LSTM reads the padded batch with `lengths` (positions past a sequence's
end produce zero outputs and are masked out of the loss), and a Linear layer scores the 10
possible tags at every step. Runs in a few seconds.
"""

import numpy as np

import pyrnn
from pyrnn import optim
from pyrnn.layers import Linear, one_hot
from pyrnn.losses import cross_entropy

T_MAX, BATCH, HIDDEN, STEPS = 20, 32, 64, 300


def make_batch(rng, batch):
    lengths = rng.integers(5, T_MAX + 1, size=batch)
    digits = rng.integers(0, 10, size=(T_MAX, batch))
    tags = np.maximum.accumulate(digits, axis=0)
    mask = np.arange(T_MAX)[:, None] < lengths[None, :]  # (T, B): True inside each sequence
    return one_hot(digits, 10), tags, lengths, mask


rng = np.random.default_rng(0)
lstm = pyrnn.LSTM(10, HIDDEN, seed=0)
head = Linear(HIDDEN, 10, seed=1)
adam = optim.Adam([lstm, head], lr=1e-2)

for step in range(1, STEPS + 1):
    x, tags, lengths, mask = make_batch(rng, BATCH)
    lstm.zero_grad()
    head.zero_grad()
    out, _ = lstm(x, lengths=lengths)
    loss, d_logits = cross_entropy(head(out), tags, mask=mask)
    lstm.backward(head.backward(d_logits))
    adam.step()
    if step % 100 == 0:
        print(f"step {step}: loss {loss:.4f}")

x, tags, lengths, mask = make_batch(np.random.default_rng(1), 1000)
with pyrnn.no_grad():
    predicted = head(lstm(x, lengths=lengths)[0]).argmax(-1)
print(f"held-out per-tag accuracy: {(predicted == tags)[mask].mean():.4f}")
n = lengths[0]
print("digits   ", "".join(map(str, x[:n, 0].argmax(-1))))
print("predicted", "".join(map(str, predicted[:n, 0])))
print("true tags", "".join(map(str, tags[:n, 0])))
