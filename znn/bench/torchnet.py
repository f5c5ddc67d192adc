"""The same network in PyTorch, with the same weights: the peer our engine is timed and checked against.

:func:`build_torch_net` turns a :class:`~znn.network.Network` planned at one output patch into a
``torch.nn.Module`` that evaluates the spec's DAG node group by node group, like
:func:`znn.pipeline.forward.sequential.sequential_forward`:

* ``conv``: ``conv3d`` dilated by the sparsity of its input node, with the kernel flipped and its map axes
  swapped (ZNN's convolution is a true convolution, PyTorch's a cross-correlation, and PyTorch stores
  ``(out, in, z, y, x)``);
* ``max_filter``: ``max_pool3d`` at stride 1 dilated by the input sparsity; ``max_pool``: ``max_pool3d`` with
  stride = size; ``crop``: a slice; ``maxout``: element-wise maximum; ``dropout``: inverted dropout with ZNN's
  keep ratio in training, the identity otherwise;
* node groups sum their incoming edges, transfer nodes add their bias and apply the transfer function;
* every edge reads the central part of its input node that it needs (as the engine's plan does).

PyTorch is an optional extra: importing this module without it raises ``ImportError``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from znn.errors import ShapeError
from znn.network import Network
from znn.spec import Layout, NetworkSpec
from znn.types import Triple

__all__ = ["TorchNet", "build_torch_net", "to_tensors", "torch_kernel", "znn_kernel"]


def torch_kernel(kernel: np.ndarray) -> np.ndarray:
    """ZNN kernels ``(in, out, z, y, x)`` of a true convolution -> PyTorch cross-correlation weights
    ``(out, in, z, y, x)``."""
    return np.ascontiguousarray(kernel.transpose(1, 0, 2, 3, 4)[:, :, ::-1, ::-1, ::-1])


def znn_kernel(weight: np.ndarray) -> np.ndarray:
    """Inverse of :func:`torch_kernel`."""
    return np.ascontiguousarray(weight[:, :, ::-1, ::-1, ::-1].transpose(1, 0, 2, 3, 4))


def _transfer(name: str, args: Sequence[float], x: torch.Tensor, training: bool) -> torch.Tensor:
    """ZNN's transfer functions (:mod:`znn.ops.pointwise`) on tensors."""
    if name == "rectify_linear":
        return torch.relu(x)
    if name == "linear":
        a, b = (float(args[0]), float(args[1]) if len(args) > 1 else 0.0) if args else (1.0, 0.0)
        return x if (a, b) == (1.0, 0.0) else x * a + b
    if name == "tanh":
        a, b = (float(args[0]), float(args[1])) if args else (1.0, 1.0)
        return a * torch.tanh(x * b)
    if name == "soft_sign":
        return x / (1 + x.abs())
    if name == "logistics":
        return torch.sigmoid(x)
    if name == "forward_logistics":
        return x if training else torch.sigmoid(x)
    raise ValueError(f"transfer function {name!r} has no PyTorch counterpart here")


def _trim(x: torch.Tensor, lo: Sequence[int], hi: Sequence[int]) -> torch.Tensor:
    """``x`` without ``lo`` voxels at the start and ``hi`` at the end of each spatial axis. Both are the same at
    every output patch (they come from the network's structure), so a module traced at one patch (the ONNX export
    of :mod:`znn.bench.onnxnet`) runs at any other."""
    if not any(lo) and not any(hi):
        return x
    z, y, w = (slice(int(a), -int(b) if b else None) for a, b in zip(lo, hi))
    return x[:, :, z, y, w]


class TorchNet(torch.nn.Module):
    """A network spec evaluated in PyTorch at a fixed output patch.

    ``forward`` takes a mapping input node -> tensor ``(batch, maps, z, y, x)`` (or one tensor for a network
    with one input) of the planned input patch and returns output node -> ``(batch, maps, *output_patch)``.
    Parameters: ``weight[edge]`` (PyTorch layout) and ``bias[node]``.
    """

    def __init__(self, spec: NetworkSpec, layout: Layout, kernels: Mapping[str, np.ndarray],
                 biases: Mapping[str, np.ndarray], training: bool):
        super().__init__()
        self.spec = spec
        self.layout = layout
        self.weight = torch.nn.ParameterDict(
            {e: torch.nn.Parameter(torch.from_numpy(torch_kernel(k))) for e, k in kernels.items()})
        self.bias = torch.nn.ParameterDict(
            {n: torch.nn.Parameter(torch.from_numpy(np.array(b, copy=True))) for n, b in biases.items()})
        self.order = spec.order()
        self._trims = self.trims()
        self.train(training)

    @property
    def input_patch(self) -> dict[str, Triple]:
        return self.layout.input_patch

    def forward(self, inputs: Mapping[str, torch.Tensor] | torch.Tensor) -> dict[str, torch.Tensor]:
        spec = self.spec
        if isinstance(inputs, torch.Tensor):
            if len(spec.inputs) != 1:
                raise ShapeError(f"the network has inputs {spec.inputs}; pass a dict of tensors")
            inputs = {spec.inputs[0]: inputs}
        values: dict[str, torch.Tensor] = {}
        for name in spec.inputs:
            x = inputs[name]
            want = (spec.nodes[name].size, *self.layout.extent[name])
            if x.dim() != 5 or tuple(x.shape[1:]) != want:
                raise ShapeError(f"input {name!r} has shape {tuple(x.shape)}, the network needs (batch, *{want}) "
                                 f"for output patch {self.layout.output_patch}")
            values[name] = x
        for node in self.order:
            group = spec.nodes[node]
            if group.type == "input":
                continue
            parts = [self._edge(e, values) for e in spec.incoming[node]]
            if any(spec.edges[e].type == "maxout" for e in spec.incoming[node]):
                y = parts[0]
                for p in parts[1:]:
                    y = torch.maximum(y, p)
            else:
                y = parts[0]
                for p in parts[1:]:
                    y = y + p
            if group.type == "transfer":
                y = y + self.bias[node].view(1, -1, 1, 1, 1)
                y = _transfer(group.function, group.function_args, y, self.training)
            values[node] = y
        return {n: values[n] for n in spec.outputs}

    def trims(self) -> dict[str, tuple[Triple, Triple]]:
        """Per edge, the voxels it drops at the start and at the end of each axis of its input node (the central
        part it reads)."""
        spec, layout = self.spec, self.layout
        found = {}
        for name, edge in spec.edges.items():
            need = spec.edge_input_extent(edge, layout.extent[edge.output], layout.sparsity)
            have = layout.extent[edge.input]
            lo = tuple((a - b) // 2 for a, b in zip(have, need))
            found[name] = (lo, tuple(a - b - c for a, b, c in zip(have, need, lo)))
        return found  # type: ignore[return-value]

    def _edge(self, name: str, values: dict[str, torch.Tensor]) -> torch.Tensor:
        edge = self.spec.edges[name]
        x = _trim(values[edge.input], *self._trims[name])
        dilation = self.layout.sparsity[edge.input]
        if edge.type == "conv":
            return F.conv3d(x, self.weight[name], dilation=dilation)
        if edge.type == "max_filter":
            return F.max_pool3d(x, edge.size, stride=1, dilation=dilation)
        if edge.type == "max_pool":
            return F.max_pool3d(x, edge.size, stride=edge.size)
        if edge.type == "dropout":
            return F.dropout(x, p=1.0 - edge.ratio, training=self.training) if edge.ratio < 1 else x
        if edge.type == "crop":
            return _trim(x, edge.offset, edge.offset)
        return x  # maxout: the node takes the maximum

    def znn_parameters(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The current kernels (ZNN layout) and biases as NumPy arrays."""
        kernels = {e: znn_kernel(w.detach().numpy()) for e, w in self.weight.items()}
        biases = {n: b.detach().numpy().copy() for n, b in self.bias.items()}
        return kernels, biases


def build_torch_net(net: Network, output_patch: Sequence[int], training: bool = False) -> TorchNet:
    """``net`` as a PyTorch module (same weights, same dtype) for inputs of the patch planned for
    ``output_patch``; ``training`` selects training behaviour (dropout active, forward_logistics identity)."""
    layout = net.spec.layout(output_patch)
    return TorchNet(net.spec, layout, net.kernels, net.biases, training)


def to_tensors(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """NumPy ``(maps, z, y, x)`` inputs -> batch-of-one tensors sharing memory where possible."""
    return {k: torch.from_numpy(np.ascontiguousarray(v))[None] for k, v in inputs.items()}
