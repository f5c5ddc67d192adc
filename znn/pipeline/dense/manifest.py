"""The resume manifest of a dense-inference output store: which output blocks are finished, for which model.

Layout inside the output store (a zarr directory), next to the output images::

    out_sample1.zarr/
      znn-manifest/
        run.json            # digest, layout digest and the settings they were made from (human readable)
        done/0_3_1          # one marker per finished block, holding the digest it was computed with

A block is marked done only after its data has been written (the task writes the chunk, then the marker), and a
marker is written like a chunk (:func:`znn.io.atomic_store.atomic_write_bytes`: a temporary file in the store's
``.znn-partial/``, then a rename), so a run killed at any moment leaves either no marker or a complete one, and no
stray file in ``done/``: a rerun redoes exactly the blocks without a valid marker. A marker whose digest differs
from the current run's (other weights, other settings) counts as not done.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from znn.io.atomic_store import atomic_write_bytes

__all__ = ["Manifest", "digest_of", "weights_digest", "MANIFEST_DIR"]

MANIFEST_DIR = "znn-manifest"

Index = tuple[int, ...]


def _hash_update(h: Any, value: Any) -> None:
    """Feed a nested structure of dicts, lists, strings, numbers and arrays into ``h`` deterministically."""
    if isinstance(value, np.ndarray):
        h.update(f"nd{value.dtype.str}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, Mapping):
        h.update(b"{")
        for key in sorted(value, key=str):
            h.update(str(key).encode() + b":")
            _hash_update(h, value[key])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for item in value:
            _hash_update(h, item)
        h.update(b"]")
    else:
        h.update(repr(value).encode())


def digest_of(value: Any) -> str:
    """A short hex digest (sha256, 20 hex digits) of a nested structure with NumPy arrays."""
    h = hashlib.sha256()
    _hash_update(h, value)
    return h.hexdigest()[:20]


def weights_digest(kernels: Mapping[str, np.ndarray], biases: Mapping[str, np.ndarray]) -> str:
    """Digest of a network's parameters (kernels by edge, biases by node)."""
    return digest_of({"kernels": dict(kernels), "biases": dict(biases)})


class Manifest:
    """The manifest of one output store.

    ``digest`` identifies the model and settings of the current run. ``layout`` identifies the shape of the output
    (array shapes, chunks, block grid); when it differs from the stored one the output must be recreated and every
    marker is dropped (:meth:`reset`).
    """

    def __init__(self, store: str | os.PathLike[str], digest: str, layout: str):
        self.root = Path(store) / MANIFEST_DIR
        self.done_dir = self.root / "done"
        self.digest = digest
        self.layout = layout

    # -- state of the store ---------------------------------------------------------------------------------
    def stored(self) -> dict[str, Any] | None:
        """The stored run.json, or None if there is none (a fresh store) or it is unreadable."""
        try:
            return dict(json.loads((self.root / "run.json").read_text()))
        except (OSError, ValueError):
            return None

    def layout_matches(self) -> bool:
        found = self.stored()
        return found is not None and found.get("layout") == self.layout

    def reset(self) -> None:
        """Forget every finished block (the output is being recreated)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def begin(self, settings: Mapping[str, Any]) -> None:
        """Record this run's digest, layout and settings (markers of other digests stay, and count as not done)."""
        self.done_dir.mkdir(parents=True, exist_ok=True)
        record = {"digest": self.digest, "layout": self.layout, "settings": dict(settings)}
        self._write(self.root / "run.json", json.dumps(record, indent=1, sort_keys=True, default=str))

    def _write(self, path: Path, text: str) -> None:
        # the temporary file goes to the store's partial folder, which every run clears before it writes
        atomic_write_bytes(self.root.parent, path, text.encode())

    # -- blocks ---------------------------------------------------------------------------------------------
    @staticmethod
    def _name(index: Iterable[int]) -> str:
        return "_".join(str(int(i)) for i in index)

    def is_done(self, index: Index) -> bool:
        try:
            return (self.done_dir / self._name(index)).read_text().strip() == self.digest
        except OSError:
            return False

    def done_blocks(self) -> set[Index]:
        """Indices of the blocks finished with the current digest."""
        found: set[Index] = set()
        if not self.done_dir.is_dir():
            return found
        for entry in os.scandir(self.done_dir):
            if entry.name.startswith("."):
                continue
            try:
                if Path(entry.path).read_text().strip() == self.digest:
                    found.add(tuple(int(v) for v in entry.name.split("_")))
            except (OSError, ValueError):
                continue
        return found

    def mark_done(self, index: Index) -> None:
        """Record that block ``index`` is written (call after its data is in the store)."""
        self._write(self.done_dir / self._name(index), self.digest + "\n")
