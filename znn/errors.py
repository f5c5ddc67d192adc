"""The project's exception hierarchy.

Every error a user can cause derives from :class:`ZnnError` and from the builtin it resembles, so callers may
catch either. Messages name the file, line, section or key at fault and say what would be valid.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "ZnnError",
    "ZnnFileNotFoundError",
    "FormatError",
    "NetworkSpecError",
    "SpecFileError",
    "ConfigError",
    "WorkflowError",
    "CheckpointError",
    "VolumeError",
    "NonFiniteError",
    "ShapeError",
    "TrainingError",
    "OutputError",
    "OutputBusyError",
    "where",
    "closest",
]


class ZnnError(Exception):
    """Base class of every error this project raises on purpose."""


class ZnnFileNotFoundError(ZnnError, FileNotFoundError):
    """A file named by the user (or by one of the user's files) does not exist."""

    def __str__(self) -> str:  # FileNotFoundError formats (errno, strerror) pairs; keep our message
        return str(self.args[0]) if self.args else ""


class FormatError(ZnnError, ValueError):
    """A file is malformed; the message names the file and the line or key."""


class NetworkSpecError(FormatError):
    """A `.znn` network description is malformed or inconsistent."""


class SpecFileError(FormatError):
    """A `.spec` sample file is malformed."""


class ConfigError(FormatError):
    """A `.cfg` job file is malformed."""


class WorkflowError(ConfigError):
    """A batch workflow (`znn run WORKFLOW.yaml`) or its state file is malformed, or steps of it failed."""


class CheckpointError(FormatError):
    """A network `.h5` checkpoint is malformed or does not match its network."""


class VolumeError(ZnnError, ValueError):
    """A volume cannot be read or written as asked (bad path, dataset, dimensionality, dtype)."""


class NonFiniteError(VolumeError):
    """A volume holds NaN or infinite values; the message names the file, the first bad position and the count."""


class ShapeError(ZnnError, ValueError):
    """Array shapes do not fit together (patch too small for the FOV, kernel larger than input, ...)."""


def where(path: str | Path | None, line: int | None = None, key: str | None = None) -> str:
    """Format a location for an error message: ``file:line`` or ``file [section] key``."""
    text = str(path) if path is not None else "<string>"
    if line is not None:
        text += f":{line}"
    if key is not None:
        text += f": {key}"
    return text


def closest(word: str, choices: Iterable[str]) -> str:
    """A 'did you mean' suffix naming the closest valid choice, or listing the choices when none is close."""
    choices = sorted(set(choices))
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if match:
        return f"did you mean {match[0]!r}?"
    return "valid: " + ", ".join(choices)


class TrainingError(ZnnError, ArithmeticError):
    """Training cannot go on (a NaN or infinity in a step); the message names the step and the layer."""


class OutputError(ZnnError, ValueError):
    """An output cannot go where it is asked for: it would write over an input of the same job, or its place is a
    file where a folder is needed (or the reverse), or read-only; the message names the path(s) and the fix."""


class OutputBusyError(OutputError):
    """Another run (named by pid, host and start time) is writing this output now."""
