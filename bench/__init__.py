"""pyrnn's benchmark: pyrnn (C++ and NumPy) against PyTorch and ONNX Runtime.

Installed with pyrnn as ``pyrnn.bench``: run ``pyrnn bench --help``. From the repository root the
same runner is ``python -m bench``; ``python -m bench.report FILE`` turns a results JSON into a
Markdown table and a bar chart.
"""
