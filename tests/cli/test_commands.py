"""Every `znn` command: `--help` works, and a user's mistake ends in one line on stderr with exit status 2 (no
traceback), whether argparse or the job finds it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from znn.cli import main

ROOT = Path(__file__).resolve().parents[2]

COMMANDS = ["describe", "train", "quickstart", "forward", "plan", "segment", "evaluate", "run", "status", "bench",
            "bench ops", "bench net", "bench forward", "bench scaling", "bench train"]

# one mistake per command: a missing file, a bad z,y,x, a bad memory size, a bad number
MISTAKES = {
    "describe": ["describe", "missing.znn"],
    "train": ["train", "missing.cfg"],
    "quickstart": ["quickstart", "--minutes", "abc"],
    "forward": ["forward", "job.cfg", "--outsz", "1,2"],
    "plan": ["plan", "job.cfg", "--memory", "8XB"],
    "segment": ["segment", "missing-pred.tif", "seg.zarr"],
    "evaluate": ["evaluate", "missing-pred.tif", "missing-labels.tif"],
    "run": ["run", "missing.yaml"],
    "status": ["status", "missing.yaml"],
    "bench ops": ["bench", "ops", "--outsz", "1,2"],
    "bench net": ["bench", "net", "missing.znn", "--outsz", "1,1,1"],
    "bench forward": ["bench", "forward", "--memory", "8XB"],
    "bench scaling": ["bench", "scaling", "--workers", "0"],
    "bench train": ["bench", "train", "missing.znn", "--outsz", "1,1,1"],
}


def _exit_status(argv: list[str]) -> int | str | None:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse ends --help and its own errors this way
        return exc.code


@pytest.mark.parametrize("command", COMMANDS)
def test_help_exits_0(command, capsys):
    assert _exit_status([*command.split(), "--help"]) == 0
    assert "usage: znn " + command in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(MISTAKES))
def test_a_mistake_is_one_line_and_status_2(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the files named do not exist here
    assert _exit_status(MISTAKES[command]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("znn ") and "error: " in lines[0], err
    assert "Traceback" not in err


def test_every_command_has_a_mistake_test():
    assert set(MISTAKES) == set(COMMANDS) - {"bench"}


def test_python_m_znn_cli_reports_a_missing_file_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "znn.cli", "describe", "missing.znn"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "znn describe: error: missing.znn: .znn network file not found; give the path of a .znn file"]
