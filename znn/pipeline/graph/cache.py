"""Kernel spectra kept between graphs until their edge is updated.

Inference recomputes nothing for an unchanged network; training keeps the spectra of edges that do not learn
(eta 0). Memory is counted, bounded by ``max_bytes``, and the cache can be turned off (huge patches).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from znn.types import Triple


class SpectraCache:
    """``(edge, fft shape) -> [in block][out block]`` kernel spectra of the current kernels."""

    def __init__(self, enabled: bool = True, max_bytes: int | None = None):
        self.enabled = enabled
        self.max_bytes = max_bytes
        self._store: dict[tuple[str, Triple], list[list[np.ndarray]]] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, edge: str, shape: Triple | None) -> list[list[np.ndarray]] | None:
        if not self.enabled or shape is None:
            return None
        with self._lock:
            found = self._store.get((edge, (shape[0], shape[1], shape[2])))
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
            return found

    def put(self, edge: str, shape: Triple, spectra: list[list[np.ndarray]]) -> bool:
        """Keep ``spectra`` unless disabled or over budget; returns whether they were kept."""
        if not self.enabled:
            return False
        size = sum(a.nbytes for row in spectra for a in row)
        with self._lock:
            if self.max_bytes is not None and self.nbytes + size > self.max_bytes:
                return False
            self._store[(edge, (shape[0], shape[1], shape[2]))] = spectra
        return True

    def invalidate(self, edge: str) -> None:
        """Forget every spectrum of ``edge`` (its kernels changed)."""
        with self._lock:
            for key in [k for k in self._store if k[0] == edge]:
                del self._store[key]

    def clear(self) -> None:
        with self._lock:
            self._store.clear()

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for rows in self._store.values() for row in rows for a in row)

    def __contains__(self, key: Any) -> bool:
        return key in self._store
