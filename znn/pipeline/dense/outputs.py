"""The output side of dense inference: which transform, where each output goes, exports to h5 and tif."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from znn.errors import ConfigError
from znn.io.config import prefixed
from znn.ops.transform import OUTPUT_TRANSFORMS
from znn.pipeline.dense.volume import InferenceResult
from znn.spec import NetworkSpec

TRANSFORMS = ("auto", *OUTPUT_TRANSFORMS)


# ---------------------------------------------------------------------------------------------------- transforms
def resolve_transform(transform: str, spec: NetworkSpec, out_type: str = "boundary", cost: str = "auto") -> str:
    """``auto``: softmax for a softmax-trained net with several output maps, sigmoid for binomial cross-entropy (or
    one map), none for square loss or when the output node already applies a logistic function."""
    if transform not in TRANSFORMS:
        raise ConfigError(f"--transform {transform!r} is not valid; use one of {', '.join(TRANSFORMS)}")
    if transform != "auto":
        return transform
    if any(spec.nodes[n].function in ("logistics", "forward_logistics") and spec.nodes[n].type == "transfer"
           for n in spec.outputs):
        return "none"
    if cost == "auto":
        cost = "softmax_loss" if out_type == "boundary" else "binomial_cross_entropy"
    if cost == "square_loss":
        return "none"
    maps = min(spec.nodes[n].size for n in spec.outputs)
    return "softmax" if cost == "softmax_loss" and maps > 1 else "sigmoid"


# ---------------------------------------------------------------------------------------------------- outputs
def output_paths(prefix: str | Path, sample: int, fmt: str, outputs: Sequence[str]) -> dict[str, str]:
    """Where sample ``sample``'s outputs go for ``fmt`` (zarr, h5, tif): output node -> volume path."""
    base = prefixed(prefix, f"sample{sample}_output")  # output_prefix = outdir/ puts them in that folder
    if fmt == "zarr":
        return {n: f"{base}.zarr/{n}" for n in outputs}
    if fmt == "h5":
        return {n: f"{base}.h5:/{n}" for n in outputs}
    if fmt == "tif":
        if len(outputs) == 1:
            return {outputs[0]: f"{base}.tif"}
        return {n: f"{base}_{n}.tif" for n in outputs}
    raise ConfigError(f"output_format {fmt!r} is not valid; use zarr, h5 or tif")


def export_outputs(result: InferenceResult, targets: Mapping[str, str]) -> None:
    """Copy the zarr outputs into h5 or tif files (block by block, never the whole volume at once for h5)."""
    from znn.io.stores import export_volume

    for node, target in targets.items():
        export_volume(result.arrays[node], target, node)
