"""Dask graphs of a network: map blocks, the static plan, task functions, graph building, the spectra cache."""
