"""Job (.cfg) and sample (.spec) files: every key, ranges, relative paths, the shared reference files."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import pytest

from tests.shared import REFERENCE, need
from znn.errors import ConfigError, SpecFileError
from znn.io.config import ALL_KEYS, Job, load_job, parse_job, parse_range
from znn.io.ngff import Resolution
from znn.io.specfile import load_spec


@pytest.mark.parametrize("text, ids", [("1", [1]), ("1-3,6", [1, 2, 3, 6]), ("2-3,7", [2, 3, 7]),
                                       ("1,4-6,8", [1, 4, 5, 6, 8]), ("3,1,2-2", [1, 2, 3]), (" 0 - 1 ", [0, 1])])
def test_parse_range(text, ids):
    assert parse_range(text) == ids


@pytest.mark.parametrize("text", ["", "a", "3-1", "1-", "-2", "1,,x"])
def test_parse_range_rejects(text):
    with pytest.raises(ValueError):
        parse_range(text)


def test_reference_job_files_parse():
    job = load_job(need(REFERENCE / "config.cfg"))
    assert job.fnet_spec == REFERENCE / "../networks/N4_relu.znn"  # relative to the job file
    assert job.train_outsz == (1, 100, 100) and job.forward_outsz == (5, 100, 100)
    assert job.train_range == [2] and job.test_range == [1]
    assert job.rebalance == "global" and job.cost == "softmax_loss"
    assert job.Num_iter_per_save == 1000 and job.anneal_factor == pytest.approx(0.997)
    legacy = load_job(need(REFERENCE / "testsuit/boundary/config.cfg"))
    assert legacy.rebalance == "none" and legacy.train_conv_mode == "optimize"
    assert legacy.net_prefix == REFERENCE / "testsuit/boundary/../testsuit/boundary/net"


def test_every_key_is_read(tmp_path: Path):
    values = {
        "fnet_spec": "n.znn", "fdata_spec": "d.spec", "num_threads": "3", "dtype": "float64",
        "out_type": "affinity", "logging": "yes", "train_outsz": "3,20,20", "forward_outsz": "auto",
        "train_range": "1-2", "test_range": "3", "forward_range": "4,5", "train_conv_mode": "direct",
        "forward_conv_mode": "optimize", "cost_fn": "auto", "is_malis": "yes", "malis_norm_type": "frac",
        "eta": "0.05", "anneal_factor": "0.9", "Num_iter_per_annealing": "7", "momentum": "0.5",
        "weight_decay": "0.001", "is_data_aug": "no", "is_bd_mirror": "no", "rebalance_mode": "patch",
        "is_rebalance": "yes", "is_patch_rebalance": "no", "Num_iter_per_show": "2", "Num_iter_per_test": "4",
        "test_num": "6", "Num_iter_per_save": "8", "Max_iter": "9", "train_net_prefix": "exp/net",
        "train_net": "exp/old", "forward_net": "exp/net_current.h5", "output_prefix": "exp/out", "is_stdio": "no",
        "is_debug": "yes", "is_check": "yes", "scheduler": "tcp://127.0.0.1:8786", "seed": "42",
        "output_format": "h5", "spectra_cache": "no", "resolution": "0.05,0.004,0.004 um", "pyramid": "3",
        "replicas": "4",
    }
    assert set(values) == set(ALL_KEYS)
    path = tmp_path / "job.cfg"
    path.write_text("[parameters]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
    job = load_job(path)
    assert job.fnet_spec == tmp_path / "n.znn" and job.forward_net == tmp_path / "exp/net_current.h5"
    assert job.num_threads == 3 and job.threads == 3 and job.dtype == "float64"
    assert job.train_outsz == (3, 20, 20) and job.forward_outsz == "auto"
    assert job.forward_range == [4, 5] and job.cost == "binomial_cross_entropy"
    assert job.is_malis is True and job.malis_norm_type == "frac" and job.logging is True
    assert job.rebalance == "patch"  # rebalance_mode wins over the older keys
    assert job.net_prefix == tmp_path / "exp/net"
    assert (job.eta, job.anneal_factor, job.momentum, job.weight_decay) == (0.05, 0.9, 0.5, 0.001)
    assert (job.Num_iter_per_show, job.Num_iter_per_test, job.test_num, job.Num_iter_per_save, job.Max_iter) == (
        2, 4, 6, 8, 9)
    assert job.is_data_aug is False and job.is_bd_mirror is False and job.is_stdio is False
    assert job.scheduler == "tcp://127.0.0.1:8786" and job.seed == 42 and job.output_format == "h5"
    assert job.spectra_cache is False and job.is_debug and job.is_check
    assert job.replicas == 4
    assert job.resolution == Resolution((0.05, 0.004, 0.004), "micrometer") and job.pyramid == 3
    assert_typed(job)


# --------------------------------------------------------------------------------------------- the typed Job
def fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotation ``hint`` (the few kinds Job's fields use)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(fits(v, args[0]) for v in value)
    if origin is tuple:
        return isinstance(value, tuple) and len(value) == len(args) and all(map(fits, value, args))
    if hint is int:  # a bool is an int to isinstance, not to a reader of the field
        return isinstance(value, int) and not isinstance(value, bool)
    return value is None if hint is type(None) else isinstance(value, hint)


def assert_typed(job: Job) -> None:
    """Every key's value is of its field's type: mypy trusts the fields, and the parsers behind them return Any."""
    hints = typing.get_type_hints(Job)
    wrong = {key: (getattr(job, key), hints[key]) for key in ALL_KEYS if not fits(getattr(job, key), hints[key])}
    assert not wrong


def test_job_has_one_field_per_key():
    """A key added to ALL_KEYS needs its typed field (and a field its key): `job.key` is what the code reads."""
    keys = {f.name for f in dataclasses.fields(Job)} - {"path", "ini"}
    assert keys == set(ALL_KEYS), f"no field: {set(ALL_KEYS) - keys}; no key: {keys - set(ALL_KEYS)}"


def test_defaults_are_of_the_fields_types():
    assert_typed(parse_job("[parameters]\n"))


def test_a_job_is_read_only_and_knows_only_its_keys():
    job = parse_job("[parameters]\neta = 0.1\n")
    with pytest.raises(AttributeError):
        job.not_a_key  # noqa: B018
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.eta = 0.2  # type: ignore[misc]
    with pytest.raises(TypeError):
        job.values["eta"] = 0.2  # type: ignore[index]
    assert job.values["eta"] == 0.1 and set(job.values) == set(ALL_KEYS)


def test_overrides_are_checked_and_resolved_like_the_files_keys(tmp_path: Path):
    path = tmp_path / "job.cfg"
    path.write_text("[parameters]\neta = 0.1\noutput_prefix = out/pred\n")
    job = load_job(path, {"eta": "0.2", "output_prefix": "elsewhere/", "forward_range": "1-2"})
    assert job.eta == 0.2 and job.forward_range == [1, 2]
    assert job.output_prefix == f"{tmp_path / 'elsewhere'}/"  # a folder prefix keeps its slash
    assert_typed(job)
    with pytest.raises(ConfigError, match="'fast' is not valid"):
        load_job(path, {"eta": "fast"})


@pytest.mark.parametrize("text, levels", [("no", 0), ("0", 0), ("auto", "auto"), ("yes", "auto"), ("2", 2)])
def test_pyramid_key(tmp_path: Path, text, levels):
    path = tmp_path / "job.cfg"
    path.write_text(f"[parameters]\npyramid = {text}\n")
    assert load_job(path).pyramid == levels


@pytest.mark.parametrize("key, text, says", [
    ("pyramid", "lots", r"job\.cfg:2: \[parameters\] pyramid: 'lots' is not valid; .*no, auto"),
    ("pyramid", "17", "17 levels: give 1 to 16"),
    ("resolution", "4,4", r"job\.cfg:2: \[parameters\] resolution: '4,4' is not valid; .*like 40,4,4 nm"),
])
def test_bad_ngff_keys_name_the_line_and_what_is_valid(tmp_path: Path, key, text, says):
    path = tmp_path / "job.cfg"
    path.write_text(f"[parameters]\n{key} = {text}\n")
    with pytest.raises(ConfigError, match=says):
        load_job(path)


def test_sample_sections_take_a_resolution(tmp_path: Path):
    path = tmp_path / "d.spec"
    path.write_text("[image1]\nfnames = a.tif\nresolution = 50,4,4\n\n[label1]\nfnames = b.tif\n\n"
                    "[sample1]\ninput = 1\noutput = 1\n")
    spec = load_spec(path)
    assert spec.images[1].resolution == Resolution((50.0, 4.0, 4.0), "nanometer")
    assert spec.labels[1].resolution is None
    path.write_text(path.read_text().replace("50,4,4", "50,4,4 lightyears"))
    with pytest.raises(SpecFileError, match=r"d\.spec:3: \[image1\] resolution: .*unknown unit 'lightyears'"):
        load_spec(path)


def test_zero_threads_means_all_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """One rule (znn.environment.cores) for the job key, the schedulers and ``--threads``."""
    from znn import environment
    from znn.pipeline.run import schedulers

    monkeypatch.setattr(environment.os, "cpu_count", lambda: 7)
    path = tmp_path / "job.cfg"
    for given, meant in ((0, 7), (-1, 7), (3, 3)):
        path.write_text(f"[parameters]\nnum_threads = {given}\n")
        assert load_job(path).threads == environment.cores(given) == schedulers.cores(given) == meant


def test_conv_mode_keys_are_the_kernels_modes_and_optimize():
    from znn.io.config import JOB_CONV_MODES
    from znn.ops.conv import MODES
    from znn.pipeline.graph.plan import CONV_MODES

    assert set(MODES) == set(CONV_MODES) and JOB_CONV_MODES == (*MODES, "optimize")


def test_require_names_the_missing_key(tmp_path: Path):
    path = tmp_path / "job.cfg"
    path.write_text("[parameters]\neta = 0.1\n")
    with pytest.raises(Exception, match="needs key 'fdata_spec'"):
        load_job(path).require("fdata_spec")


def test_reference_spec_files_parse():
    spec = load_spec(need(REFERENCE / "isbi2012.spec"))
    assert spec.samples[1].inputs == [1] and spec.samples[1].outputs == [1]
    assert spec.samples[2].outputs == []  # inference-only sample
    assert spec.images[1].pp_types == ["standard2D"] and spec.labels[1].pp_types == ["auto"]
    assert spec.images[1].fnames == [REFERENCE / "../dataset/ISBI2012/train-volume.tif"]
    assert len(load_spec(need(REFERENCE / "test-dataset.spec")).samples) == 4


def test_spec_with_several_inputs_files_and_masks(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "s.spec"
    path.write_text("""[image1]
fnames = a.tif,
         b.h5:/raw
pp_types = standard2D, symetric_rescale
[image2]
fnames = c.zarr/raw
[label1]
fnames = l.tif
pp_types = affinity
fmasks = m.tif
is_auto_crop = no
[mask1]
fnames = m2.tif
[sample3]
input2 = 2
input1 = 1
output = 1
mask = 1
""")
    spec = load_spec(path)
    sample = spec.sample(3)
    assert sample.inputs == [1, 2] and sample.outputs == [1] and sample.masks == [1]
    assert spec.images[1].fnames == [tmp_path / "sub/a.tif", tmp_path / "sub/b.h5:/raw"]
    assert spec.images[1].pp_types == ["standard2D", "symetric_rescale"]
    assert spec.images[2].pp_types == ["none"]
    assert spec.labels[1].fmasks == [tmp_path / "sub/m.tif"] and spec.labels[1].is_auto_crop is False
    with pytest.raises(Exception, match=r"no \[sample1\].*defines samples 3"):
        spec.sample(1)
    with pytest.raises(FileNotFoundError, match="a.tif does not exist"):
        spec.images[1].check_files()
