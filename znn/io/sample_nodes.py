"""Which volumes of a ``[sampleN]`` feed which nodes of a network (ZNN's ``zsample.py`` convention).

ZNN reads ``config.getint(sample_section, node_name)`` for every input node (the image section) and every output
node (the label section, optional), so a sample names the network's nodes: ``input = 1`` and ``input-r = 2`` for
VD2D3D. This project also takes numbered keys: ``inputK``/``outputK`` (``input``/``output`` = 1) for the K-th
input/output node in the network file's order, ``maskK`` (``mask`` = 1) for the ``[maskN]`` of the K-th output;
and ``NODE_mask = N`` for the mask of output node ``NODE``. A key that is a node's name always means that node.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from znn.errors import SpecFileError
from znn.io.specfile import Sample, SampleSpec, VolumeSet
from znn.spec import NetworkSpec

__all__ = ["bind_sample"]

_NUMBERED = re.compile(r"^(input|output|mask)(\d*)$")
_MASK_SUFFIX = "_mask"
_SECTION_KIND = {"input": "image", "output": "label", "mask": "mask"}


@dataclass(frozen=True)
class _Slot:
    """What one key of a sample fills: the ``index``-th network input, output or output mask."""

    role: str  # input, output or mask
    index: int


def bind_sample(spec: SampleSpec, sample_id: int, network: NetworkSpec | None) -> Sample:
    """``[sample<sample_id>]`` with its inputs, outputs and masks in the order of ``network``'s nodes.

    Without a network only the numbered keys are understood (a key naming a node is an error saying so). Raises
    SpecFileError naming the spec file, section and key: a key that is no node of the network (listing its
    nodes), an input node without a key, some but not all outputs given, two keys for one node, or a reference
    to a missing section."""
    sample = spec.sample(sample_id)
    if network is None:
        named = [k for k in sample.refs if not _NUMBERED.match(k)]
        if named:
            raise SpecFileError(f"{sample.key_where[named[0]]}: names a network node; read this sample together "
                                "with its network (the job's fnet_spec)")
        return sample
    inputs, outputs = network.inputs, network.outputs
    filled: dict[_Slot, tuple[str, int]] = {}
    for key, ref in sample.refs.items():
        slot = _slot(sample, key, inputs, outputs)
        earlier = filled.get(slot)
        if earlier is not None and earlier[1] != ref:
            raise SpecFileError(f"{sample.key_where[key]}: names the same {_what(slot, inputs, outputs)} as "
                                f"`{earlier[0]} = {earlier[1]}` but with {ref}; keep one of the two keys")
        filled[slot] = (key, ref)
    labels = _outputs(sample, filled, inputs, outputs)
    masks = [_ref(filled, _Slot("mask", k)) for k in range(len(labels))]  # outputs are all given or none
    bound = Sample(sample.id, _inputs(sample, filled, inputs, outputs), labels, masks, sample.where, sample.refs,
                   sample.key_where)
    _check_sections(spec, sample, filled)
    return bound


def _slot(sample: Sample, key: str, inputs: Sequence[str], outputs: Sequence[str]) -> _Slot:
    if key in inputs:
        return _Slot("input", inputs.index(key))
    if key in outputs:
        return _Slot("output", outputs.index(key))
    if key.endswith(_MASK_SUFFIX) and key[: -len(_MASK_SUFFIX)] in outputs:
        return _Slot("mask", outputs.index(key[: -len(_MASK_SUFFIX)]))
    numbered = _NUMBERED.match(key)
    if numbered is None:
        raise SpecFileError(f"{sample.key_where[key]}: {key!r} is no node of the network; {_nodes(inputs, outputs)}"
                            " (a sample has one key per input node, `NODE = N` naming [imageN], and per output "
                            "node naming [labelN])")
    role, index = numbered.group(1), int(numbered.group(2) or 1) - 1
    count = len(inputs) if role == "input" else len(outputs)
    if not 0 <= index < count:
        raise SpecFileError(f"{sample.key_where[key]}: the network has {count} {role if role != 'mask' else 'output'}"
                            f" node(s); {_nodes(inputs, outputs)}; name the node instead of numbering it")
    return _Slot(role, index)


def _inputs(sample: Sample, filled: dict[_Slot, tuple[str, int]], inputs: Sequence[str],
            outputs: Sequence[str]) -> list[int]:
    missing = [n for k, n in enumerate(inputs) if _Slot("input", k) not in filled]
    if missing:
        raise SpecFileError(f"{sample.where}: no key for network input node {missing[0]!r}; {_nodes(inputs, outputs)};"
                            f" add `{missing[0]} = N` naming the [imageN] section that feeds it")
    return [filled[_Slot("input", k)][1] for k in range(len(inputs))]


def _outputs(sample: Sample, filled: dict[_Slot, tuple[str, int]], inputs: Sequence[str],
             outputs: Sequence[str]) -> list[int]:
    given = [k for k in range(len(outputs)) if _Slot("output", k) in filled]
    if given and len(given) != len(outputs):
        missing = next(n for k, n in enumerate(outputs) if k not in given)
        raise SpecFileError(f"{sample.where}: no key for network output node {missing!r} while other outputs have "
                            f"labels; {_nodes(inputs, outputs)}; add `{missing} = N` naming a [labelN] section, "
                            "or give no output (a sample for inference only)")
    masked = [key for slot, (key, _) in filled.items() if slot.role == "mask" and slot.index not in given]
    if masked:
        raise SpecFileError(f"{sample.key_where[masked[0]]}: a mask for an output without a label; give the "
                            "output's [labelN] too, or drop the mask")
    return [filled[_Slot("output", k)][1] for k in given]


def _ref(filled: dict[_Slot, tuple[str, int]], slot: _Slot) -> int | None:
    found = filled.get(slot)
    return None if found is None else found[1]


def _check_sections(spec: SampleSpec, sample: Sample, filled: dict[_Slot, tuple[str, int]]) -> None:
    tables: dict[str, dict[int, VolumeSet]] = {"input": spec.images, "output": spec.labels, "mask": spec.masks}
    for slot, (key, ref) in filled.items():
        table, kind = tables[slot.role], _SECTION_KIND[slot.role]
        if ref not in table:
            have = ", ".join(f"[{kind}{i}]" for i in sorted(table)) or "none"
            raise SpecFileError(f"{sample.key_where[key]}: refers to [{kind}{ref}], which does not exist "
                                f"(defined: {have})")


def _what(slot: _Slot, inputs: Sequence[str], outputs: Sequence[str]) -> str:
    if slot.role == "input":
        return f"input node {inputs[slot.index]!r}"
    return f"{'mask of ' if slot.role == 'mask' else ''}output node {outputs[slot.index]!r}"


def _nodes(inputs: Sequence[str], outputs: Sequence[str]) -> str:
    return f"the network's input nodes are {', '.join(inputs)} and its output nodes {', '.join(outputs)}"
