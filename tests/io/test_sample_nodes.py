"""`[sampleN]` keys name the network's nodes, as ZNN's zsample.py reads them (``input = 1``, ``input-r = 2``);
numbered keys (``input1``, ``input2``, ...) still follow the network's node order; mistakes name the spec file,
the section and key, and list the network's nodes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from znn.errors import SpecFileError
from znn.io.netfile import parse_network
from znn.io.samples import load_sample
from znn.io.specfile import load_spec
from znn.io.volume import write_volume

# two inputs (`input`, `input-r`, as VD2D3D) and two outputs; 1x1x1 kernels keep it tiny
TWO_BY_TWO = """
nodes input
type input
size 1

nodes input-r
type input
size 1

edges a
type conv
size 1,1,1
input input
output output

edges b
type conv
size 1,1,1
input input-r
output output

edges c
type conv
size 1,1,1
input input-r
output boundary

nodes output
type transfer
function linear
size 2

nodes boundary
type transfer
function linear
size 2
"""
IMAGES = "[image1]\nfnames = a.tif\n[image2]\nfnames = b.tif\n[label1]\nfnames = l1.tif\n[label2]\nfnames = l2.tif\n"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        write_volume(tmp_path / f"{name}.tif", rng.integers(0, 255, (2, 6, 7), dtype=np.uint8))
    for name in ("l1", "l2", "m"):
        write_volume(tmp_path / f"{name}.tif", rng.integers(0, 3, (2, 6, 7), dtype=np.uint8))
    return tmp_path


def _load(folder: Path, sample: str, extra: str = "") -> tuple[object, Path]:
    path = folder / "data.spec"
    path.write_text(IMAGES + extra + "[sample1]\n" + sample)
    return load_sample(load_spec(path), 1, "boundary", np.float32, parse_network(TWO_BY_TWO)), path


def _raw(folder: Path, name: str) -> np.ndarray:
    from znn.io.volume import read_volume

    return read_volume(folder / f"{name}.tif")


def test_node_names_pick_the_volumes_whatever_their_order_in_the_file(folder):
    data, _ = _load(folder, "input-r = 1\nboundary = 1\ninput = 2\noutput = 2\n")
    np.testing.assert_array_equal(data.inputs[0][0], _raw(folder, "b"))  # node `input` <- [image2]
    np.testing.assert_array_equal(data.inputs[1][0], _raw(folder, "a"))  # node `input-r` <- [image1]
    np.testing.assert_array_equal(data.labels[0], _raw(folder, "l2"))  # outputs in network order: output, boundary
    np.testing.assert_array_equal(data.labels[1], _raw(folder, "l1"))


def test_numbered_keys_still_follow_the_network_order(folder):
    named, _ = _load(folder, "input = 1\ninput-r = 2\noutput = 1\nboundary = 2\n")
    numbered, _ = _load(folder, "input1 = 1\ninput2 = 2\noutput1 = 1\noutput2 = 2\n")
    for a, b in zip(named.inputs + named.labels, numbered.inputs + numbered.labels):
        np.testing.assert_array_equal(a, b)


def test_masks_by_output_node_name(folder):
    extra = "[mask1]\nfnames = m.tif\n"
    data, _ = _load(folder, "input = 1\ninput-r = 2\noutput = 1\nboundary = 2\nboundary_mask = 1\n", extra)
    assert data.voxel_masks[0] is None
    np.testing.assert_array_equal(data.voxel_masks[1], _raw(folder, "m") > 0)


def test_a_sample_without_outputs_is_for_inference(folder):
    data, _ = _load(folder, "input = 1\ninput-r = 2\n")
    assert len(data.inputs) == 2 and not data.has_outputs


@pytest.mark.parametrize("sample, words", [
    ("input = 1\n", r"data.spec:\d+: \[sample1\]: no key for network input node 'input-r'; the network's input "
                    r"nodes are input, input-r and its output nodes output, boundary"),
    ("input = 1\ninptu-r = 2\n", r"data.spec:\d+: \[sample1\] inptu-r: 'inptu-r' is no node of the network; "
                                 r"the network's input nodes are input, input-r"),
    ("input = 1\ninput-r = 2\ninput3 = 1\n", r"\[sample1\] input3: the network has 2 input node"),
    ("input = 1\ninput1 = 2\ninput-r = 2\n", r"\[sample1\] input1: names the same input node 'input' as "
                                             r"`input = 1` but with 2"),
    ("input = 1\ninput-r = 2\noutput = 1\n", r"\[sample1\]: no key for network output node 'boundary'"),
    ("input = 1\ninput-r = 7\n", r"\[sample1\] input-r: refers to \[image7\], which does not exist"),
    ("input = 1\ninput-r = 2\nboundary_mask = 1\n", r"\[sample1\] boundary_mask: a mask for an output without"),
])
def test_mistakes_name_the_file_section_key_and_nodes(folder, sample, words):
    with pytest.raises(SpecFileError, match=words):
        _load(folder, sample, "[mask1]\nfnames = m.tif\n")


def test_node_names_without_the_network_are_refused(folder):
    path = folder / "data.spec"
    path.write_text(IMAGES + "[sample1]\ninput = 1\ninput-r = 2\n")
    with pytest.raises(SpecFileError, match=r"\[sample1\] input-r: names a network node"):
        load_sample(load_spec(path), 1)
