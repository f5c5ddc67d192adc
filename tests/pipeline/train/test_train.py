"""`znn train` end to end on tiny synthetic samples: every training key of a .cfg job, checkpoints, resume (also
after a kill during a checkpoint write), seeding, the NaN stop and the quickstart."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.shared import ROOT
from znn.cli import main
from znn.errors import ConfigError, TrainingError
from znn.io.checkpoint import load_checkpoint, load_statistics
from znn.io.config import load_job
from znn.io.volume import write_volume
from znn.pipeline.jobs.synthetic import EMStyle, boundary_labels, synthetic_em
from znn.pipeline.jobs.train import train_job
from znn.pipeline.train.curve import LearningCurve
from znn.pipeline.train.trainer import Schedule

NET2D = """
nodes input
type input
size 1

edges conv1
type conv
init msra
size 1,3,3
stride 1,1,1
input input
output hidden

nodes hidden
type transfer
function rectify_linear
size 3

edges conv2
type conv
init xavier
size 1,3,3
stride 1,1,1
input hidden
output output

nodes output
type transfer
function linear
size {outputs}
"""

NET3D_AFFINITY = NET2D.replace("size 1,3,3", "size 2,3,3")

SPEC = """
[image1]
fnames = train-raw.tif
pp_types = standard2D

[label1]
fnames = train-labels.tif
pp_types = {label_pp}

[image2]
fnames = test-raw.tif
pp_types = standard2D

[label2]
fnames = test-labels.tif
pp_types = {label_pp}

[sample1]
input = 1
output = 1

[sample2]
input = 2
output = 2
"""

BASE = {
    "fnet_spec": "net.znn", "fdata_spec": "data.spec", "num_threads": "2", "dtype": "float32",
    "out_type": "boundary", "train_outsz": "1,8,8", "train_range": "1", "test_range": "2",
    "train_conv_mode": "fft", "cost_fn": "auto", "eta": "0.05", "anneal_factor": "1", "Num_iter_per_annealing": "2",
    "momentum": "0.9", "weight_decay": "0", "is_data_aug": "yes", "is_bd_mirror": "yes", "rebalance_mode": "none",
    "is_malis": "no", "Num_iter_per_show": "2", "Num_iter_per_test": "3", "test_num": "2",
    "Num_iter_per_save": "3", "Max_iter": "6", "train_net_prefix": "out/net", "seed": "3",
}


def make_job(folder: Path, affinity: bool = False, label_pp: str | None = None, **keys: str) -> Path:
    """A job folder with tiny synthetic train/test volumes; ``keys`` override (or, with value None, drop) keys."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, seed in (("train", 1), ("test", 2)):
        if not (folder / f"{name}-raw.tif").exists():
            shape = (6, 20, 20) if affinity else (2, 24, 24)
            raw, seg = synthetic_em(shape, seed, EMStyle(cell_size=8.0, cells="3d" if affinity else "columns"))
            write_volume(folder / f"{name}-raw.tif", raw)
            write_volume(folder / f"{name}-labels.tif", seg if affinity else boundary_labels(seg))
    pp = label_pp or ("affinity" if affinity else "binary_class")
    outputs = {"affinity": 3, "binary_class": 2}.get(pp, 1)
    (folder / "net.znn").write_text((NET3D_AFFINITY if affinity else NET2D).format(outputs=outputs))
    (folder / "data.spec").write_text(SPEC.format(label_pp=pp))
    values = dict(BASE, **({"out_type": "affinity", "train_outsz": "2,6,6"} if affinity else {}))
    values.update(keys)
    lines = ["[parameters]"] + [f"{k} = {v}" for k, v in values.items() if v is not None]
    path = folder / "job.cfg"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(path: Path, **options):
    return train_job(load_job(path), progress=False, log=lambda _: None, **options)


def weights(trainer) -> dict[str, np.ndarray]:
    net = trainer.engine.net
    return {**{f"k:{k}": v.copy() for k, v in net.kernels.items()}, **{f"b:{k}": v.copy() for k, v in net.biases.items()}}


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_checkpoints_curve_and_files(tmp_path):
    trainer = run(make_job(tmp_path))
    out = tmp_path / "out"
    # net.lock: the run lock of the prefix (one training run per prefix), kept so later runs lock the same file
    assert {p.name for p in out.iterdir()} == {"net_3.h5", "net_6.h5", "net_current.h5", "net_curve.png", "net.lock"}
    stats = load_statistics(out / "net_current.h5")
    assert int(stats["iteration"]) == 6
    curve = LearningCurve.from_statistics(stats)
    assert curve.train["it"] == [2, 4, 6] and curve.test["it"] == [3, 6]
    assert all(np.isfinite(curve.train["err"])) and all(0 <= e <= 1 for e in curve.train["cls"])
    assert all(np.isfinite(curve.test["re"]))  # validation reports the Rand error
    assert curve.train["elapsed"] == sorted(curve.train["elapsed"])
    saved = load_checkpoint(out / "net_current.h5")
    assert_same(weights(trainer), {**{f"k:{k}": v for k, v in saved.kernels.items()},
                                   **{f"b:{k}": v for k, v in saved.biases.items()}})
    three = load_checkpoint(out / "net_3.h5")
    assert not np.array_equal(three.kernels["conv1"], saved.kernels["conv1"])


# Every training key of formats.md, each with a value that changes what runs. The run must finish with finite
# weights; keys whose effect is on the weights are also checked against the base run.
KEY_CASES = [
    ("num_threads", "1", "same"), ("dtype", "float64", "close"), ("train_outsz", "1,6,6", "differ"),
    ("train_conv_mode", "direct", "close"), ("train_conv_mode", "optimize", "close"),
    ("cost_fn", "square_loss", "differ"), ("cost_fn", "binomial_cross_entropy", "differ"),
    ("cost_fn", "softmax_loss", "same"), ("eta", "0.01", "differ"), ("anneal_factor", "0.5", "differ"),
    ("Num_iter_per_annealing", "1", "same"), ("momentum", "0", "differ"), ("weight_decay", "0.1", "differ"),
    ("is_data_aug", "no", "differ"), ("is_bd_mirror", "no", "differ"), ("rebalance_mode", "global", "differ"),
    ("rebalance_mode", "patch", "differ"), ("is_rebalance", "yes", "same"), ("is_patch_rebalance", "yes", "same"),
    ("Num_iter_per_show", "1", "same"), ("Num_iter_per_test", "2", "same"), ("test_num", "1", "same"),
    ("Num_iter_per_save", "2", "same"), ("Max_iter", "4", "differ"), ("test_range", None, "same"),
    ("seed", "4", "differ"), ("scheduler", "synchronous", "same"), ("spectra_cache", "no", "same"),
    ("logging", "yes", "same"), ("is_stdio", "no", "same"), ("is_debug", "yes", "same"), ("is_check", "yes", "same"),
]


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory):
    return weights(run(make_job(tmp_path_factory.mktemp("base"))))


@pytest.mark.parametrize("key,value,effect", KEY_CASES, ids=[f"{k}={v}" for k, v, _ in KEY_CASES])
def test_every_training_key(tmp_path, base_weights, key, value, effect):
    extra = {"rebalance_mode": None} if key in ("is_rebalance", "is_patch_rebalance") else {}
    got = weights(run(make_job(tmp_path, **{key: value}, **extra)))
    assert all(np.isfinite(v).all() for v in got.values())
    if key == "is_rebalance":  # the older spellings select a mode: compare against that mode's run
        base = weights(run(make_job(tmp_path / "mode", rebalance_mode="global")))
    elif key == "is_patch_rebalance":
        base = weights(run(make_job(tmp_path / "mode", rebalance_mode="patch")))
    else:
        base = base_weights
    if effect == "same":
        assert_same(got, base)
    elif effect == "close":
        for k in base:
            np.testing.assert_allclose(got[k], base[k], rtol=2e-3, atol=2e-4, err_msg=k)
    else:
        assert any(not np.allclose(got[k], base[k]) for k in base)


def test_num_iter_per_save_and_show_and_test_set_the_curve(tmp_path):
    run(make_job(tmp_path, Num_iter_per_show="1", Num_iter_per_test="2", Num_iter_per_save="2", Max_iter="5"))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("net_*.h5")) == ["net_2.h5", "net_4.h5", "net_5.h5", "net_current.h5"]
    curve = LearningCurve.from_statistics(load_statistics(out / "net_current.h5"))
    assert curve.train["it"] == [1, 2, 3, 4, 5] and curve.test["it"] == [2, 4]


def test_eta_zero_keeps_the_weights(tmp_path):
    trainer = run(make_job(tmp_path, eta="0", Max_iter="2"))
    initial = run(make_job(tmp_path / "none", Max_iter="0"))
    assert_same(weights(trainer), weights(initial))


def test_annealing_schedule():
    s = Schedule(10, 1, 1, 1, 1, eta=0.1, anneal_factor=0.5, anneal_every=4, momentum=0.9, weight_decay=0.01)
    assert [s.hyper(i, 64).eta for i in (0, 3, 4, 8, 9)] == pytest.approx([0.1, 0.1, 0.05, 0.025, 0.025])
    assert s.hyper(0, 64).patch_size == 64 and s.hyper(0, 64).momentum == 0.9


@pytest.mark.parametrize("norm", ["none", "frac", "num", "pair"])
def test_affinity_with_malis(tmp_path, norm):
    trainer = run(make_job(tmp_path, affinity=True, is_malis="yes", malis_norm_type=norm, Max_iter="3"))
    assert all(np.isfinite(v).all() for v in weights(trainer).values())
    plain = run(make_job(tmp_path / "plain", affinity=True, Max_iter="3"))
    assert any(not np.allclose(weights(trainer)[k], weights(plain)[k]) for k in weights(plain))


@pytest.mark.parametrize("label_pp", ["one_class", "affinity"])
def test_other_label_transforms(tmp_path, label_pp):
    affinity = label_pp == "affinity"
    trainer = run(make_job(tmp_path, affinity=affinity, label_pp=label_pp, Max_iter="3"))
    curve = trainer.curve
    assert np.isfinite(curve.test["re"]).all() and np.isfinite(curve.train["cls"]).all()


def test_old_spelling_train_net(tmp_path):
    run(make_job(tmp_path, train_net_prefix=None, train_net="old/prefix", Max_iter="3"))
    assert (tmp_path / "old" / "prefix_current.h5").is_file()


def test_resume_continues_exactly(tmp_path):
    whole = run(make_job(tmp_path / "whole", Max_iter="9"))
    job = make_job(tmp_path / "parts", Max_iter="9")
    run(job, max_iter=6)
    resumed = run(job)
    assert resumed.iteration == 9
    assert_same(weights(resumed), weights(whole))
    for phase in ("train", "test"):
        a, b = getattr(resumed.curve, phase), getattr(whole.curve, phase)
        for key in ("it", "err", "cls"):
            assert a[key] == b[key], (phase, key)


KILLER = textwrap.dedent("""
    import os, signal, sys
    import znn.io.checkpoint as checkpoint
    from znn.cli import main

    calls = {"n": 0}
    original = checkpoint._write_edge

    def write_edge(group, edge, net):  # the 3rd checkpoint file: die with half of it written
        calls["n"] += 1
        if calls["n"] == 2 * 2 + 1:
            os.kill(os.getpid(), signal.SIGKILL)
        original(group, edge, net)

    checkpoint._write_edge = write_edge
    sys.exit(main(["train", sys.argv[1], "--quiet"]))
""")


def test_killed_during_checkpoint_write_resumes_without_gap(tmp_path):
    whole = run(make_job(tmp_path / "whole", Max_iter="9"))
    job = make_job(tmp_path / "killed", Max_iter="9")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    died = subprocess.run([sys.executable, "-c", KILLER, str(job)], env=env, capture_output=True, text=True)
    assert died.returncode == -9, died.stderr
    out = tmp_path / "killed" / "out"
    # files 1-2 were net_3.h5 and net_current.h5 at iteration 3; the kill hit net_6.h5
    assert int(load_statistics(out / "net_current.h5")["iteration"]) == 3
    assert not (out / "net_6.h5").exists() and list(out.glob(".net_6.h5.tmp-*"))
    assert main(["train", str(job), "--quiet"]) == 0
    assert not list(out.glob(".*.tmp-*"))  # the killed writer's temporary is gone
    stats = load_statistics(out / "net_current.h5")
    curve = LearningCurve.from_statistics(stats)
    assert curve.train["it"] == [2, 4, 6, 8, 9] and curve.test["it"] == [3, 6, 9]
    assert_same({f"k:{k}": v for k, v in load_checkpoint(out / "net_current.h5").kernels.items()},
                {k: v for k, v in weights(whole).items() if k.startswith("k:")})


def test_seed_initialises_matching_groups_and_names_the_rest(tmp_path, capsys):
    run(make_job(tmp_path / "donor", Max_iter="3"))
    job = make_job(tmp_path / "new", label_pp="one_class", Max_iter="0")  # conv2 now has 1 output map
    messages: list[str] = []
    trainer = train_job(load_job(job), seed=tmp_path / "donor" / "out" / "net_current.h5", progress=False,
                        log=messages.append)
    donor = load_checkpoint(tmp_path / "donor" / "out" / "net_current.h5")
    np.testing.assert_array_equal(trainer.engine.net.kernels["conv1"], donor.kernels["conv1"])
    text = "\n".join(messages)
    assert "conv1" in text and "conv2 (shape" in text and "output (shape" in text


def test_nan_stops_with_step_and_layer_and_keeps_the_checkpoint(tmp_path, capsys):
    run(make_job(tmp_path, Max_iter="3"))  # three good steps and their checkpoint, then a learning rate that blows up
    job = make_job(tmp_path, eta="1e30", cost_fn="square_loss", Num_iter_per_save="1", Max_iter="20", momentum="0")
    with pytest.raises(TrainingError) as info:
        run(job)
    message = str(info.value)
    step = int(re.match(r"step (\d+): non-finite values in ", message).group(1))
    assert step >= 4 and ("layer conv" in message or "parameters of conv" in message), message
    assert "net_current.h5" in message
    current = tmp_path / "out" / "net_current.h5"
    assert int(load_statistics(current)["iteration"]) == step - 1
    good = load_checkpoint(current)
    assert all(np.isfinite(v).all() for v in good.kernels.values())
    assert main(["train", str(job), "--quiet"]) == 2  # the CLI says so without a traceback
    err = capsys.readouterr().err
    assert "non-finite" in err and "Traceback" not in err


def test_cli_errors_are_clear(tmp_path, capsys):
    job = make_job(tmp_path, fdata_spec="missing.spec")
    assert main(["train", str(job)]) == 2
    assert "missing.spec" in capsys.readouterr().err
    job = make_job(tmp_path, train_range=None)
    with pytest.raises(ConfigError, match="train_range"):
        run(job)


def test_progress_line_when_not_a_terminal(tmp_path, capsys):
    assert main(["train", str(make_job(tmp_path, Max_iter="4"))]) == 0
    err = capsys.readouterr().err
    assert "4/4 iterations" in err and "cost" in err and "\r" not in err


def test_distributed_training_equals_threads(tmp_path, local_client, base_weights):
    trainer = run(make_job(tmp_path, scheduler=local_client.scheduler.address))
    assert_same(weights(trainer), base_weights)


def test_quickstart_small(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--max-iter", "40", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "held-out pixel error" in text and "no boundary" in text
    for name in ("preview.png", "out/net_curve.png", "out/net_current.h5"):
        assert (tmp_path / "qs" / name).is_file()
    with h5py.File(tmp_path / "qs" / "out" / "net_current.h5") as f:
        assert int(f["processing/znn/train/statistics/iteration"][()]) == 40


SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.mark.parametrize("workflow,data,train_shape,test_shape", [
    ("isbi2012", "isbi2012", (15, 512, 512), (5, 512, 512)),
    ("fib-affinity", "gala-fib", (25, 100, 200), (25, 100, 200)),
])
def test_bundled_workflows_train_on_the_shared_data(tmp_path, workflow, data, train_shape, test_shape):
    if not (SHARED_DATA / data).is_dir():
        pytest.skip(f"{SHARED_DATA / data} is absent (the shared EM data sits beside a development checkout)")
    folder = tmp_path / workflow
    shutil.copytree(ROOT / "workflows" / workflow, folder, symlinks=True, ignore=shutil.ignore_patterns("data"))
    (folder / "data").symlink_to(SHARED_DATA / data)
    job = load_job(folder / "train.cfg", {"train_net_prefix": str(tmp_path / "out" / "net")})
    trainer = train_job(job, max_iter=1, progress=False, log=lambda _: None)
    assert trainer.iteration == 1 and (tmp_path / "out" / "net_current.h5").is_file()
    from znn.pipeline.jobs.train import load_samples

    train, test = load_samples(job, "train_range", np.float32), load_samples(job, "test_range", np.float32)
    assert train[0].shape == train_shape and test[0].shape == test_shape
