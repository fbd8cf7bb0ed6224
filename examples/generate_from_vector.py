"""1 -> N: generate a whole sequence from one vector.

The vector (amplitude, frequency, phase) sets the GRU's initial state through a Linear layer;
the GRU then runs 40 steps on no input of its own (zeros), and a Linear layer reads the
waveform amplitude * sin(frequency * t + phase) off every step. Gradients flow back from every
step's error to the initial state and from there into the Linear layer that made it. Runs in a
few seconds.
"""

import numpy as np

import pyrnn
from pyrnn import optim
from pyrnn.layers import Linear
from pyrnn.losses import mse

T, BATCH, HIDDEN, STEPS = 40, 64, 64, 800


def make_batch(rng, batch):
    amplitude = rng.uniform(0.5, 1.0, batch)
    frequency = rng.uniform(0.1, 0.4, batch)
    phase = rng.uniform(0, np.pi, batch)
    t = np.arange(T)[:, None]
    wave = amplitude * np.sin(frequency * t + phase)  # (T, B)
    vector = np.stack([amplitude, frequency, phase], axis=1)  # (B, 3)
    return vector.astype(np.float32), wave[..., None].astype(np.float32)


rng = np.random.default_rng(0)
to_state = Linear(3, HIDDEN, seed=0)
gru = pyrnn.GRU(1, HIDDEN, seed=1)
head = Linear(HIDDEN, 1, seed=2)
model = [to_state, gru, head]
adam = optim.Adam(model, lr=3e-3)
no_input = np.zeros((T, BATCH, 1), np.float32)

for step in range(1, STEPS + 1):
    vector, wave = make_batch(rng, BATCH)
    for module in model:
        module.zero_grad()
    h0 = np.tanh(to_state(vector))[None]  # (1, B, H): the vector becomes the initial state
    out, _ = gru(no_input, h0)
    loss, d_pred = mse(head(out), wave)
    _, d_h0 = gru.backward(head.backward(d_pred))
    to_state.backward(d_h0[0] * (1 - h0[0] ** 2))  # through the tanh
    optim.clip_grad_norm(model, 1.0)
    adam.step()
    if step % 200 == 0:
        print(f"step {step}: mse {loss:.5f}")

vector, wave = make_batch(np.random.default_rng(1), 500)
with pyrnn.no_grad():
    out, _ = gru(np.zeros((T, 500, 1), np.float32), np.tanh(to_state(vector))[None])
    predicted = head(out)
print(f"held-out mse {mse(predicted, wave)[0]:.5f} (predicting zeros: {np.mean(wave**2):.5f})")
amplitude, frequency, phase = vector[0]
print(f"from the vector (amplitude {amplitude:.2f}, frequency {frequency:.2f}, phase {phase:.2f}):")
print("  generated", " ".join(f"{v:+.2f}" for v in predicted[:12, 0, 0]), "...")
print("  true     ", " ".join(f"{v:+.2f}" for v in wave[:12, 0, 0]), "...")
