"""The property of the integrity issue over generated jobs: a small valid forward, training or evaluate job, mutated
at random (outputs pointed at inputs, at folders, at files, under a file, at a place that refuses writes; odd
numbers; missing samples and files; a trailing slash), run through ``znn.cli.main``, either succeeds (exit 0) or
exits 2 with one line on stderr naming a file or key; never a traceback or another exit status; and the bytes of
every input (volumes, spec, job, network, checkpoint) are the same afterwards."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.pipeline.train.test_train import BASE, NET2D
from tests.pipeline.train.test_train import SPEC as TRAIN_SPEC
from tests.shared import ROOT
from znn.cli import main
from znn.io.checkpoint import save_checkpoint
from znn.io.netfile import load_network
from znn.io.volume import read_volume, write_volume
from znn.network import Network
from znn.pipeline.jobs.synthetic import EMStyle, boundary_labels, synthetic_em

TINY3D = ROOT / "workflows" / "inference" / "tiny3d.znn"
# A place no run may write in, even as root (a chmod 0o555 folder still takes root's files).
REFUSES_WRITES = "/sys/znn-job-mutations"
# Most mutated jobs stop at their first check, so 100 examples per kind take about 20 s; the same examples every
# run. ZNN_MUTATIONS=500 draws that many fresh ones (a longer hunt, by hand).
HUNT = os.environ.get("ZNN_MUTATIONS")
PROPERTY = settings(max_examples=int(HUNT or 100), deadline=None, derandomize=not HUNT, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

FORWARD_SPEC = "[image1]\nfnames = {image}\npp_types = standard3D\n\n[sample1]\ninput = 1\n"
FORWARD_KEYS = {"fdata_spec": "data.spec", "forward_net": "net.h5", "forward_range": "1", "forward_outsz": "2,5,5",
                "output_prefix": "out/run", "is_bd_mirror": "yes", "num_threads": "2", "scheduler": "synchronous"}
TRAIN_KEYS = {**BASE, "Max_iter": "2", "Num_iter_per_show": "1", "Num_iter_per_test": "2", "test_num": "1",
              "Num_iter_per_save": "2", "is_data_aug": "no"}


@dataclass
class Case:
    """One generated job: its folder, job keys, data spec text, arguments, and the names of its inputs."""

    kind: str  # forward, train or evaluate
    folder: Path
    keys: dict[str, str] = field(default_factory=dict)
    spec: str = ""
    arguments: list[str] = field(default_factory=list)  # evaluate: PRED LABELS; the others: after the job file
    options: dict[str, str] = field(default_factory=dict)  # command-line options: --flag -> value
    inputs: set[str] = field(default_factory=set)  # files and stores (relative to folder) that must stay as they are

    def path(self, name: str) -> Path:
        return self.folder / name

    def write(self) -> None:
        if self.kind != "evaluate":
            self.path("data.spec").write_text(self.spec)
            lines = ["[parameters]"] + [f"{k} = {v}" for k, v in self.keys.items()]
            self.path("job.cfg").write_text("\n".join(lines) + "\n")

    def argv(self) -> list[str]:
        options = [part for flag, value in self.options.items() for part in (flag, value)]
        if self.kind == "evaluate":
            return ["evaluate", *self.arguments, *options]
        return [self.kind, str(self.path("job.cfg")), "--quiet", *options]

    def names(self) -> set[str]:
        """What an error may name: the job's keys, options, and every path it was given (or a part of one)."""
        words = set(self.keys) | set(self.options) | {"job.cfg", "data.spec", self.kind}
        for value in [*self.keys.values(), *self.options.values(), *self.arguments, *self.spec.split()]:
            words |= {part for part in Path(value).parts if len(part) > 1}
        return words


# --- the valid jobs, built once and copied for each example -------------------------------------------------------

def _forward_template(folder: Path) -> None:
    volume = np.random.default_rng(0).integers(0, 255, (4, 8, 8), dtype=np.uint8)
    write_volume(folder / "vol.h5", volume)
    write_volume(folder / "vol.zarr", volume)
    save_checkpoint(folder / "net.h5", Network.initialise(load_network(TINY3D), seed=1))


def _train_template(folder: Path) -> None:
    for name, seed in (("train", 1), ("test", 2)):
        raw, seg = synthetic_em((2, 16, 16), seed, EMStyle(cell_size=8.0, cells="columns"))
        write_volume(folder / f"{name}-raw.tif", raw)
        write_volume(folder / f"{name}-labels.tif", boundary_labels(seg))
    (folder / "net.znn").write_text(NET2D.format(outputs=2))
    save_checkpoint(folder / "seed.h5", Network.initialise(load_network(folder / "net.znn"), seed=2))


def _evaluate_template(folder: Path) -> None:
    write_volume(folder / "pred.tif", np.random.default_rng(3).random((2, 12, 12), dtype=np.float32))
    labels = np.zeros((2, 12, 12), np.uint32)
    labels[:, :, :6], labels[:, :, 7:] = 1, 2
    write_volume(folder / "labels.tif", labels)
    write_volume(folder / "mask.tif", np.ones((2, 12, 12), np.uint8))


TEMPLATES: dict[str, Callable[[Path], None]] = {
    "forward": _forward_template, "train": _train_template, "evaluate": _evaluate_template}


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    made = {}
    for kind, build in TEMPLATES.items():
        made[kind] = tmp_path_factory.mktemp(f"template-{kind}")
        build(made[kind])
    return made


def _valid_case(kind: str, folder: Path) -> Case:
    if kind == "forward":
        return Case(kind, folder, dict(FORWARD_KEYS), FORWARD_SPEC.format(image="vol.h5"),
                    inputs={"job.cfg", "data.spec", "net.h5", "vol.h5"})  # vol.zarr: when a mutation reads it
    if kind == "train":
        return Case(kind, folder, dict(TRAIN_KEYS), TRAIN_SPEC.format(label_pp="binary_class"),
                    options={"--max-iter": "2"},
                    inputs={"job.cfg", "data.spec", "net.znn", "seed.h5", "train-raw.tif", "train-labels.tif",
                            "test-raw.tif", "test-labels.tif"})
    return Case(kind, folder, arguments=[str(folder / "pred.tif"), str(folder / "labels.tif")],
                options={"--json": str(folder / "scores.json")}, inputs={"pred.tif", "labels.tif"})


@contextlib.contextmanager
def fresh_case(kind: str, template: Path) -> Iterator[Case]:
    with tempfile.TemporaryDirectory(prefix=f"znn-mutation-{kind}-") as tmp:
        folder = Path(tmp) / "job"
        shutil.copytree(template, folder)
        try:
            yield _valid_case(kind, folder)
        finally:
            for root, dirs, _ in os.walk(folder):  # undo a mutation's chmod so that the folder can be removed
                for name in dirs:
                    os.chmod(Path(root) / name, 0o755)


# --- mutations: each changes the case (and its folder) given a drawn number -----------------------------------------

def _copy(case: Case, source: str, name: str) -> None:
    src, dst = case.path(source), case.path(name)
    if dst.exists():  # drawn twice
        return
    shutil.copytree(src, dst) if src.is_dir() else shutil.copyfile(src, dst)
    case.inputs.add(name)


def set_image(case: Case, name: str) -> None:
    """The (first) sample's image is read from ``name``."""
    case.spec = re.sub(r"fnames = \S+", f"fnames = {name}", case.spec, count=1)


def set_output(case: Case, value: str) -> None:
    """Point the job's output (its prefix, or evaluate's --json) at ``value``, relative to the job folder."""
    if case.kind == "evaluate":
        case.options["--json"] = value if value.startswith("/") else str(case.path(value))
    else:
        case.keys["output_prefix" if case.kind == "forward" else "train_net_prefix"] = value


def output_onto_input(case: Case, which: int) -> None:
    """An input lives exactly where the job's output goes: the same file, or the same store."""
    if case.kind == "forward":
        fmt, source = [("h5", "vol.h5"), ("zarr", "vol.zarr"), ("tif", "")][which % 3]
        name = f"alias_sample1_output.{fmt}"
        if source:
            _copy(case, source, name)
        elif not case.path(name).exists():
            write_volume(case.path(name), np.ones((4, 8, 8), np.uint8))
            case.inputs.add(name)
        set_image(case, name)
        case.keys.update(output_prefix="alias", output_format=fmt)
    elif case.kind == "train" and which % 2:
        _copy(case, "seed.h5", "alias_current.h5")  # the checkpoint it would resume from and overwrite is --seed
        case.options["--seed"] = str(case.path("alias_current.h5"))
        case.keys["train_net_prefix"] = "alias"
    elif case.kind == "train":
        if not case.path("alias_current.h5").exists():
            write_volume(case.path("alias_current.h5"), read_volume(str(case.path("train-raw.tif"))))
        case.inputs.add("alias_current.h5")
        set_image(case, "alias_current.h5")
        case.keys["train_net_prefix"] = "alias"
    else:
        target = ["labels.tif", "pred.tif", "mask.tif"][which % 3]
        case.options["--mask"] = str(case.path("mask.tif"))
        case.inputs.add("mask.tif")
        set_output(case, target)


def _output_name(case: Case, prefix: str) -> str:
    if case.kind == "forward":
        return f"{prefix}_sample1_output.{case.keys.get('output_format', 'zarr')}"
    return f"{prefix}_current.h5" if case.kind == "train" else prefix


def output_at_folder(case: Case, which: int) -> None:
    """A folder is where the output file goes (or the prefix names a folder without the slash)."""
    if case.kind == "forward":
        case.keys["output_format"] = ["h5", "tif", "zarr"][which % 3]
    case.path(_output_name(case, "adir")).mkdir(exist_ok=True)
    set_output(case, "adir" if which % 2 or case.kind == "evaluate" else "adir/")


def output_at_file(case: Case, which: int) -> None:
    """A file that is none of the job's inputs is where the output goes: garbage, or an empty file."""
    if case.kind == "forward":
        case.keys["output_format"] = ["h5", "tif", "zarr"][which % 3]
    case.path(_output_name(case, "afile")).write_bytes(b"not a volume" * (which % 2))
    set_output(case, "afile")


def output_under_file(case: Case, which: int) -> None:
    """The output's parent (or a folder prefix) is a file."""
    parent = sorted(case.inputs)[which % len(case.inputs)]
    set_output(case, [f"{parent}/out", f"{parent}/", f"{parent}/deeper/out"][which % 3])


def output_refuses_writes(case: Case, which: int) -> None:
    """The output goes in a folder that refuses writes (chmod 0o555; root writes there anyway, /sys refuses)."""
    readonly = case.path("readonly")
    readonly.mkdir(exist_ok=True)
    readonly.chmod(0o555)
    set_output(case, ["readonly/out", "readonly/", f"{REFUSES_WRITES}/out", f"{REFUSES_WRITES}/"][which % 4])


def trailing_slash(case: Case, which: int) -> None:
    set_output(case, ["outdir/", "out/run/", "out//", "./"][which % 4])


NUMBER_KEYS = {
    "forward": ["forward_outsz", "num_threads", "--outsz", "--memory"],
    "train": ["eta", "momentum", "weight_decay", "anneal_factor", "Max_iter", "Num_iter_per_annealing",
              "Num_iter_per_show", "Num_iter_per_test", "test_num", "Num_iter_per_save", "train_outsz", "num_threads",
              "seed", "--max-iter", "--minutes"],
    "evaluate": ["--threshold"],
}
ODD_NUMBERS = ["nan", "inf", "-inf", "-1", "0", "1e308", "0.5", "1", "abc", "", "1e-300", "-0"]
ODD_TRIPLES = ["nan,5,5", "0,5,5", "-1,5,5", "5,5", "2,5,5,5", "1e9,5,5", "1000000,1000000,1000000", "auto", ""]
# Large counts are valid and only slow (a test of 1e20 patches, a 1e12 core pool): drawn where they are harmless.
HUGE = "100000000000000000000"
HUGE_IS_HARMLESS = {"eta", "momentum", "weight_decay", "anneal_factor", "Max_iter", "Num_iter_per_annealing",
                    "Num_iter_per_show", "Num_iter_per_test", "Num_iter_per_save", "seed", "--threshold", "--memory"}


def odd_number(case: Case, which: int) -> None:
    keys = NUMBER_KEYS[case.kind]
    key = keys[which % len(keys)]
    values = ODD_TRIPLES if key.endswith("outsz") else ODD_NUMBERS + ([HUGE] if key in HUGE_IS_HARMLESS else [])
    value = values[(which // len(keys)) % len(values)]
    if key == "--memory" and value and value[-1].isdigit():
        value += "GB"
    if key.startswith("--"):
        case.options[key] = value
    else:
        case.keys[key] = value


def missing_sample(case: Case, which: int) -> None:
    ranges = ["7", "1,9", "0", "", "x", "1-", "2-1"]
    value = ranges[which % len(ranges)]
    if case.kind == "forward":
        case.keys["forward_range"] = value
    elif case.kind == "train":
        case.keys["train_range" if which % 2 else "test_range"] = value
    else:
        case.arguments[which % 2] = str(case.path("absent.tif"))


def missing_or_wrong_input(case: Case, which: int) -> None:
    """An input file that is missing, a folder, or a file of another kind."""
    wrong = ["absent.h5", "vol.zarr" if case.kind == "forward" else "adir", "data.spec", "job.cfg"][which % 4]
    case.path("adir").mkdir(exist_ok=True)
    if case.kind == "forward":
        key = ["forward_net", "fdata_spec", "image"][which % 3]
    elif case.kind == "train":
        key = ["fnet_spec", "fdata_spec", "image", "--seed", "forward_net"][which % 5]
    else:
        key = ["pred", "labels", "--mask"][which % 3]
    if key == "image":
        set_image(case, wrong)
    elif key in ("pred", "labels"):
        case.arguments[0 if key == "pred" else 1] = str(case.path(wrong))
    elif key.startswith("--"):
        case.options[key] = str(case.path(wrong))
    else:
        case.keys[key] = wrong


MUTATIONS: list[Callable[[Case, int], None]] = [
    output_onto_input, output_at_folder, output_at_file, output_under_file, output_refuses_writes, trailing_slash,
    odd_number, missing_sample, missing_or_wrong_input]
mutation_lists = st.lists(st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 200)), min_size=1, max_size=3)


# --- the property ------------------------------------------------------------------------------------------------

def digest(path: Path) -> str:
    """The bytes of a file, or of every file of a store (names included); 'absent' when there is none."""
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if not path.is_dir():
        return "absent"
    total = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        total.update(str(file.relative_to(path)).encode() + b"\0" + file.read_bytes())
    return total.hexdigest()


def run_cli(argv: list[str]) -> tuple[int | str, str]:
    """The exit status of ``znn ARGV`` and its stderr; a traceback in place of the status when one escaped."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            status: int | str = main(argv)
        except SystemExit as exc:  # argparse's mistakes
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - whatever escaped is the failure to report
            status = traceback.format_exc()
    return status, stderr.getvalue()


def check_property(case: Case, mutations: list[tuple[Callable[[Case, int], None], int]]) -> None:
    for mutate, which in mutations:
        mutate(case, which)
    case.write()
    before = {name: digest(case.path(name)) for name in sorted(case.inputs)}
    status, stderr = run_cli(case.argv())
    story = f"znn {' '.join(case.argv())}\nkeys: {case.keys}\nspec: {case.spec!r}\nstderr: {stderr}"
    assert status in (0, 2), f"exit {status}\n{story}"
    if status == 2:
        # the notes a run prints on stderr (the network's FOV, the output block) may come before the error
        errors = [line for line in stderr.splitlines() if "error:" in line or "Traceback" in line]
        assert len(errors) == 1 and stderr.splitlines()[-1] == errors[0], f"not one error line, last\n{story}"
        assert errors[0].startswith(f"znn {case.kind}: error: "), story
        assert any(word in errors[0] for word in case.names()), f"names no file or key\n{story}"
    after = {name: digest(case.path(name)) for name in sorted(case.inputs)}
    assert after == before, f"an input changed: {[n for n in before if before[n] != after[n]]}\n{story}"


@pytest.mark.parametrize("kind", ["forward", "train", "evaluate"])
@PROPERTY
@given(mutations=mutation_lists)
def test_a_mutated_job_succeeds_or_says_what_is_wrong_and_keeps_its_inputs(templates, kind, mutations):
    with fresh_case(kind, templates[kind]) as case:
        check_property(case, mutations)


@pytest.mark.parametrize("kind", ["forward", "train", "evaluate"])
def test_the_valid_jobs_succeed(templates, kind):
    with fresh_case(kind, templates[kind]) as case:
        case.write()
        status, stderr = run_cli(case.argv())
        assert status == 0 and "error:" not in stderr, stderr
