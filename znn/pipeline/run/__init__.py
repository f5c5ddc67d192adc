"""Where graphs run: schedulers (synchronous, threads, a dask.distributed cluster) and progress reporting."""
