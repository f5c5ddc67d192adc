"""Table-driven: malformed .znn, .spec and .cfg files each raise a ZnnError subclass naming the line or key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from znn.errors import ConfigError, NetworkSpecError, SpecFileError, ZnnError
from znn.io.config import load_job
from znn.io.netfile import load_network
from znn.io.specfile import load_spec

GOOD_ZNN = """nodes input
type input
size 1

edges conv1
type conv
init xavier
size 1,3,3
stride 1,1,1
input input
output nl1

nodes nl1
type transfer
function rectify_linear
size 4

edges pool1
type max_filter
size 1,2,2
stride 1,2,2
input nl1
output np1

nodes np1
type sum
size 4

edges conv2
type conv
size 1,3,3
input np1
output output

nodes output
type transfer
function linear
size 2
"""


def znn_with(old: str, new: str) -> str:
    assert old in GOOD_ZNN, old
    return GOOD_ZNN.replace(old, new, 1)


GOOD_SPEC = """[image1]
fnames = raw.tif
pp_types = standard2D
is_auto_crop = yes

[label1]
fnames = labels.tif
pp_types = binary_class
is_auto_crop = yes
fmasks =

[sample1]
input = 1
output = 1
"""

GOOD_CFG = """[parameters]
fnet_spec = net.znn
fdata_spec = data.spec
num_threads = 0
dtype = float32
out_type = boundary
train_outsz = 1,10,10
train_range = 1-3,6
test_range = 4
train_conv_mode = fft
cost_fn = auto
eta = 0.01
momentum = 0.9
rebalance_mode = global
Max_iter = 10
"""

# (file kind, text, exception class, regex the message must match: the line or key at fault)
CASES = [
    # ---- .znn ----
    ("znn", "size 1\nnodes input\ntype input\n", NetworkSpecError, r"bad\.znn:1: .*before any block"),
    ("znn", znn_with("size 1,3,3\nstride 1,1,1", "size 1, 3, 3\nstride 1,1,1"), NetworkSpecError, r":8: .*two words"),
    ("znn", znn_with("type transfer\nfunction rectify_linear", "type transfr\nfunction rectify_linear"),
     NetworkSpecError, r":14: .*'transfr'.*did you mean 'transfer'"),
    ("znn", znn_with("type max_filter", "type maxfilter"), NetworkSpecError, r":19: .*did you mean 'max_filter'"),
    ("znn", znn_with("function rectify_linear", "function relu"), NetworkSpecError, r":15: .*function 'relu'"),
    ("znn", znn_with("init xavier", "init glorot"), NetworkSpecError, r":7: .*init 'glorot'"),
    ("znn", znn_with("size 4\n\nedges pool1", "sizes 4\n\nedges pool1"), NetworkSpecError,
     r":16: .*unknown key 'sizes'.*did you mean 'size'"),
    ("znn", znn_with("size 1,3,3\nstride", "size 1,3\nstride"), NetworkSpecError, r":8: .*z,y,x triple"),
    ("znn", znn_with("size 1,3,3\nstride", "size 1,0,3\nstride"), NetworkSpecError, r":8: .*positive"),
    ("znn", znn_with("size 4\n\nedges pool1", "size four\n\nedges pool1"), NetworkSpecError, r":16: .*positive integer"),
    ("znn", znn_with("output np1", "output npool1"), NetworkSpecError, r":23: .*'npool1' does not exist.*'np1'"),
    ("znn", znn_with("input np1", "input nowhere"), NetworkSpecError, r":32: .*'nowhere' does not exist"),
    ("znn", znn_with("nodes np1\ntype sum\nsize 4", "nodes np1\ntype sum\nsize 5"), NetworkSpecError,
     r":18: edges pool1: a max_filter edge is one-to-one.*4 maps.*5"),
    ("znn", znn_with("input np1\noutput output", "input np1\noutput nl1"), NetworkSpecError, r"cycle"),
    ("znn", znn_with("type input", "type sum"), NetworkSpecError, r"no input node group"),
    ("znn", znn_with("nodes np1", "nodes nl1"), NetworkSpecError, r":25: nodes 'nl1' is defined twice.*line 13"),
    ("znn", znn_with("type conv\ninit xavier", "type conv\ntype conv\ninit xavier"), NetworkSpecError,
     r":7: .*key 'type' repeated"),
    ("znn", znn_with("edges conv2\ntype conv\nsize 1,3,3\n", "edges conv2\ntype conv\n"), NetworkSpecError,
     r":29: edges conv2: missing key 'size'"),
    ("znn", znn_with("input input\noutput nl1", "output nl1"), NetworkSpecError, r"edges conv1: missing key 'input'"),
    ("znn", GOOD_ZNN + "\nnodes orphan\ntype sum\nsize 2\n", NetworkSpecError, r":40: .*'orphan' has no incoming"),
    ("znn", znn_with("type max_filter\nsize 1,2,2\nstride 1,2,2", "type max_pool\nsize 1,2,2\nstride 1,3,3"),
     NetworkSpecError, r":21: .*stride must equal size"),
    ("znn", znn_with("init xavier", "init uniform\ninit_args 1,2,3"), NetworkSpecError, r":8: .*uniform takes 0 to 2"),
    ("znn", GOOD_ZNN + "\nnodes extra\ntype input\nsize 1\nedges back\ntype conv\nsize 1,1,1\ninput output\noutput extra\n",
     NetworkSpecError, r"lead into input node group 'extra'"),
    # ---- .spec ----
    ("spec", GOOD_SPEC.replace("pp_types = standard2D", "pp_types = standard_2D"), SpecFileError,
     r":3: \[image1\] pp_types.*did you mean 'standard2D'"),
    ("spec", GOOD_SPEC.replace("[sample1]\ninput = 1", "[sample1]\ninput = 2"), SpecFileError,
     r":13: \[sample1\] input: refers to \[image2\]"),
    ("spec", GOOD_SPEC.replace("[sample1]\ninput = 1\noutput = 1", "[sample1]\noutput = 1"), SpecFileError,
     r":12: \[sample1\]: a sample needs `input"),
    ("spec", GOOD_SPEC.replace("fmasks =", "fmask = m.tif"), SpecFileError, r":10: \[label1\] fmask: unknown key.*'fmasks'"),
    ("spec", GOOD_SPEC.replace("[sample1]", "[sampel1]"), SpecFileError, r":12: \[sampel1\]: unknown section"),
    ("spec", GOOD_SPEC.replace("fnames = raw.tif", "fnames ="), SpecFileError, r":1: \[image1\]: needs `fnames"),
    ("spec", GOOD_SPEC.replace("pp_types = standard2D", "pp_types = standard2D, none"), SpecFileError,
     r":3: \[image1\] pp_types: 2 pp_types for 1 fnames"),
    ("spec", GOOD_SPEC.replace("input = 1", "input = one"), SpecFileError, r":13: \[sample1\] input: 'one' is not"),
    ("spec", "fnames = a.tif\n" + GOOD_SPEC, SpecFileError, r":1: a key before any \[section\]"),
    ("spec", GOOD_SPEC + "[image1]\nfnames = b.tif\n", SpecFileError, r":15: \[image1\] section appears twice"),
    ("spec", GOOD_SPEC.replace("is_auto_crop = yes", "is_auto_crop = maybe", 1), SpecFileError,
     r":4: \[image1\] is_auto_crop: 'maybe'"),
    # ---- .cfg ----
    ("cfg", GOOD_CFG.replace("eta = 0.01", "etta = 0.01"), ConfigError, r":12: \[parameters\] etta: unknown key.*'eta'"),
    ("cfg", GOOD_CFG.replace("train_outsz = 1,10,10", "train_outsz = 1,10"), ConfigError,
     r":7: \[parameters\] train_outsz: '1,10' is not valid; expected a z,y,x"),
    ("cfg", GOOD_CFG.replace("train_range = 1-3,6", "train_range = 3-1"), ConfigError,
     r":8: \[parameters\] train_range: .*increasing range"),
    ("cfg", GOOD_CFG.replace("train_range = 1-3,6", "train_range = 1-x"), ConfigError, r":8: .*train_range.*'1-x'"),
    ("cfg", GOOD_CFG.replace("train_conv_mode = fft", "train_conv_mode = ftt"), ConfigError,
     r":10: .*train_conv_mode.*did you mean 'fft'"),
    ("cfg", GOOD_CFG.replace("cost_fn = auto", "cost_fn = cross_entropy"), ConfigError, r":11: .*cost_fn"),
    ("cfg", GOOD_CFG.replace("momentum = 0.9", "momentum = 1.5"), ConfigError, r":13: .*momentum.*\[0, 1\)"),
    ("cfg", GOOD_CFG.replace("dtype = float32", "dtype = float16"), ConfigError, r":5: .*dtype.*float32 or float64"),
    ("cfg", GOOD_CFG.replace("[parameters]", "[params]"), ConfigError, r"no \[parameters\] section"),
    ("cfg", GOOD_CFG.replace("Max_iter = 10", "Max_iter = ten"), ConfigError, r":15: .*Max_iter.*'ten'"),
    ("cfg", GOOD_CFG + "eta = 0.1\n", ConfigError, r":16: \[parameters\] key 'eta' appears twice"),
    ("cfg", GOOD_CFG.replace("rebalance_mode = global", "rebalance_mode = local"), ConfigError,
     r":14: .*rebalance_mode.*none / global / patch"),
    ("cfg", GOOD_CFG + "this line has no equals sign\n", ConfigError, r":16: not an INI"),
]

LOADERS = {"znn": load_network, "spec": load_spec, "cfg": load_job}


def test_table_is_large_enough():
    assert len(CASES) >= 25
    assert {kind for kind, *_ in CASES} == {"znn", "spec", "cfg"}


@pytest.mark.parametrize("good, kind", [(GOOD_ZNN, "znn"), (GOOD_SPEC, "spec"), (GOOD_CFG, "cfg")])
def test_the_unbroken_files_load(tmp_path: Path, good: str, kind: str):
    path = tmp_path / f"good.{kind}"
    path.write_text(good)
    LOADERS[kind](path)


@pytest.mark.parametrize("kind, text, error, pattern", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_malformed_file(tmp_path: Path, kind: str, text: str, error: type, pattern: str):
    path = tmp_path / f"bad.{kind}"
    path.write_text(text)
    with pytest.raises(error, match=pattern) as info:
        LOADERS[kind](path)
    assert isinstance(info.value, ZnnError)
    assert str(path) in str(info.value)


def test_cli_reports_a_malformed_network_without_traceback(tmp_path: Path):
    path = tmp_path / "bad.znn"
    path.write_text(znn_with("function rectify_linear", "function relu"))
    result = subprocess.run([sys.executable, "-m", "znn.cli", "describe", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{path}:15" in result.stderr and "relu" in result.stderr


def test_cli_reports_a_missing_file_without_traceback(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "znn.cli", "describe", str(tmp_path / "none.znn")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "not found" in result.stderr
