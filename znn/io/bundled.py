"""The job files that travel with the package (the ``workflows/`` folder, installed as ``znn.workflows``)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from znn.errors import ZnnFileNotFoundError


def bundled_file(*parts: str) -> Path:
    """The installed file ``workflows/<parts...>`` (a network, sample, job or workflow file) as a path on disk.

    The package is installed as plain files (a wheel or an editable checkout), so the resource is a real file;
    ZnnFileNotFoundError if the installation lacks it.
    """
    resource = files("znn.workflows").joinpath(*parts)
    path = Path(str(resource))
    if not path.exists():
        raise ZnnFileNotFoundError(f"{path}: bundled file workflows/{'/'.join(parts)} is missing from this "
                                   "installation of znn; reinstall it (pip install znn, or pip install . in a "
                                   "checkout)")
    return path
