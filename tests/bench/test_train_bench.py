"""`znn bench train`: rows per replica count from real local clusters, with the JSON keys the issue names."""

from __future__ import annotations

import json

from tests.pipeline.train.test_engine import TWO_INPUTS
from znn.cli import main


def test_bench_train_rows_and_json(tmp_path, capsys):
    network = tmp_path / "two.znn"
    network.write_text(TWO_INPUTS)
    out = tmp_path / "train.json"
    assert main(["bench", "train", str(network), "--outsz", "1,4,5", "--replicas", "1", "2", "--steps", "2",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("machine: ") and "samples/s" in printed and "bytes/step" in printed
    document = json.loads(out.read_text())
    rows = document["rows"]
    assert "cpu" in document["machine"] and [r["replicas"] for r in rows] == [1, 2]
    for row in rows:
        assert row["samples_s"] > 0 and row["bytes_per_step"] > 0 and 0 <= row["comm_s"] <= row["step_s"]
    assert rows[1]["bytes_per_step"] > rows[0]["bytes_per_step"]  # two workers get the weights, two send grads
