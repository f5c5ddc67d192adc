"""znn: ZNN-compatible 2D/3D convolutional networks for electron microscopy, on dask."""

import os

from znn.errors import ZnnError

# The environment as this process had it when znn was imported, before any dask nanny it starts could write into it
# (znn.pipeline.run.schedulers tells a variable the user set from one an earlier cluster's nanny left behind).
STARTING_ENVIRONMENT = dict(os.environ)

__version__ = "0.1.0"
__all__ = ["ZnnError", "__version__"]
