"""A memory budget (``--memory``, a workflow step's ``memory:``) larger than the machine has is planned for what
the machine has, with one line that says so: a block planned for memory that is not there gets the run killed by
the kernel. The machine's available memory is faked, so these tests mean the same on every machine."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from tests.shared import ROOT
from znn import environment
from znn.io.checkpoint import save_checkpoint
from znn.io.config import load_job
from znn.io.netfile import load_network
from znn.io.volume import write_volume
from znn.network import Network

TINY3D = ROOT / "workflows" / "inference" / "tiny3d.znn"
AVAILABLE = 4 << 30
CAP = int(AVAILABLE * 0.9)  # what the planner may take: available less 10%
MORE = 100 * 10**9  # 100GB, more than the faked machine has


@pytest.fixture
def small_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(environment, "available_memory", lambda: AVAILABLE, raising=False)


@pytest.fixture
def job(tmp_path: Path) -> Path:
    net = Network.initialise(load_network(TINY3D), seed=3)
    vol = np.random.default_rng(4).integers(0, 200, (8, 16, 16), dtype=np.uint8)
    write_volume(tmp_path / "vol.h5", vol, overwrite=True)
    save_checkpoint(tmp_path / "net.h5", net)
    (tmp_path / "data.spec").write_text("[image1]\nfnames = vol.h5\npp_types = standard3D\n\n[sample1]\ninput = 1\n")
    values = {"fdata_spec": "data.spec", "forward_net": "net.h5", "forward_range": "1", "forward_outsz": "4,8,8",
              "output_prefix": "out/run", "is_bd_mirror": "yes", "num_threads": "2", "scheduler": "threads"}
    path = tmp_path / "job.cfg"
    path.write_text("[parameters]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
    return path


def _notes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "more than this machine" in r.getMessage()]


def test_znn_plan_with_more_memory_than_the_machine_plans_for_the_machine(small_machine, job, capsys, caplog):
    from znn.cli import main

    caplog.set_level(logging.WARNING)
    assert main(["plan", str(job), "--memory", "100GB"]) == 0
    out = capsys.readouterr().out
    assert "budget 3.6 GiB = baseline" in out, out
    assert _notes(caplog) == ["memory 93.1 GiB is more than this machine can give: 4.0 GiB available less 10%; "
                              "planning for 3.6 GiB"]


def test_plan_job_budget_is_the_cap_and_a_smaller_budget_is_kept(small_machine, job, caplog):
    from znn.pipeline.jobs.forward import plan_job

    caplog.set_level(logging.WARNING)
    assert plan_job(load_job(job), MORE).budget == CAP
    assert len(_notes(caplog)) == 1
    caplog.clear()
    smaller = CAP - (64 << 20)  # below the cap, above what the test process may hold by then (the plan's baseline)
    assert plan_job(load_job(job), smaller).budget == smaller
    assert plan_job(load_job(job), None).budget == CAP  # the default is the cap
    assert _notes(caplog) == []


def test_forward_job_memory_key_is_capped_too(small_machine, job, caplog):
    """What a workflow's ``memory:`` and ``znn forward --memory`` hand to :func:`forward_job`."""
    from znn.pipeline.jobs.forward import forward_job

    caplog.set_level(logging.WARNING)
    budgets: list[int] = []
    forward_job(load_job(job), memory=MORE, progress=False,
                on_setup=lambda setup: budgets.append(setup.plan.budget if setup.plan else -1))
    assert budgets == [CAP]
    assert len(_notes(caplog)) == 1


def test_the_cap_is_shared_by_a_local_clusters_workers_and_not_applied_to_a_remote_one(small_machine):
    from znn.pipeline.jobs.forward import capped_memory

    budget, note = capped_memory(MORE, "local", 2)
    assert budget == CAP // 2
    assert note == ("memory 93.1 GiB per worker process x 2 workers is more than this machine can give: 4.0 GiB "
                    "available less 10%; planning for 1.8 GiB per worker process")
    assert capped_memory(CAP // 2 + 1, "threads", 2) == (CAP // 2 + 1, None)  # all of it for one process
    assert capped_memory(MORE, "tcp://10.0.0.1:8786", 2) == (MORE, None)  # its machines are not this one
    assert capped_memory(None, "local", 2) == (CAP // 2, None)


def test_unknown_available_memory_leaves_the_budget_as_given(monkeypatch):
    from znn.pipeline.jobs.forward import capped_memory

    monkeypatch.setattr(environment, "available_memory", lambda: 0)
    assert capped_memory(MORE, "threads", 2) == (MORE, None)
    assert capped_memory(None, "threads", 2) == (8 << 30, None)


def test_available_memory_reads_meminfo_through_proc_bytes(monkeypatch):
    monkeypatch.setattr(environment, "proc_bytes", lambda path, key: 7 << 30 if key == "MemAvailable" else 0)
    assert environment.available_memory() == 7 << 30
