"""`znn run WORKFLOW.yaml` and `znn status`: the file's checks, the state file, skip and rerun, and a run that is
killed and rerun giving the results of an uninterrupted one."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.pipeline.train.test_train import make_job
from tests.shared import ROOT
from znn.cli import main
from znn.errors import ConfigError, OutputBusyError, WorkflowError, ZnnFileNotFoundError
from znn.io.checkpoint import save_checkpoint
from znn.io.netfile import load_network
from znn.io.volume import read_volume, write_volume
from znn.network import Network
from znn.pipeline.jobs import run_workflow as workflow_cli
from znn.pipeline.jobs.run_workflow import run_workflow
from znn.pipeline.jobs.synthetic import EMStyle, boundary_labels, synthetic_em
from znn.pipeline.jobs.workflow import load_workflow
from znn.pipeline.jobs.workflow_state import RunLock, WorkflowState

FORWARD_SPEC = """
[image1]
fnames = big1-raw.tif
pp_types = standard2D

[image2]
fnames = big2-raw.tif
pp_types = standard2D

[sample1]
input = 1

[sample2]
input = 2
"""

FORWARD = """[parameters]
fnet_spec = net.znn
fdata_spec = forward.spec
forward_net = out/net_current.h5
output_prefix = out/pred
forward_outsz = 1,8,8
forward_range = 1
num_threads = 2
is_bd_mirror = yes
"""

# Train briefly, forward two volumes (a fan-out over forward_range), evaluate each against its labels.
WORKFLOW = """\
steps:
  train: {run: train, job: job.cfg}
  forward:
    run: forward
    job: forward.cfg
    needs: [train]
    over: [1, 2]
    set: {forward_range: "{item}"}
  evaluate:
    run: evaluate
    needs: ["forward[{index}]"]
    over: [{sample: 1}, {sample: 2}]
    pred: out/pred_sample{sample}_output.zarr/output
    labels: big{sample}-labels.tif
    out: out/scores{sample}.json
"""


def make_workflow(folder: Path, text: str = WORKFLOW) -> Path:
    make_job(folder, Max_iter="4", Num_iter_per_save="2", Num_iter_per_test="2")
    for sample in (1, 2):
        raw, seg = synthetic_em((2, 48, 48), 10 + sample, EMStyle(cell_size=8.0, cells="columns"))
        write_volume(folder / f"big{sample}-raw.tif", raw, overwrite=True)
        write_volume(folder / f"big{sample}-labels.tif", boundary_labels(seg), overwrite=True)
    (folder / "forward.spec").write_text(FORWARD_SPEC)
    (folder / "forward.cfg").write_text(FORWARD)
    path = folder / "workflow.yaml"
    path.write_text(text)
    return path


def statuses(path: Path) -> dict[str, str]:
    wf = load_workflow(path)
    state = WorkflowState(wf.state_path, wf.path.name)
    return {name: state.get(name).status for name in wf.steps}


def scores(folder: Path, sample: int) -> dict[str, float]:
    record = json.loads((folder / "out" / f"scores{sample}.json").read_text())
    return {k: v for k, v in record.items() if k not in ("pred", "labels")}


def test_killed_run_rerun_skips_finished_steps_and_equals_an_uninterrupted_run(tmp_path, capsys):
    whole = make_workflow(tmp_path / "whole")
    assert run_workflow(whole, progress=False, log=lambda _: None).ok

    killed = make_workflow(tmp_path / "killed")
    state_file = killed.with_suffix(".state.json")
    env = {**os.environ, "ZNN_FFTW_PLANNER": "FFTW_ESTIMATE", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "znn.cli", "run", str(killed), "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state_file.exists() and state_file.read_text().count('"done"') >= 2:  # train, forward[0]
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = statuses(killed)
    assert at_kill["train"] == at_kill["forward[0]"] == "done"
    assert at_kill["evaluate[1]"] != "done", "the run finished before it could be killed; make the volumes larger"
    checkpoint = tmp_path / "killed" / "out" / "net_current.h5"
    stamp = checkpoint.stat().st_mtime_ns

    main(["status", str(killed)])
    table = capsys.readouterr().out
    assert "train" in table and ("interrupted" in table or "pending" in table)

    assert main(["run", str(killed), "--quiet"]) == 0
    err = capsys.readouterr().err
    for step in ("train", "forward[0]"):
        assert [line.endswith(", skipped") for line in err.splitlines() if line.startswith(f"{step}: done at ")] \
            == [True]
        assert f"{step}: {step.split('[')[0]} started" not in err
    assert checkpoint.stat().st_mtime_ns == stamp
    assert set(statuses(killed).values()) == {"done"}
    for sample in (1, 2):
        for name in ("whole", "killed"):
            assert (tmp_path / name / "out" / f"pred_sample{sample}_output.zarr").is_dir()
        a = read_volume(f"{tmp_path}/whole/out/pred_sample{sample}_output.zarr/output")
        b = read_volume(f"{tmp_path}/killed/out/pred_sample{sample}_output.zarr/output")
        np.testing.assert_array_equal(a, b)
        assert scores(tmp_path / "whole", sample) == scores(tmp_path / "killed", sample)


def _forward_only(folder: Path, labels2: str) -> Path:
    """A workflow without training (a saved random network), with an evaluation that needs both others."""
    make_workflow(folder)
    save_checkpoint(folder / "out" / "net_current.h5", Network.initialise(load_network(folder / "net.znn"), seed=1))
    text = WORKFLOW.replace("  train: {run: train, job: job.cfg}\n", "").replace("    needs: [train]\n", "")
    text = text.replace("labels: big{sample}-labels.tif", 'labels: "{labels}"')
    text = text.replace("over: [{sample: 1}, {sample: 2}]",
                        f"over: [{{sample: 1, labels: big1-labels.tif}}, {{sample: 2, labels: {labels2}}}]")
    text += ("  again:\n    run: evaluate\n    needs: [evaluate]\n    pred: out/pred_sample1_output.zarr/output\n"
             "    labels: big1-labels.tif\n    out: out/again.json\n    threshold: 0.4\n")
    path = folder / "workflow.yaml"
    path.write_text(text)
    return path


def test_a_failed_step_blocks_its_dependants_and_a_rerun_after_the_fix_runs_only_those(tmp_path, capsys):
    path = _forward_only(tmp_path, "missing-labels.tif")
    assert main(["run", str(path), "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert "1 step(s) failed: evaluate[1]; blocked: again" in err and "run `znn run" in err
    assert "missing-labels.tif" in out  # the table's detail column names the cause
    assert statuses(path) == {"forward[0]": "done", "forward[1]": "done", "evaluate[0]": "done",
                              "evaluate[1]": "failed", "again": "blocked"}
    main(["status", str(path)])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["step", "kind", "status", "needs", "time", "detail"]
    assert [line.split()[:4] for line in table[1:] if line.startswith("again")] == [
        ["again", "evaluate", "blocked", "evaluate"]]

    os.link(tmp_path / "big2-labels.tif", tmp_path / "missing-labels.tif")  # the fix
    assert main(["run", str(path), "--quiet"]) == 0
    err = capsys.readouterr().err
    ran = [line.split(":")[0] for line in err.splitlines() if line.endswith(" started")]
    assert ran == ["evaluate[1]", "again"]
    assert set(statuses(path).values()) == {"done"}

    # A changed definition reruns that step (and whatever needs it), nothing else.
    path.write_text(path.read_text().replace("threshold: 0.4", "threshold: 0.3"))
    main(["run", str(path), "--quiet"])
    err = capsys.readouterr().err
    assert [line.split(":")[0] for line in err.splitlines() if line.endswith(" started")] == ["again"]
    assert json.loads((tmp_path / "out" / "again.json").read_text())["threshold"] == 0.3


def test_independent_steps_run_in_parallel_and_failures_block_only_dependants(tmp_path, monkeypatch):
    (tmp_path / "wf.yaml").write_text(
        "parallel: 2\nsteps:\n"
        "  a: {run: evaluate, pred: p, labels: l, out: a.json}\n"
        "  b: {run: evaluate, pred: p, labels: l, out: b.json}\n"
        "  c: {run: evaluate, needs: [a], pred: p, labels: l, out: c.json}\n"
        "  d: {run: evaluate, needs: [b], pred: p, labels: l, out: d.json}\n")
    both = threading.Barrier(2, timeout=10)

    def fake(step, scheduler, progress, log):
        if step.name in ("a", "b"):
            both.wait()  # a and b run at the same time, or this times out
        if step.name == "a":
            raise ValueError("boom")

    monkeypatch.setitem(workflow_cli.RUNNERS, "evaluate", fake)
    summary = run_workflow(tmp_path / "wf.yaml", scheduler="tcp://127.0.0.1:1", log=lambda _: None)
    assert (summary.failed, summary.blocked, sorted(summary.done)) == (["a"], ["c"], ["b", "d"])
    state = WorkflowState(tmp_path / "wf.state.json", "wf.yaml")
    assert state.get("a").error == "ValueError: boom" and state.get("c").error == "a did not finish"


@contextlib.contextmanager
def lock_held_elsewhere(path):
    """Hold the run lock at ``path`` in another thread (as another run would) until the block ends."""
    taken, done = threading.Event(), threading.Event()

    def hold():
        with RunLock(path, "another run"):
            taken.set()
            done.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    assert taken.wait(30)
    try:
        yield
    finally:
        done.set()
        thread.join()


def test_a_second_run_of_the_same_workflow_is_refused(tmp_path):
    path = tmp_path / "wf.yaml"
    path.write_text("steps:\n  a: {run: evaluate, pred: p, labels: l, out: a.json}\n")
    with lock_held_elsewhere(tmp_path / "wf.state.lock"):  # the lock is re-entrant within one thread
        assert RunLock.held(tmp_path / "wf.state.lock")
        with pytest.raises(OutputBusyError, match=r"workflow .*wf.yaml is in use by another run \(pid \d+ on host"):
            run_workflow(path, log=lambda _: None)
    assert not RunLock.held(tmp_path / "wf.state.lock")


# ------------------------------------------------------------------------------------------- file checks
TRAIN = "steps:\n  train: {run: train, job: job.cfg}\n"
BAD = {
    "unknown top key": ("step:\n  a: {run: train, job: job.cfg}\n", r"wf.yaml:1: unknown key 'step'; did you mean "
                                                                     r"'steps'\?"),
    "unknown step key": (TRAIN + "  fwd: {run: forward, job: job.cfg, neds: [train]}\n",
                         r"wf.yaml:3: step 'fwd': unknown key 'neds' for a forward step; did you mean 'needs'\?"),
    "unknown kind": ("steps:\n  a: {run: forwrd, job: job.cfg}\n", r"step 'a': run 'forwrd' .*did you mean 'forward'"),
    "no run": ("steps:\n  a: {job: job.cfg}\n", r"wf.yaml:2: step 'a': has no `run:`"),
    "missing key": ("steps:\n  a: {run: evaluate, pred: p.zarr}\n", r"step 'a': a evaluate step needs key 'labels'"),
    "unknown need": (TRAIN + "  fwd: {run: forward, job: job.cfg, needs: [trian]}\n",
                     r"step 'fwd': needs: no step 'trian'; did you mean 'train'\?"),
    "cycle": ("steps:\n  a: {run: train, job: job.cfg, needs: [c]}\n  b: {run: train, job: job.cfg, needs: [a]}\n"
              "  c: {run: train, job: job.cfg, needs: [b]}\n", r"cycle: a -> c -> b -> a"),
    "self need": ("steps:\n  a: {run: train, job: job.cfg, needs: [a]}\n", "cannot need itself"),
    "bad value": ("steps:\n  a: {run: train, job: job.cfg, max_iter: -3}\n",
                  r"wf.yaml:2: step 'a': max_iter -3: expected an integer >= 0"),
    "bad choice": ("steps:\n  a: {run: forward, job: job.cfg, transform: softmx}\n", "did you mean 'softmax'"),
    "unknown job key": ("steps:\n  a: {run: forward, job: job.cfg, set: {forward_rnge: 2}}\n",
                        r"set .*'forward_rnge' is not a job key; did you mean 'forward_range'\?"),
    "bad job value": ("steps:\n  a: {run: forward, job: job.cfg, set: {forward_range: x}}\n",
                      r"wf.yaml:2: step 'a': job \(with the step's `set:` keys\): .*forward_range"),
    "unbound placeholder": ("steps:\n  a: {run: forward, job: '{cfg}.cfg', over: [{config: job}]}\n",
                            r"step 'a\[0\]': job: placeholder \{cfg\} is not bound by `over:`; did you mean 'config'"),
    "empty over": ("steps:\n  a: {run: train, job: job.cfg, over: []}\n", "over: expected a non-empty list"),
    "bad name": ("steps:\n  'a[1]': {run: train, job: job.cfg}\n", "a step name is letters"),
    "bad scheduler": ("scheduler: sometimes\n" + TRAIN, r"wf.yaml:1: scheduler = 'sometimes' is not a scheduler"),
    "duplicate key": ("steps:\n  a: {run: train, job: job.cfg}\n  a: {run: train, job: job.cfg}\n",
                      r"wf.yaml:3: key 'a' appears twice \(first on line 2\)"),
    "alias": ("steps:\n  a: &x {run: train, job: job.cfg}\n  b: *x\n", r"wf.yaml:3: YAML aliases"),
    "syntax": ("steps:\n  a: {run: train\n", r"wf.yaml:\d+: not a valid YAML workflow"),
    "not a mapping": ("- train\n- forward\n", r"wf.yaml: not a workflow; a workflow is a YAML mapping"),
    "python tag": ("steps: !!python/object/apply:os.system ['touch pwned']\n",
                   r"wf.yaml:1: not a valid YAML workflow: .*no tags"),
    "python name": ("steps:\n  a: {run: !!python/name:os.system train, job: job.cfg}\n", r"no tags"),
}


@pytest.mark.parametrize("case", BAD)
def test_malformed_workflows_are_refused_with_the_place_and_the_fix(tmp_path, case):
    (tmp_path / "job.cfg").write_text("[parameters]\nforward_range = 1\n")
    text, message = BAD[case]
    (tmp_path / "wf.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):  # WorkflowError, or the job file's ConfigError
        load_workflow(tmp_path / "wf.yaml")
    assert not (tmp_path / "pwned").exists()


def test_missing_binary_and_state_files(tmp_path, capsys):
    (tmp_path / "wf.yaml").write_text(TRAIN)
    with pytest.raises(ZnnFileNotFoundError, match=r"wf.yaml:2: step 'train': job: .*job.cfg: job file .* not found"):
        load_workflow(tmp_path / "wf.yaml")
    with pytest.raises(ZnnFileNotFoundError, match="workflow file not found"):
        load_workflow(tmp_path / "nope.yaml")
    (tmp_path / "png.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    with pytest.raises(WorkflowError, match="png.yaml: not a text YAML workflow file"):
        load_workflow(tmp_path / "png.yaml")
    (tmp_path / "job.cfg").write_text("[parameters]\n")
    (tmp_path / "wf.state.json").write_text("{not json")
    with pytest.raises(WorkflowError, match="wf.state.json: not a workflow state file .* delete it"):
        run_workflow(tmp_path / "wf.yaml", log=lambda _: None)
    assert main(["status", str(tmp_path / "wf.yaml")]) == 2
    assert "znn status: error: " in capsys.readouterr().err
