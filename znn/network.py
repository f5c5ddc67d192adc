"""A network: a spec plus its parameters (kernels per conv edge group, biases per transfer node group) and the
optimiser's momentum, initialised with ZNN's initialisers from one seed."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from znn.errors import CheckpointError
from znn.ops.init import initialise
from znn.spec import NetworkSpec


@dataclass
class Network:
    """Parameters of a :class:`NetworkSpec`.

    ``kernels[edge]`` is (in_maps, out_maps, z, y, x) and ``biases[node]`` is (maps,); ``kernel_momentum`` and
    ``bias_momentum`` have the same shapes. ``hyper`` holds eta, momentum and weight_decay as saved with ZNN's
    checkpoints.
    """

    spec: NetworkSpec
    kernels: dict[str, np.ndarray]
    biases: dict[str, np.ndarray]
    kernel_momentum: dict[str, np.ndarray] = field(default_factory=dict)
    bias_momentum: dict[str, np.ndarray] = field(default_factory=dict)
    hyper: dict[str, float] = field(default_factory=lambda: {"eta": 0.01, "momentum": 0.9, "weight_decay": 0.0})

    def __post_init__(self) -> None:
        for name, array in self.kernels.items():
            self.kernel_momentum.setdefault(name, np.zeros_like(array))
        for name, array in self.biases.items():
            self.bias_momentum.setdefault(name, np.zeros_like(array))

    @classmethod
    def initialise(cls, spec: NetworkSpec, seed: int = 0, dtype: np.dtype | type = np.float32) -> "Network":
        """Draw every parameter group with its ``init``; each group has its own stream derived from the seed and
        its name, so adding a group leaves the others unchanged."""
        kernels = {}
        for name in spec.conv_edges():
            edge, shape = spec.edges[name], spec.kernel_shape(name)
            volume = int(np.prod(shape[2:]))
            kernels[name] = initialise(edge.init, shape, _stream(seed, name), edge.init_args,
                                       fan_in=shape[0] * volume, fan_out=shape[1] * volume, dtype=dtype)
        biases = {}
        for name in spec.bias_nodes():
            node = spec.nodes[name]
            biases[name] = initialise(node.init, (node.size,), _stream(seed, name), node.init_args,
                                      fan_in=1, fan_out=1, dtype=dtype)
        return cls(spec, kernels, biases)

    @property
    def dtype(self) -> np.dtype:
        arrays = [*self.kernels.values(), *self.biases.values()]
        return arrays[0].dtype if arrays else np.dtype(np.float32)

    def astype(self, dtype: np.dtype | type) -> "Network":
        def cast(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {name: array.astype(dtype) for name, array in arrays.items()}

        return Network(self.spec, cast(self.kernels), cast(self.biases), cast(self.kernel_momentum),
                       cast(self.bias_momentum), dict(self.hyper))

    def copy(self) -> "Network":
        return self.astype(self.dtype)

    def sliding_window(self) -> "Network":
        """This network with :meth:`NetworkSpec.sliding_window` as its spec (the same parameter arrays): what dense
        inference runs, so that every output voxel is the network applied to its own window."""
        twin = self.spec.sliding_window()
        if twin is self.spec:
            return self
        return Network(twin, self.kernels, self.biases, self.kernel_momentum, self.bias_momentum, self.hyper)

    def check_shapes(self, where: str = "") -> None:
        """Raise CheckpointError if any parameter's shape disagrees with the spec."""
        for name in self.spec.conv_edges():
            expected = self.spec.kernel_shape(name)
            if name not in self.kernels:
                raise CheckpointError(f"{where}: no kernels for conv edge group {name!r}")
            if self.kernels[name].shape != expected:
                raise CheckpointError(f"{where}: kernels of {name!r} have shape {self.kernels[name].shape}, "
                                      f"the network needs {expected}")
        for name in self.spec.bias_nodes():
            expected_b = (self.spec.nodes[name].size,)
            if name not in self.biases or self.biases[name].shape != expected_b:
                got = self.biases[name].shape if name in self.biases else "nothing"
                raise CheckpointError(f"{where}: biases of {name!r} are {got}, the network needs {expected_b}")


def _stream(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])
