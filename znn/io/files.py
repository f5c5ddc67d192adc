"""Checks every reader of a user's file makes first: the path names a file, and a text file holds text."""

from __future__ import annotations

from pathlib import Path

from znn.errors import ZnnError, ZnnFileNotFoundError


def existing_file(path: str | Path, error: type[ZnnError], what: str, fix: str = "check the path") -> Path:
    """``path`` as a Path when it names a file. A folder raises ``error``, a missing path ZnnFileNotFoundError;
    both messages name the path, ``what`` was expected there and the ``fix``."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: is a folder, not a {what}; {fix}")
    if not path.is_file():
        raise ZnnFileNotFoundError(f"{path}: {what} not found; {fix}")
    return path


def read_text(path: str | Path, error: type[ZnnError], what: str, fix: str = "check the path") -> str:
    """The text of the file at ``path`` (checked by :func:`existing_file`); bytes that are not text (undecodable,
    or NUL, which no text format of ZNN holds) raise ``error`` naming the file."""
    path = existing_file(path, error, what, fix)
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not a text {what} ({exc.reason})") from None
    if "\0" in text:
        raise error(f"{path}: not a text {what} (it holds NUL bytes)")
    return text
