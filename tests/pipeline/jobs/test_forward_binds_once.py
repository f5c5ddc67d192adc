"""One `znn forward` reads its sample file once and binds each sample to the network's nodes once: planning, the
place checks and the output metadata all read the same bound sample (issue #22)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.pipeline.jobs.test_outputs import FORWARD_SPEC, forward_job
from znn.cli import main
from znn.io import ngff, sample_nodes, specfile
from znn.pipeline.jobs import forward

# test_outputs' one sample, and a second on the tiny test volume
TWO_SAMPLES = FORWARD_SPEC.format(raw="train-raw.tif") + "\n[image2]\nfnames = test-raw.tif\n\n[sample2]\ninput = 2\n"


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How often a forward run parses a sample file, binds a sample, checks a section's files and hashes a file
    (the network and checkpoint, for the outputs' provenance)."""
    seen: Counter[str] = Counter()

    def counted(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            seen[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(specfile, "_spec", counted("parse spec", specfile._spec))  # load_spec and parse_spec
    bind = counted("bind sample", sample_nodes.bind_sample)
    for module in (sample_nodes, forward):  # wherever forward finds it, imported at the top or when called
        monkeypatch.setattr(module, "bind_sample", bind, raising=False)
    monkeypatch.setattr(specfile.VolumeSet, "check_files", counted("check files", specfile.VolumeSet.check_files))
    monkeypatch.setattr(ngff, "file_sha256", counted("hash file", ngff.file_sha256))
    return seen


def _run(job: Path) -> None:
    assert main(["forward", str(job), "--quiet"]) == 0


def test_one_sample_is_read_and_bound_once(tmp_path, calls):
    _run(forward_job(tmp_path))
    assert calls == {"parse spec": 1, "bind sample": 1, "check files": 1, "hash file": 2}


def test_two_samples_read_the_spec_once_and_bind_each_once(tmp_path, calls):
    job = forward_job(tmp_path, forward_range="1,2")
    (tmp_path / "forward.spec").write_text(TWO_SAMPLES)
    _run(job)
    assert calls == {"parse spec": 1, "bind sample": 2, "check files": 2, "hash file": 2}
    assert (tmp_path / "out" / "pred_sample2_output.zarr").is_dir()
