"""N -> 1: the adding problem (Hochreiter & Schmidhuber, 1997), a regression from the last step.

Each step carries two numbers: a random value in [0, 1] and a marker that is 1 at exactly two
steps. The target is the sum of the two marked values. Always answering 1.0 scores an MSE of
about 0.167; a network that learned the task does far better. Runs in a few seconds.
"""

import numpy as np

import pyrnn
from pyrnn import optim
from pyrnn.layers import Linear
from pyrnn.losses import mse

T, BATCH, HIDDEN, STEPS = 30, 64, 64, 1200


def make_batch(rng, batch):
    values = rng.random((T, batch))
    marked = np.stack([rng.choice(T, size=2, replace=False) for _ in range(batch)], axis=1)
    markers = np.zeros((T, batch))
    markers[marked, np.arange(batch)] = 1
    x = np.stack([values, markers], axis=-1).astype(np.float32)  # (T, B, 2)
    target = (values * markers).sum(axis=0, keepdims=True).T.astype(np.float32)  # (B, 1)
    return x, target


rng = np.random.default_rng(0)
lstm = pyrnn.LSTM(2, HIDDEN, seed=0)
head = Linear(HIDDEN, 1, seed=1)
adam = optim.Adam([lstm, head], lr=3e-3)

for step in range(1, STEPS + 1):
    x, target = make_batch(rng, BATCH)
    lstm.zero_grad()
    head.zero_grad()
    out, _ = lstm(x)
    loss, d_pred = mse(head(out[-1]), target)  # N -> 1: only the last step is read
    d_out = np.zeros_like(out)
    d_out[-1] = head.backward(d_pred)
    lstm.backward(d_out)
    optim.clip_grad_norm([lstm, head], 1.0)
    adam.step()
    if step % 200 == 0:
        print(f"step {step}: mse {loss:.4f}")

x, target = make_batch(np.random.default_rng(1), 2000)
with pyrnn.no_grad():
    predicted = head(lstm(x)[0][-1])
print(f"held-out mse {mse(predicted, target)[0]:.4f} (always answering 1.0: "
      f"{mse(np.ones_like(target), target)[0]:.4f})")
for i in range(3):
    print(f"  target {target[i, 0]:.3f}  predicted {predicted[i, 0]:.3f}")
