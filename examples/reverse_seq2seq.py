"""N -> M: an encoder-decoder that spells a word backwards ("pyrnn" -> "nnryp").

The encoder GRU reads words of 3 to 8 letters as one padded batch with `lengths`, so each
word's final state is taken at its own last letter. That state starts the decoder GRU, which
is trained with teacher forcing to write the reversed word and then "." (positions after the
"." are ignored by the loss), and tested by greedy decoding. `pyrnn addition` is the bigger
N -> M application. Runs in a few seconds.
"""

import numpy as np

import pyrnn
from pyrnn import optim
from pyrnn.layers import Embedding, Linear
from pyrnn.losses import cross_entropy

LETTERS = "abcdefghij"
VOCAB = LETTERS + ".>"  # "." ends the answer, ">" starts the decoder
MAX_LEN, BATCH, HIDDEN, STEPS = 8, 64, 96, 600
IGNORE = -100


def make_batch(rng, batch):
    lengths = rng.integers(3, MAX_LEN + 1, size=batch)
    words = rng.integers(0, len(LETTERS), size=(MAX_LEN, batch))
    targets = np.full((MAX_LEN + 1, batch), IGNORE)
    for b, n in enumerate(lengths):
        targets[: n + 1, b] = [*words[:n, b][::-1], VOCAB.index(".")]
    decoder_in = np.vstack([np.full((1, batch), VOCAB.index(">")), np.maximum(targets[:-1], 0)])
    return words, lengths, decoder_in, targets


rng = np.random.default_rng(0)
enc_embed, dec_embed = Embedding(len(VOCAB), 16, seed=0), Embedding(len(VOCAB), 16, seed=1)
encoder, decoder = pyrnn.GRU(16, HIDDEN, seed=2), pyrnn.GRU(16, HIDDEN, seed=3)
head = Linear(HIDDEN, len(VOCAB), seed=4)
model = [enc_embed, dec_embed, encoder, decoder, head]
adam = optim.Adam(model, lr=5e-3)

for step in range(1, STEPS + 1):
    words, lengths, decoder_in, targets = make_batch(rng, BATCH)
    for module in model:
        module.zero_grad()
    _, state = encoder(enc_embed(words), lengths=lengths)
    out, _ = decoder(dec_embed(decoder_in), state)
    loss, d_logits = cross_entropy(head(out), targets, ignore_index=IGNORE)
    d_dec_x, d_state = decoder.backward(head.backward(d_logits))
    dec_embed.backward(d_dec_x)
    d_enc_x, _ = encoder.backward(None, d_state)
    enc_embed.backward(d_enc_x)
    optim.clip_grad_norm(model, 1.0)
    adam.step()
    if step % 200 == 0:
        print(f"step {step}: loss {loss:.4f}")


def reverse(words, lengths):
    """Greedy decoding: each step reads the letter the previous step wrote."""
    with pyrnn.no_grad():
        _, state = encoder(enc_embed(words), lengths=lengths)
        token, written = np.full((1, words.shape[1]), VOCAB.index(">")), []
        for _ in range(MAX_LEN + 1):
            out, state = decoder(dec_embed(token), state)
            token = head(out).argmax(-1)
            written.append(token[0])
    return np.stack(written)


words, lengths, _, targets = make_batch(np.random.default_rng(1), 1000)
written = reverse(words, lengths)
right = [(written[: n + 1, b] == targets[: n + 1, b]).all() for b, n in enumerate(lengths)]
print(f"held-out words reversed exactly: {np.mean(right):.3f}")
for b in range(3):
    word = "".join(LETTERS[i] for i in words[: lengths[b], b])
    answer = "".join(VOCAB[i] for i in written[:, b]).split(".")[0]
    print(f"  {word} -> {answer}")
