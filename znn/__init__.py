"""znn: ZNN-compatible 2D/3D convolutional networks for electron microscopy, on dask."""

from znn.errors import ZnnError

__version__ = "0.1.0"
__all__ = ["ZnnError", "__version__"]
