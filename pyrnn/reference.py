"""Pure-NumPy reference of every kernel (see the kernel contract in pyrnn/_backend.py)."""
