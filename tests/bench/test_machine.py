"""Every `znn bench` names the machine its figures come from: CPU model, cores and SIMD level first in its output,
and a ``machine`` object in its JSON. The CPU's description is read from /proc/cpuinfo, faked here where the test
must not depend on this machine."""

from __future__ import annotations

import json
import platform

import pytest

from znn import environment
from znn.bench import forward, net, scaling
from znn.cli import main

XEON = """processor\t: 0
model name\t: Intel(R) Xeon(R) Gold 6248
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse4_2 avx avx2 avx512f

processor\t: 1
model name\t: Intel(R) Xeon(R) Gold 6248
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse4_2 avx avx2 avx512f

processor\t: 2
model name\t: Intel(R) Xeon(R) Gold 6248
physical id\t: 1
core id\t\t: 0
flags\t\t: fpu sse4_2 avx avx2 avx512f
"""


def _fake_cpuinfo(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    lines = [line.partition(":") for line in text.splitlines()]
    monkeypatch.setattr(environment, "_cpuinfo", lambda: [(k.strip(), v.strip()) for k, s, v in lines if s])


def test_isa_level_is_the_widest_simd_flag(monkeypatch):
    _fake_cpuinfo(monkeypatch, XEON)
    assert environment.isa_level() == "AVX-512"
    _fake_cpuinfo(monkeypatch, "flags : fpu sse4_2 avx avx2\n")
    assert environment.isa_level() == "AVX2"
    _fake_cpuinfo(monkeypatch, "Features : fp asimd evtstrm\n")  # ARM's /proc/cpuinfo
    assert environment.isa_level() == "NEON"
    _fake_cpuinfo(monkeypatch, "")  # no /proc/cpuinfo (macOS, Windows): the architecture
    assert environment.isa_level() == (platform.machine() or "unknown")


def test_physical_cores_leave_hyperthreads_out(monkeypatch):
    _fake_cpuinfo(monkeypatch, XEON)  # two threads of one core of package 0, one core of package 1
    assert environment.physical_cores() == 2
    _fake_cpuinfo(monkeypatch, "processor : 0\nprocessor : 1\n")  # a kernel that leaves the ids out
    assert environment.physical_cores() is None


def _header_and_json(capsys: pytest.CaptureFixture[str], path) -> tuple[str, dict]:
    first = capsys.readouterr().out.splitlines()[0]
    return first, json.loads(path.read_text())


def _check(first: str, payload: dict) -> None:
    m = environment.machine()
    assert first.startswith("machine: ") and m["cpu"] in first and m["isa"] in first
    assert f"{m['logical_cores']} logical cores" in first
    assert payload["machine"] == json.loads(json.dumps(m))


def test_bench_ops_header_and_json_name_the_machine(tmp_path, capsys):
    out = tmp_path / "ops.json"
    assert main(["bench", "ops", "--layers", "2d_10", "--outsz2d", "1,8,8", "--repeat", "1", "--no-torch",
                 "--modes", "direct", "--json", str(out)]) == 0
    first, payload = _header_and_json(capsys, out)
    _check(first, payload)
    assert payload["rows"][0]["layer"] == "2d_10"


def test_bench_net_forward_and_scaling_name_the_machine(tmp_path, capsys, monkeypatch):
    """The commands' wiring (the benchmarks themselves are replaced: their tests run them)."""
    monkeypatch.setattr(net, "run_net_bench", lambda request, progress: {"steps": 1})
    monkeypatch.setattr(net, "format_report", lambda report: "report")
    for module, name in ((forward, "run_forward_bench"), (scaling, "run_scaling_bench")):
        monkeypatch.setattr(module, name, lambda request, progress=None: [{"a": 1}])
        monkeypatch.setattr(module, "format_table", lambda rows: "table")
    commands = {"net": ["net", "workflows/inference/tiny3d.znn", "--outsz", "1,1,1"],
                "forward": ["forward", "--nets", "tiny3d", "--scheduler", "threads"],
                "scaling": ["scaling", "--scheduler", "tcp://10.1.2.3:8786"]}
    for name, argv in commands.items():
        out = tmp_path / f"{name}.json"
        assert main(["bench", *argv, "--json", str(out)]) == 0, name
        first, payload = _header_and_json(capsys, out)
        _check(first, payload)
        assert ("steps" in payload) if name == "net" else (payload["rows"] == [{"a": 1}])
        assert ("other machines" in first) == (name == "scaling")  # a cluster's workers may be elsewhere
