"""Locating ../shared (real data and ZNN reference files); tests that need it skip when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the checkout
SHARED = (ROOT / ".." / "shared").resolve()
REFERENCE = SHARED / "znn-reference"
DATA = SHARED / "data"


def need(path: Path) -> Path:
    """Skip the calling test with a reason when ``path`` (under ../shared) is missing."""
    if not path.exists():
        pytest.skip(f"{path} not present (../shared is only beside a development checkout)")
    return path
