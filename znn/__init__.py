"""znn: ZNN-compatible 2D/3D convolutional networks for electron microscopy, on dask."""

import znn.environment  # noqa: F401  (first: the environment before anything znn starts can change it)
from znn.errors import ZnnError

__version__ = "0.1.0"
__all__ = ["ZnnError", "__version__"]
