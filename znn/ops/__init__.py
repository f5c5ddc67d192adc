"""Numerical kernels: NumPy arrays in, NumPy arrays out; no dask, no files (import the modules you need)."""
