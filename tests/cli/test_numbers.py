"""The numbers of the command line and of workflow steps are finite and in range, said in one line naming the
option (exit status 2) before any work starts."""

from __future__ import annotations

import pytest

from tests.pipeline.train.test_train import make_job
from znn.cli import main
from znn.errors import WorkflowError
from znn.pipeline.jobs.workflow import load_workflow

MISTAKES = [
    (["train", "JOB", "--minutes", "nan"], "argument --minutes: nan is not a finite number"),
    (["train", "JOB", "--minutes", "inf"], "argument --minutes: inf is not a finite number"),
    (["train", "JOB", "--minutes", "0"], "argument --minutes: 0 is not > 0"),
    (["train", "JOB", "--minutes", "-2"], "argument --minutes: -2 is not > 0"),
    (["train", "JOB", "--max-iter", "-1"], "argument --max-iter: -1 is not >= 0"),
    (["quickstart", "--out", "JOB", "--minutes", "nan"], "argument --minutes: nan is not a finite number"),
    (["quickstart", "--out", "JOB", "--max-iter", "-5"], "argument --max-iter: -5 is not >= 0"),
    (["bench", "net", "JOB", "--outsz", "1,1,1", "--eta", "nan"], "argument --eta: nan is not a finite number"),
    (["bench", "ops", "--max-direct-gflop", "nan"], "argument --max-direct-gflop: nan is not a finite number"),
    (["bench", "forward", "--time-cap", "nan"], "argument --time-cap: nan is not a finite number"),
    (["bench", "forward", "--time-cap", "0"], "argument --time-cap: 0 is not > 0"),
    (["forward", "JOB", "--pyramid", "many"], "argument --pyramid: 'many' is not no, auto or a number of levels"),
    (["forward", "JOB", "--pyramid", "99"], "argument --pyramid: 99 levels: give 1 to 16"),
    (["forward", "JOB", "--pyramid", "-1"], "argument --pyramid: -1 levels: give 1 to 16"),
]


@pytest.mark.parametrize("argv, says", MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_cli_numbers_are_finite_and_in_range(tmp_path, capsys, argv, says):
    job = make_job(tmp_path)  # a valid job: only the number is wrong (quickstart's --out is this file: no run)
    argv = [str(job) if a == "JOB" else a for a in argv]
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [".nan", ".inf", "0", "-1"])
def test_workflow_minutes_are_finite_and_positive(tmp_path, value):
    make_job(tmp_path)
    (tmp_path / "wf.yaml").write_text(f"steps:\n  train: {{run: train, job: job.cfg, minutes: {value}}}\n")
    with pytest.raises(WorkflowError, match=r"wf\.yaml:2: .*minutes.*a finite number > 0"):
        load_workflow(tmp_path / "wf.yaml")
