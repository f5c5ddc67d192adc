"""Files: volumes (tif, h5, zarr), ZNN network/sample/job files and checkpoints."""

from znn.io.checkpoint import load_checkpoint, load_statistics, save_checkpoint
from znn.io.config import Job, load_job, parse_range
from znn.io.netfile import load_network, parse_network
from znn.io.specfile import SampleSpec, load_spec
from znn.io.volume import (
    VolumePath,
    create_volume,
    open_volume,
    parse_volume_path,
    read_volume,
    volume_resolution,
    volume_shape_dtype,
    write_volume,
)

__all__ = [
    "Job",
    "SampleSpec",
    "VolumePath",
    "create_volume",
    "load_checkpoint",
    "load_job",
    "load_network",
    "load_spec",
    "load_statistics",
    "open_volume",
    "parse_network",
    "parse_range",
    "parse_volume_path",
    "read_volume",
    "save_checkpoint",
    "volume_resolution",
    "volume_shape_dtype",
    "write_volume",
]
