"""Dask graphs: training steps, inference blocks, spectra cache, autotune, schedulers."""
