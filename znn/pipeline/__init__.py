"""The engine: a network's dask graphs and where they run, its forward evaluators, dense inference over volumes,
training, and the jobs that tie them to files (see docs/architecture.md)."""
