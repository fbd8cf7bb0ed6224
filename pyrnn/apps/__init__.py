"""The command-line applications: each file holds one whole model and its training loop.

``charrnn`` (N->N language model), ``addition`` (N->M encoder-decoder), ``classify`` (N->1),
``gradflow`` (vanishing gradients, RNN vs LSTM vs GRU, and their variants). Run them as
``pyrnn <app> --help``.
"""
