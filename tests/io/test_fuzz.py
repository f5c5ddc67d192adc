"""Property-based fuzzing of the parsers and loaders: every input either loads or raises a ZnnError subclass.

- text: the `.znn`, `.spec` and `.cfg` parsers on random text and on mutations of valid files (lines deleted,
  duplicated or moved, keys and values garbled, characters inserted, truncation, unicode, huge and negative
  numbers), and their file loaders on random bytes;
- samples: mutated `.spec` files over real tif/h5/zarr volumes, loaded with ``load_sample``;
- volumes: valid tif, h5 and zarr files truncated, bit-flipped, with bytes inserted or deleted, chunk files
  deleted and zarr metadata garbled, read with ``read_volume``, ``volume_shape_dtype`` and ``open_volume``;
- checkpoints: a checkpoint written by ``save_checkpoint``, corrupted as bytes or restructured with h5py
  (groups deleted, datasets of the wrong dtype, shape or kind), loaded with and without its spec;
- files that are not what their name claims (text named .h5, PNG named .tif, h5 named .zarr, empty files), and
  formats that could run code on loading (pickle codecs) refused without running it.

Hypothesis is derandomized and keeps no example database, so every run tries the same inputs. Each test counts the
inputs it tried and prints the count (``pytest -s``); ``ZNN_FUZZ_SCALE=10`` runs ten times as many, and
``ZNN_FUZZ_NO_SHRINK=1`` reports a failing input without minimising it (faster when hunting at a large scale).
"""

from __future__ import annotations

import ast
import copy
import json
import logging
import os
import pickle
import re
import shutil
from collections import Counter
from collections.abc import Callable
from itertools import count
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import event as _event
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from zarr.storage import LocalStore

from tests.io.test_malformed import GOOD_CFG, GOOD_SPEC, GOOD_ZNN
from tests.shared import REFERENCE, ROOT
from znn.errors import ZnnError
from znn.io.checkpoint import load_checkpoint, load_statistics, save_checkpoint
from znn.io.config import load_job, parse_job
from znn.io.netfile import load_network, parse_network
from znn.io.samples import load_sample
from znn.io.specfile import load_spec, parse_spec
from znn.io.volume import open_volume, read_volume, volume_shape_dtype, write_volume
from znn.network import Network

SCALE = float(os.environ.get("ZNN_FUZZ_SCALE", "1"))
RUNS: Counter[str] = Counter()
OUTCOMES: Counter[str] = Counter()  # of the calls since the last ran(): "loads" or the ZnnError subclass
PHASES = [Phase.explicit, Phase.generate] if os.environ.get("ZNN_FUZZ_NO_SHRINK") else list(Phase)
_names = count()
# Volumes whose (possibly corrupted) metadata claims more voxels or chunks than this are checked through their
# metadata and lazy opening only: reading them whole would test the machine's memory and time, not the reader.
MAX_READ_VOXELS, MAX_READ_BLOCKS = 10**6, 1000


@pytest.fixture(autouse=True)
def _quiet_tifffile() -> Any:
    """tifffile logs every damaged tag it skips; thousands of those would only bury a real failure."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


def fuzz(examples: int) -> settings:
    """The settings of every fuzz test: ``examples`` inputs (times ZNN_FUZZ_SCALE), the same ones on every run."""
    return settings(max_examples=max(1, int(examples * SCALE)), derandomize=True, database=None, deadline=None,
                    print_blob=False, phases=PHASES,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


def ran(name: str, examples: int) -> None:
    """Print how many inputs ``name`` tried and check hypothesis did not stop far short of ``examples``."""
    print(f"\n{name}: {RUNS[name]} generated inputs; calls: {dict(OUTCOMES.most_common())}")
    OUTCOMES.clear()
    assert RUNS[name] >= min(examples, int(examples * SCALE)) // 2, f"{name} ran only {RUNS[name]} inputs"


def loads_or_znn_error(call: Callable[[], Any], *names: str) -> ZnnError | None:
    """Run ``call``; a ZnnError must name one of ``names`` (the file at fault); any other exception escapes."""
    try:
        call()
    except ZnnError as exc:
        message = str(exc)
        assert any(name in message for name in names), f"{type(exc).__name__} names none of {names}: {message}"
        event(type(exc).__name__)
        return exc
    event("loads")
    return None


def event(text: str) -> None:
    """Tally an outcome for ran() and ``--hypothesis-show-statistics``."""
    OUTCOMES[text] += 1
    if currently_in_test_context():
        _event(text)


def unique(folder: Path, suffix: str) -> Path:
    return folder / f"fuzz{next(_names)}{suffix}"


# ---- text mutations ----------------------------------------------------------------------------------------------

NUMBERS = ["0", "-1", "-3", "1", "2", "1,1,1", "0,0,0", "-1,3,3", "1,-3,3", "1,3", "1,3,3,3", "1,,3", ",", "", " ",
           "nan", "inf", "-inf", "1e999", "-1e999", "1e-999", "0.5", "-0.0", "9" * 30, "-" + "9" * 30, "9" * 5000,
           f"{2**63},1,1", f"1,{2**64},1", "1_0", "0x10", "1e3", "٣", "１,２,３", "\u0663,\u0663,\u0663", "1-3,6",
           "3-1", "1-99999999999", "-", "--1", "1--3", "auto", "yes", "no", "maybe"]
WORDS = ["input", "output", "conv", "transfer", "sum", "max_filter", "max_pool", "dropout", "crop", "maxout",
         "linear", "rectify_linear", "tanh", "xavier", "uniform", "nodes", "edges", "type", "size", "stride",
         "[", "]", "[image1]", "[sample1]", "[parameters]", "=", ":", "#", ";", "%(x)s", "${x}", "\\", "'", '"',
         "\x00", "\ufeff", "\u202e", "\u2028", "\x85", "\x1c", "\r", "\t", "\x0b", "é", "😀", "ß" * 3,
         "raw.tif", "raw.tif[0:2]", "raw.tif[2:1]", "raw.tif[x:]", "raw.tif[-1:]", "raw.h5:/main", "raw.h5:/nope",
         "raw.zarr", "raw.zarr/a/b", "/", ".", "..", "../raw.tif", "nope.tif", "raw", "raw.png"]
VALUES = st.one_of(st.sampled_from(NUMBERS + WORDS), st.text(max_size=12),
                   st.integers().map(str), st.floats().map(repr),
                   st.lists(st.integers(-5, 10**12).map(str), min_size=1, max_size=4).map(",".join))
_PAIR = re.compile(r"^(\s*[^\s=:]*)(\s*[=:]\s*|\s+)(.*)$")


def _set_key(line: str, key: str) -> str:
    m = _PAIR.match(line)
    return key + m.group(2) + m.group(3) if m else f"{key} {line}"


def _set_value(line: str, value: str) -> str:
    m = _PAIR.match(line)
    return m.group(1) + m.group(2) + value if m else f"{line} {value}"


@st.composite
def mutated(draw: st.DrawFn, bases: list[str], keys: list[str]) -> str:
    """A valid file from ``bases`` after one to six random edits."""
    lines = draw(st.sampled_from(bases)).splitlines()
    words = st.one_of(st.sampled_from(keys + WORDS), st.text(max_size=10))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["delete", "duplicate", "move", "key", "value", "value", "line", "chars",
                                   "cut", "pair"]))
        if not lines:
            lines.append("")
        i = draw(st.integers(0, len(lines) - 1))
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(draw(st.integers(0, len(lines))), lines[i])
        elif op == "move":
            lines.insert(draw(st.integers(0, len(lines) - 1)), lines.pop(i))
        elif op == "key":
            lines[i] = _set_key(lines[i], draw(words))
        elif op == "value":
            lines[i] = _set_value(lines[i], draw(VALUES))
        elif op == "line":
            lines.insert(i, draw(st.one_of(st.text(max_size=30), words)))
        elif op == "chars":
            at = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:at] + draw(st.text(min_size=1, max_size=4)) + lines[i][at:]
        elif op == "cut":
            at = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:at] + lines[i][at + draw(st.integers(1, 8)):]
        else:  # a known key with an odd value, in either file syntax
            sep = draw(st.sampled_from([" ", " = ", ":", "="]))
            lines.insert(i, f"{draw(st.sampled_from(keys))}{sep}{draw(VALUES)}")
    text = "\n".join(lines) + draw(st.sampled_from(["", "\n", "\r\n"]))
    if draw(st.integers(0, 4)) == 0:
        text = text[: draw(st.integers(0, len(text)))]
    return text


def _reference(pattern: str) -> list[str]:
    """Texts of the reference files matching ``pattern`` (none when ../shared is absent)."""
    return [p.read_text() for p in sorted(REFERENCE.glob(pattern))] if REFERENCE.exists() else []


ZNN_KEYS = ["nodes", "edges", "type", "size", "stride", "function", "function_args", "dense", "init", "init_args",
            "input", "output", "ratio", "offset", "repeat", "fft", "eta", "momentum", "weight_decay", "load"]
EXTRA_ZNN = """nodes input
type input
size 2

edges conv1
type conv
init uniform
init_args -0.1,0.1
size 1,3,3
input input
output nl1

nodes nl1
type transfer
function tanh
function_args 1.7159,0.6666
size 3

edges drop
type dropout
ratio 0.5
input nl1
output d1

nodes d1
type sum
size 3

edges crop
type crop
offset 0,1,1
input d1
output c1

nodes c1
type sum
dense 1
size 3

edges pool
type max_pool
size 1,2,2
input c1
output p1

nodes p1
type sum
size 3

edges conv2
type conv
init gaussian
size 1,1,1
input p1
output output

nodes output
type transfer
function logistics
init constant
init_args 0.1
size 1
"""
ZNN_BASES = [GOOD_ZNN, EXTRA_ZNN, *_reference("networks/*.znn"), *_reference("benchmark/*.znn")]
SPEC_KEYS = ["fnames", "pp_types", "is_auto_crop", "fmasks", "input", "output", "mask", "input1", "input2",
             "output1", "mask1", "[image1]", "[image2]", "[label1]", "[mask1]", "[sample1]", "[sample2]"]
EXTRA_SPEC = """[image1]
fnames = raw.tif
  raw.h5:/main
pp_types = standard2D, symetric_rescale
is_auto_crop = yes

[image2]
fnames = raw.zarr[0:4]
pp_types = standard3D

[label1]
fnames = labels.h5
pp_types = auto
fmasks = mask.tif

[label2]
fnames = labels.tif
pp_types = affinity

[mask1]
fnames = mask.tif

[sample1]
input1 = 1
input2 = 2
output1 = 1
output2 = 2
mask1 = 1

[sample2]
input = 2
"""
SPEC_BASES = [GOOD_SPEC, EXTRA_SPEC, *_reference("*.spec")]
CFG_KEYS = ["fnet_spec", "fdata_spec", "num_threads", "dtype", "out_type", "train_outsz", "forward_outsz",
            "train_range", "test_range", "forward_range", "train_conv_mode", "cost_fn", "is_malis", "eta",
            "anneal_factor", "Num_iter_per_annealing", "momentum", "rebalance_mode", "is_rebalance", "Max_iter",
            "train_net_prefix", "forward_net", "seed", "output_format", "scheduler", "[parameters]"]
CFG_BASES = [GOOD_CFG, *_reference("*.cfg")]

PARSERS: dict[str, tuple[Callable[[str, str], Any], list[str], list[str]]] = {
    "znn": (parse_network, ZNN_BASES, ZNN_KEYS),
    "spec": (parse_spec, SPEC_BASES, SPEC_KEYS),
    "cfg": (parse_job, CFG_BASES, CFG_KEYS),
}
LOADERS: dict[str, Callable[[Path], Any]] = {"znn": load_network, "spec": load_spec, "cfg": load_job}


def test_the_bases_parse() -> None:
    """The mutations start from valid files."""
    for kind, (parse, bases, _) in PARSERS.items():
        for text in bases:
            parse(text, f"base.{kind}")


@pytest.mark.parametrize("kind", PARSERS)
def test_parsers_on_mutated_files(kind: str) -> None:
    parse, bases, keys = PARSERS[kind]
    name, examples = f"mutated .{kind}", 1200

    @fuzz(examples)
    @given(text=mutated(bases, keys))
    def check(text: str) -> None:
        RUNS[name] += 1
        loads_or_znn_error(lambda: parse(text, f"fuzz.{kind}"), f"fuzz.{kind}")

    check()
    ran(name, examples)


_LINES = st.lists(st.one_of(st.text(max_size=20), st.builds("{} {}".format, st.sampled_from(ZNN_KEYS), VALUES),
                            st.builds("{} = {}".format, st.sampled_from(SPEC_KEYS + CFG_KEYS), VALUES),
                            st.sampled_from(["[parameters]", "[image1]", "[label1]", "[sample1]", "nodes a",
                                             "edges e", "[", "[]", "[image٣]"])), max_size=25)


@pytest.mark.parametrize("kind", PARSERS)
def test_parsers_on_random_text(kind: str) -> None:
    parse = PARSERS[kind][0]
    name, examples = f"random .{kind}", 500

    @fuzz(examples)
    @given(text=st.one_of(st.text(), _LINES.map("\n".join)))
    def check(text: str) -> None:
        RUNS[name] += 1
        loads_or_znn_error(lambda: parse(text, f"fuzz.{kind}"), f"fuzz.{kind}")

    check()
    ran(name, examples)


def test_file_loaders_on_random_bytes(tmp_path: Path) -> None:
    """The `.znn`, `.spec` and `.cfg` loaders on bytes: invalid UTF-8, NULs, BOMs, UTF-16, binary junk."""
    name, examples = "bytes .znn/.spec/.cfg", 600
    texts = st.one_of(*(mutated(PARSERS[k][1], PARSERS[k][2]) for k in PARSERS))

    @st.composite
    def contents(draw: st.DrawFn) -> bytes:
        raw = draw(texts).encode(draw(st.sampled_from(["utf-8", "utf-16", "utf-8-sig", "latin-1"])),
                                 errors="replace")
        for _ in range(draw(st.integers(0, 3))):
            at = draw(st.integers(0, len(raw)))
            raw = raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]
        return draw(st.one_of(st.just(raw), st.binary(max_size=200)))

    @fuzz(examples)
    @given(kind=st.sampled_from(sorted(LOADERS)), data=contents())
    def check(kind: str, data: bytes) -> None:
        RUNS[name] += 1
        path = unique(tmp_path, f".{kind}")
        path.write_bytes(data)
        loads_or_znn_error(lambda: LOADERS[kind](path), path.name)
        path.unlink()

    check()
    ran(name, examples)


# ---- samples: mutated .spec files over real volumes ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """raw and labels volumes in tif, h5 and zarr, and a mask, as the .spec bases name them."""
    folder = tmp_path_factory.mktemp("samples")
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 255, (4, 12, 12), dtype=np.uint8)
    labels = rng.integers(0, 3, (4, 12, 12)).astype(np.uint32)
    for name in ("raw.tif", "raw.h5", "raw.zarr"):
        write_volume(folder / name, raw)
    write_volume(folder / "labels.tif", (labels > 0).astype(np.uint8) * 255)
    write_volume(folder / "labels.h5", labels)
    write_volume(folder / "mask.tif", (rng.random((4, 12, 12)) > 0.1).astype(np.uint8))
    return folder


def test_spec_bases_load_their_samples(sample_dir: Path) -> None:
    for text in (GOOD_SPEC, EXTRA_SPEC):
        path = unique(sample_dir, ".spec")
        path.write_text(text)
        spec = load_spec(path)
        for sample in spec.samples:
            load_sample(spec, sample)


def test_load_sample_on_mutated_specs(sample_dir: Path) -> None:
    name, examples = "mutated .spec + load_sample", 300
    volumes = [p.name for p in sample_dir.iterdir()]

    @fuzz(examples)
    @given(text=mutated([GOOD_SPEC, EXTRA_SPEC], SPEC_KEYS), out_type=st.sampled_from(["boundary", "affinity"]))
    def check(text: str, out_type: str) -> None:
        RUNS[name] += 1
        path = unique(sample_dir, ".spec")
        path.write_text(text, errors="surrogatepass")

        def load() -> None:
            spec = load_spec(path)
            for sample in sorted(spec.samples)[:2]:
                load_sample(spec, sample, out_type)

        loads_or_znn_error(load, path.name, *volumes)
        path.unlink()

    check()
    ran(name, examples)


# ---- binary corruption of volumes ---------------------------------------------------------------------------------


@st.composite
def corrupted(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with up to four byte edits (most near the start, where the headers are) and maybe truncated."""
    raw = bytearray(data)
    offsets = st.one_of(st.integers(0, 1023), st.integers(0, 1 << 20))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(offsets) % (len(raw) + 1)
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "zero"]))
        if op == "flip" and at < len(raw):
            raw[at] ^= draw(st.integers(1, 255))
        elif op == "set":
            raw[at:at + 8] = draw(st.binary(min_size=1, max_size=8).map(lambda b: b.ljust(8, b"\0")))
        elif op == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del raw[at:at + draw(st.integers(1, 64))]
        elif op == "zero":
            n = draw(st.integers(1, 256))
            raw[at:at + n] = bytes(len(raw[at:at + n]))
    if draw(st.integers(0, 2)) == 0:
        del raw[draw(st.integers(0, len(raw))):]
    return bytes(raw)


def read_everything(path: str | Path, *names: str) -> None:
    """Every way to read a volume: metadata, lazy open, whole read and compute. Each loads or raises ZnnError."""
    names = names or (Path(str(path)).name,)
    lazy: list[Any] = []
    loads_or_znn_error(lambda: volume_shape_dtype(path), *names)
    loads_or_znn_error(lambda: lazy.append(open_volume(path)), *names)
    if lazy and (int(np.prod(lazy[0].shape, dtype=object)) > MAX_READ_VOXELS or lazy[0].npartitions > MAX_READ_BLOCKS):
        event("claims a huge shape or chunk count: metadata only")
        return
    loads_or_znn_error(lambda: read_volume(path), *names)
    loads_or_znn_error(lambda: open_volume(path).compute(scheduler="sync"), *names)


def _tif_bytes(folder: Path) -> list[tuple[str, bytes]]:
    data = np.arange(2 * 16 * 16, dtype=np.uint16).reshape(2, 16, 16)
    write_volume(folder / "plain.tif", data)
    write_volume(folder / "plane.tif", data[0].astype(np.float32))
    tifffile.imwrite(folder / "zlib.tif", data, photometric="minisblack", compression="zlib")
    tifffile.imwrite(folder / "tiled.tif", data, photometric="minisblack", tile=(16, 16))
    return [(name, (folder / name).read_bytes()) for name in ("plain.tif", "plane.tif", "zlib.tif", "tiled.tif")]


def _h5_bytes(folder: Path) -> list[tuple[str, bytes]]:
    data = np.arange(4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
    write_volume(folder / "plain.h5", data.astype(np.uint8))
    write_volume(folder / "gzip.h5", data, chunks=(2, 4, 4), compression="gzip")
    write_volume(folder / "lzf.h5", data, chunks=(1, 8, 8), compression="lzf")
    with h5py.File(folder / "groups.h5", "w") as f:
        f["a/b"] = data.astype(np.int16)
        f["c"] = data
    return [(name, (folder / name).read_bytes()) for name in ("plain.h5", "gzip.h5", "lzf.h5", "groups.h5")]


@pytest.mark.parametrize("fmt", ["tif", "h5"])
def test_corrupted_volume_files(tmp_path: Path, fmt: str) -> None:
    name, examples = f"corrupted .{fmt}", 600
    originals = (_tif_bytes if fmt == "tif" else _h5_bytes)(tmp_path)
    for original, _ in originals:  # the originals read
        read_everything(tmp_path / original)

    @fuzz(examples)
    @given(data=st.data(), which=st.integers(0, len(originals) - 1))
    def check(data: st.DataObject, which: int) -> None:
        RUNS[name] += 1
        original, content = originals[which]
        path = unique(tmp_path, f".{fmt}")
        path.write_bytes(data.draw(corrupted(content)))
        suffix = ":/a/b" if original == "groups.h5" else ""
        read_everything(f"{path}{suffix}", path.name)
        path.unlink()

    check()
    ran(name, examples)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=6)
ODD_JSON = st.sampled_from([-1, 0, 2**63, 2**64 + 1, 1e300, [], [0], [-1, 8, 8], [0, 0, 0], [2, 4, 4], [1, 1, 1, 1, 1],
                            [2**40, 2**40, 2**40], "float128", "|O", "<U4", "object", "|V8", "<f4", "uint8", "bool",
                            "complex64", "NaN", "Infinity", {"id": "pickle"}, {"name": "numcodecs.pickle"},
                            [{"id": "pickle"}], {"name": "bytes"}, {"name": "zstd"}, {"id": "zstd", "level": 99},
                            {"name": "regular", "configuration": {"chunk_shape": [0, 0, 0]}}, "F", "C", "array",
                            "group", 2, 3, 4, None, {}, ""]).map(copy.deepcopy)  # edits may go into them


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into a JSON document (the root excluded)."""
    out: list[tuple[Any, ...]] = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        out.append(prefix + (key,))
        out += _paths(value, prefix + (key,))
    return out


@st.composite
def garbled_json(draw: st.DrawFn, raw: bytes) -> bytes:
    """Zarr metadata with values replaced, keys deleted, or the text itself corrupted."""
    doc = json.loads(raw)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) or not isinstance(parent, dict):
            parent[path[-1]] = draw(st.one_of(ODD_JSON, JSON))
        else:
            del parent[path[-1]]
    text = json.dumps(doc).encode()
    return draw(st.one_of(st.just(text), corrupted(text)))


def _zarr_trees(folder: Path) -> list[tuple[str, dict[str, bytes]]]:
    data = np.arange(4 * 8 * 8, dtype=np.int32).reshape(4, 8, 8)
    write_volume(folder / "v3.zarr", data, chunks=(2, 4, 4))
    write_volume(folder / "nested.zarr/g/a", data.astype(np.float64), chunks=(4, 8, 8))
    zarr.create_array(str(folder / "v2.zarr"), data=data.astype(np.uint16), chunks=(2, 8, 8), zarr_format=2)
    zarr.create_array(str(folder / "sharded.zarr"), data=data, chunks=(1, 4, 4), shards=(2, 8, 8))
    trees = []
    for name in ("v3.zarr", "nested.zarr", "v2.zarr", "sharded.zarr"):
        root = folder / name
        trees.append((name, {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}))
    return trees


@st.composite
def corrupted_tree(draw: st.DrawFn, files: dict[str, bytes]) -> tuple[dict[str, bytes], list[str]]:
    """A zarr store's files with some deleted, corrupted, garbled (metadata) or added; and files to make folders."""
    files = dict(files)
    folders: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(files) or ["zarr.json"]))
        op = draw(st.sampled_from(["delete", "bytes", "json", "json", "add", "folder"]))
        if op == "delete":
            files.pop(key, None)
        elif op == "bytes" and key in files:
            files[key] = draw(corrupted(files[key]))
        elif op == "json" and key in files and Path(key).name in ("zarr.json", ".zarray", ".zgroup", ".zattrs"):
            try:
                files[key] = draw(garbled_json(files[key]))
            except ValueError:  # already corrupted by an earlier edit
                files[key] = draw(corrupted(files[key]))
        elif op == "add":
            extra = draw(st.sampled_from(["zarr.json", ".zarray", ".zgroup", "c/9/9/9", "9.9.9", "c/0/0/0/0",
                                          "g/zarr.json", "c/0", "0.0"]))
            files[extra] = draw(st.one_of(st.binary(max_size=64), st.sampled_from(list(files.values()) or [b""])))
        elif op == "folder":  # a metadata or chunk file replaced by a directory
            files.pop(key, None)
            folders.append(key)
    return files, folders


@pytest.mark.filterwarnings("ignore::zarr.errors.ZarrUserWarning")  # "not recognized as a component": the damage
def test_corrupted_zarr_stores(tmp_path: Path) -> None:
    name, examples = "corrupted .zarr", 400
    trees = _zarr_trees(tmp_path)
    for original, _ in trees:
        read_everything(tmp_path / original)

    @fuzz(examples)
    @given(data=st.data(), which=st.integers(0, len(trees) - 1))
    def check(data: st.DataObject, which: int) -> None:
        RUNS[name] += 1
        original, files = trees[which]
        store = unique(tmp_path, ".zarr")
        contents, folders = data.draw(corrupted_tree(files))
        store.mkdir()
        for rel, content in [*contents.items(), *((rel, None) for rel in folders)]:
            try:  # a file where another edit put a folder (or the other way round) is skipped
                (store / rel).parent.mkdir(parents=True, exist_ok=True)
                (store / rel).mkdir() if content is None else (store / rel).write_bytes(content)
            except OSError:
                event("edit skipped")
        read_everything(store, store.name)
        shutil.rmtree(store)

    check()
    ran(name, examples)


# ---- checkpoints --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    spec = parse_network(EXTRA_ZNN)
    path = tmp_path_factory.mktemp("checkpoint") / "net.h5"
    save_checkpoint(path, Network.initialise(spec, seed=1), {"train/it": np.arange(3), "train/err": np.ones(3)})
    load_checkpoint(path, spec)
    return path, spec


def load_every_way(path: Path, spec: Any) -> None:
    loads_or_znn_error(lambda: load_checkpoint(path), path.name)
    loads_or_znn_error(lambda: load_checkpoint(path, spec), path.name)
    loads_or_znn_error(lambda: load_statistics(path), path.name)


def test_corrupted_checkpoint_bytes(tmp_path: Path, checkpoint: tuple[Path, Any]) -> None:
    name, examples = "corrupted checkpoint bytes", 500
    original, spec = checkpoint
    content = original.read_bytes()

    @fuzz(examples)
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        RUNS[name] += 1
        path = unique(tmp_path, ".h5")
        path.write_bytes(data.draw(corrupted(content)))
        load_every_way(path, spec)
        path.unlink()

    check()
    ran(name, examples)


def _vlen(*rows: np.ndarray) -> np.ndarray:
    """An HDF5 variable-length (object) array holding ``rows``."""
    out = np.empty(len(rows), dtype=h5py.vlen_dtype(np.int64))
    out[:] = list(rows)
    return out


WRONG_DATA = st.sampled_from([
    "conv", "", "x" * 300, "1,3,3", "-1", "nan", b"\xff\xfe", "node", "edge", "nodes", "a b", "a\nnodes b",
    np.float32(1.5), np.int64(-3), np.uint8(7), True, np.zeros(0), np.zeros((0, 3)), np.arange(3), np.arange(5),
    np.ones((2, 2)), np.ones((1, 2, 1, 3, 3), np.float64), np.ones((1, 2, 1, 3, 3), np.complex64),
    np.ones(3, bool), np.array([b"ab", b"cd"]), np.array([1.5, np.nan, np.inf]), np.array([2**62, -(2**62)]),
    np.ones((3, 2), [("a", "i4"), ("b", "f4")]), np.array(["x", "yy"], dtype=h5py.string_dtype()),
    _vlen(np.arange(2), np.arange(3)), np.void(b"\x00\x01"),
])


@st.composite
def restructure(draw: st.DrawFn, names: list[str]) -> list[tuple[str, str, Any]]:
    """Edits of a checkpoint's HDF5 structure: (operation, object name, value)."""
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        target = draw(st.sampled_from(names))
        op = draw(st.sampled_from(["delete", "replace", "replace", "replace", "group", "softlink", "extlink",
                                   "add_group"]))
        ops.append((op, target, draw(WRONG_DATA) if op in ("replace", "add_group") else None))
    return ops


def _apply(f: h5py.File, op: str, target: str, value: Any) -> None:
    if target not in f and op != "add_group":
        return
    if op == "add_group":
        group = f.require_group(f"processing/znn/train/network/{target.rsplit('/', 1)[-1]}x")
        group["group_type"] = value
        return
    del f[target]
    if op == "replace":
        f[target] = value
    elif op == "group":
        f.create_group(target)
    elif op == "softlink":
        f[target] = h5py.SoftLink("/nowhere")
    elif op == "extlink":
        f[target] = h5py.ExternalLink("missing.h5", "/x")


def test_restructured_checkpoints(tmp_path: Path, checkpoint: tuple[Path, Any]) -> None:
    """Groups and datasets deleted, replaced by the wrong kind, dtype, shape or a dangling link."""
    name, examples = "restructured checkpoint", 400
    original, spec = checkpoint
    with h5py.File(original) as f:
        names: list[str] = []
        f.visit(names.append)
    content = original.read_bytes()

    @fuzz(examples)
    @given(ops=restructure(names))
    def check(ops: list[tuple[str, str, Any]]) -> None:
        RUNS[name] += 1
        path = unique(tmp_path, ".h5")
        path.write_bytes(content)
        with h5py.File(path, "a") as f:
            for op in ops:
                try:
                    _apply(f, *op)
                except (OSError, KeyError, TypeError, ValueError):  # an edit that an earlier one made impossible
                    event("edit skipped")
        load_every_way(path, spec)
        path.unlink()

    check()
    ran(name, examples)


# ---- files that are not what they claim ---------------------------------------------------------------------------

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010800000000003a7e9b55"
                    "0000000a49444154789c63600000000200015f05d1e90000000049454e44ae426082")


def _contents(folder: Path) -> dict[str, Callable[[Path], None]]:
    """Ways to fill a path with something: each writes a file (or a folder) of one kind at the path."""
    volume = np.zeros((2, 4, 4), np.uint8)

    def h5(p: Path) -> None:
        with h5py.File(p, "w") as f:
            f["main"] = volume

    def zarr_store(p: Path) -> None:
        zarr.create_array(LocalStore(p), data=volume)

    def tif(p: Path) -> None:
        tifffile.imwrite(p, volume, photometric="minisblack")

    return {
        "empty": lambda p: p.write_bytes(b""),
        "text": lambda p: p.write_text(GOOD_ZNN),
        "ini": lambda p: p.write_text(GOOD_CFG),
        "png": lambda p: p.write_bytes(PNG),
        "json": lambda p: p.write_text('{"zarr_format": 3, "node_type": "array"}'),
        "pickle": lambda p: p.write_bytes(pickle.dumps({"a": 1})),
        "zeros": lambda p: p.write_bytes(bytes(4096)),
        "h5": h5,
        "tif": tif,
        "zarr": zarr_store,
        "folder": lambda p: p.mkdir(),
        "h5 signature only": lambda p: p.write_bytes(b"\x89HDF\r\n\x1a\n"),
        "tif header only": lambda p: p.write_bytes(b"II*\x00\x08\x00\x00\x00"),
    }


TEXT_LOADERS: dict[str, Callable[[Path], Any]] = {"net.znn": load_network, "data.spec": load_spec,
                                                  "job.cfg": load_job, "ckpt.h5": load_checkpoint}
MATCHES = {("text", "net.znn"), ("ini", "job.cfg")}


@pytest.mark.parametrize("claim", TEXT_LOADERS)
def test_files_that_are_not_what_they_claim(tmp_path: Path, claim: str) -> None:
    """Every kind of content under each parser's or loader's name: only the matching one loads; errors name the file."""
    for kind, make in _contents(tmp_path).items():
        path = tmp_path / kind.replace(" ", "-") / claim
        path.parent.mkdir()
        make(path)
        error = loads_or_znn_error(lambda: TEXT_LOADERS[claim](path), path.name)
        assert (error is None) == ((kind, claim) in MATCHES), f"{kind} content named {claim}: {error}"


@pytest.mark.parametrize("claim", ["vol.h5", "vol.tif", "vol.zarr"])
@pytest.mark.parametrize("kind", ["empty", "text", "png", "json", "pickle", "zeros", "h5", "tif", "zarr", "folder",
                                  "h5 signature only", "tif header only"])
def test_volume_readers_refuse_other_formats(tmp_path: Path, kind: str, claim: str) -> None:
    path = tmp_path / claim
    _contents(tmp_path)[kind](path)
    if kind == claim.split(".")[1]:
        read_volume(path)
        return
    for call in (read_volume, volume_shape_dtype, lambda p: open_volume(p).compute()):
        with pytest.raises(ZnnError) as info:
            call(path)
        assert path.name in str(info.value)


# ---- nothing in a file runs ---------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates ``marker``: proof that a loader ran code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("meta", [
    {"dtype": "<f8", "compressor": {"id": "pickle"}, "filters": None},
    {"dtype": "<f8", "compressor": None, "filters": [{"id": "pickle"}]},
    {"dtype": "|O", "compressor": None, "filters": [{"id": "pickle"}]},
    {"dtype": "|O", "compressor": {"id": "pickle"}, "filters": None},
])
def test_zarr_with_a_pickle_codec_is_refused_unread(tmp_path: Path, meta: dict[str, Any]) -> None:
    store, marker = tmp_path / "evil.zarr", tmp_path / "pwned"
    store.mkdir()
    (store / ".zarray").write_text(json.dumps({"zarr_format": 2, "shape": [2, 2], "chunks": [2, 2], "fill_value": 0,
                                               "order": "C", **meta}))
    (store / "0.0").write_bytes(pickle.dumps(_Payload(marker)))
    for call in (read_volume, volume_shape_dtype, lambda p: open_volume(p).compute()):
        with pytest.raises(ZnnError, match="evil.zarr"):
            call(store)
    assert not marker.exists(), "a loader unpickled file content"


def test_zarr_v3_with_a_pickle_codec_is_refused_unread(tmp_path: Path) -> None:
    store, marker = tmp_path / "evil.zarr", tmp_path / "pwned"
    store.mkdir()
    (store / "zarr.json").write_text(json.dumps({
        "zarr_format": 3, "node_type": "array", "shape": [2, 2], "data_type": "float64", "fill_value": 0.0,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2, 2]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "codecs": [{"name": "numcodecs.pickle"}], "attributes": {}}))
    (store / "c" / "0").mkdir(parents=True)
    (store / "c" / "0" / "0").write_bytes(pickle.dumps(_Payload(marker)))
    for call in (read_volume, volume_shape_dtype, lambda p: open_volume(p).compute()):
        with pytest.raises(ZnnError, match="evil.zarr"):
            call(store)
    assert not marker.exists(), "a loader unpickled file content"


def test_object_dtypes_are_refused(tmp_path: Path, checkpoint: tuple[Path, Any]) -> None:
    """h5 object (variable-length) datasets are refused as volumes and as checkpoint parameters, never decoded."""
    path = tmp_path / "objects.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("main", data=np.array([["a", "b"], ["c", "d"]], dtype=object), dtype=h5py.string_dtype())
    with pytest.raises(ZnnError, match="objects.h5.*dtype"):
        read_volume(path)
    original, spec = checkpoint
    copy = tmp_path / "ckpt.h5"
    shutil.copy(original, copy)
    with h5py.File(copy, "a") as f:
        del f["processing/znn/train/network/conv1/filters"]
        f["processing/znn/train/network/conv1/filters"] = _vlen(np.arange(2), np.arange(3))
    with pytest.raises(ZnnError, match="ckpt.h5.*filters.*numeric"):
        load_checkpoint(copy, spec)


def test_loaders_never_unpickle_or_evaluate() -> None:
    """No parser or loader imports a pickle-like module, evaluates text, loads YAML unsafely or lets NumPy unpickle."""
    root = ROOT / "znn"
    sources = [*sorted((root / "io").glob("*.py")), root / "spec.py", root / "network.py"]
    banned_modules = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
    banned_builtins = {"eval", "exec", "compile", "__import__"}
    banned_methods = {"unsafe_load", "full_load", "unsafe_load_all", "literal_eval"}
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            at = f"{source.relative_to(root.parent)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not {m.split(".")[0] for m in modules} & banned_modules, f"{at} imports {modules}"
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            assert not (isinstance(func, ast.Name) and func.id in banned_builtins), f"{at} calls {func.id}"
            if isinstance(func, ast.Attribute):
                assert func.attr not in banned_methods, f"{at} calls {func.attr}"
                owner = func.value.id if isinstance(func.value, ast.Name) else ""
                assert (owner, func.attr) != ("yaml", "load"), f"{at} calls yaml.load; use yaml.safe_load"
            for keyword in node.keywords:
                pickles = keyword.arg == "allow_pickle" and not (isinstance(keyword.value, ast.Constant)
                                                                 and keyword.value.value is False)
                assert not pickles, f"{at} passes allow_pickle"


# ---- the escapes the fuzzing found, one example each -----------------------------------------------------------------


def test_a_huge_sample_range_is_refused_at_once() -> None:
    """``train_range = 1-99999999999`` built a set of 10**11 ids (MemoryError after seconds, or the machine's RAM)."""
    with pytest.raises(ZnnError, match=r"job.cfg:8: .*train_range.*more than 100000 samples"):
        parse_job(GOOD_CFG.replace("train_range = 1-3,6", "train_range = 1-99999999999"), "job.cfg")


NET = "processing/znn/train/network"


def _replace(key: str, value: Any) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        del f[key]
        f[key] = value

    return edit


@pytest.mark.parametrize("edit, loader, message", [
    (_replace(f"{NET}/conv1/type", np.bytes_(b"\xff\xfe")), load_checkpoint, "conv1/type is not UTF-8"),
    (_replace(f"{NET}/conv1/size", np.ones(3)), load_checkpoint, "conv1/size holds float64 values"),
    (_replace(f"{NET}/conv1/type", "conv\nnodes extra"), load_checkpoint, "conv1/type is .* one word"),
    (_replace(f"{NET}/conv1/filters", "1,2,3"), load_checkpoint, "conv1/filters is not a numeric array"),
    (lambda f: f.__setitem__(f"{NET}/stray", 1), load_checkpoint, "stray is not a group"),
    (lambda f: f.__setitem__("processing/znn/train/statistics/words", "text"), load_statistics,
     "words is not a numeric array"),
], ids=["bytes", "float-size", "newline", "text-filters", "stray-dataset", "text-series"])
def test_malformed_checkpoint_structure(tmp_path: Path, checkpoint: tuple[Path, Any], edit: Any, loader: Any,
                                        message: str) -> None:
    """Refused naming the file and the object (before: UnicodeDecodeError, float sizes truncated to integers, a
    newline that added lines to the rebuilt .znn, an AttributeError, a text series returned as learning curve)."""
    path = tmp_path / "ckpt.h5"
    shutil.copy(checkpoint[0], path)
    with h5py.File(path, "a") as f:
        edit(f)
    with pytest.raises(ZnnError, match=f"ckpt.h5.*{message}"):
        loader(path)


def test_damaged_volumes_name_the_file(tmp_path: Path) -> None:
    """A truncated compressed TIFF strip, a zarr.json that is not JSON (of the image group, of its level 0), a zstd
    chunk cut short."""
    data = np.arange(2 * 16 * 16, dtype=np.uint16).reshape(2, 16, 16)
    tifffile.imwrite(tmp_path / "cut.tif", data, photometric="minisblack", compression="zlib")
    raw = (tmp_path / "cut.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(raw[: len(raw) // 2])
    write_volume(tmp_path / "meta.zarr", data)
    (tmp_path / "meta.zarr" / "zarr.json").write_bytes(b"{\"zarr_format\": 3, \x9f")
    write_volume(tmp_path / "level.zarr", data)  # an OME-Zarr image whose level-0 array metadata is damaged
    (tmp_path / "level.zarr" / "0" / "zarr.json").write_bytes(b"{\"zarr_format\": 3, \x9f")
    write_volume(tmp_path / "chunk.zarr", data, chunks=(1, 16, 16))
    chunk = tmp_path / "chunk.zarr" / "0" / "c" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:5])
    for name in ("cut.tif", "meta.zarr", "level.zarr", "chunk.zarr"):
        for call in (read_volume, lambda p: open_volume(p).compute()):
            with pytest.raises(ZnnError, match=f"{name}: not a readable"):
                call(tmp_path / name)
