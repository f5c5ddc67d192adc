"""The NaN stop of training names the last checkpoint that exists (with its iteration), or says there is none."""

from __future__ import annotations

import re

import pytest

from tests.pipeline.train.test_train import make_job, run
from znn.errors import TrainingError


def test_a_nan_before_the_first_save_says_there_is_no_checkpoint(tmp_path):
    job = make_job(tmp_path, eta="1e30", cost_fn="square_loss", Num_iter_per_save="1000", Max_iter="20",
                   momentum="0")
    with pytest.raises(TrainingError) as info:
        run(job)
    message = str(info.value)
    assert "no checkpoint was saved yet" in message and "net_current.h5 does not exist" in message, message
    assert not (tmp_path / "out" / "net_current.h5").exists()


def test_a_nan_after_a_save_names_the_checkpoint_and_its_iteration(tmp_path):
    run(make_job(tmp_path, Max_iter="3"))
    job = make_job(tmp_path, eta="1e30", cost_fn="square_loss", Num_iter_per_save="1", Max_iter="20", momentum="0")
    with pytest.raises(TrainingError) as info:
        run(job)
    message = str(info.value)
    step = int(re.match(r"step (\d+): ", message).group(1))
    assert f"the last checkpoint is {tmp_path / 'out' / 'net_current.h5'} (iteration {step - 1})" in message
