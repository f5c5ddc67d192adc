"""The environment as this process had it when znn was first imported, before any dask nanny it starts could
write into it (:mod:`znn.pipeline.run.schedulers` tells a variable the user set from one an earlier cluster's nanny
left behind). ``znn/__init__`` imports this module first, so the snapshot is taken at ``import znn``."""

import os

STARTING_ENVIRONMENT = dict(os.environ)
