"""pyrnn's benchmark: pyrnn (C++ and NumPy) against PyTorch and ONNX Runtime.

Run ``python -m bench --help`` from the repository root; ``python -m bench.report FILE`` turns
a results JSON into a Markdown table and a bar chart.
"""
