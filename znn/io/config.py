"""Read ZNN job files (`.cfg`, one ``[parameters]`` section) into a typed :class:`Job`.

Key names are ZNN's, spelled as ZNN spells them. Keys this project adds are listed in ``EXTRA_KEYS``. Every value
is checked on reading; an unknown key is reported with the closest known key.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, get_args

from znn.environment import cores
from znn.errors import ConfigError, closest
from znn.io.inifile import IniFile, parse_ini, read_ini
from znn.io.ngff import MAX_LEVELS, Resolution, parse_resolution
from znn.ops.conv import MODES as CONV_MODES
from znn.types import MalisNorm, Triple, parse_triple

SECTION = "parameters"
# What train_conv_mode and forward_conv_mode take: a kernel's conv mode, or optimize (timed per layer).
JOB_CONV_MODES = (*CONV_MODES, "optimize")
COST_FUNCTIONS = ("auto", "square_loss", "binomial_cross_entropy", "softmax_loss")
MALIS_NORMS: tuple[MalisNorm, ...] = get_args(MalisNorm)
REBALANCE_MODES = ("none", "global", "patch")
OUTPUT_FORMATS = ("zarr", "h5", "tif")
MAX_RANGE = 100_000
_BOOLEANS = {"yes": True, "true": True, "on": True, "1": True, "no": False, "false": False, "off": False, "0": False}


class _Explained(ValueError):
    """A ValueError whose message is worth showing to the user (a suggestion, a range problem)."""


def parse_range(text: str, what: str = "range") -> list[int]:
    """Sample ids written like ``1-3,6`` -> [1, 2, 3, 6] (sorted, unique)."""
    ids: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        low, sep, high = part.partition("-")
        try:
            first, last = int(low), int(high) if sep else int(low)
        except ValueError:
            raise _Explained(f"{what} {text!r}: {part!r} is not a number or a range like 1-3") from None
        if first < 0 or last < first:
            raise _Explained(f"{what} {text!r}: {part!r} is not an increasing range of ids >= 0")
        if len(ids) + last - first >= MAX_RANGE:  # ids are [sampleN] sections: this many is a typo, not a list
            raise _Explained(f"{what} {text!r}: {part!r} makes it more than {MAX_RANGE} samples; write the ids "
                             "of the .spec file's [sampleN] sections, like 1-3,6")
        ids.update(range(first, last + 1))
    if not ids:
        raise _Explained(f"{what} {text!r} names no sample; write ids like 1-3,6")
    return sorted(ids)


def _bool(text: str) -> bool:
    try:
        return _BOOLEANS[text.strip().lower()]
    except KeyError:
        raise ValueError("not yes/no") from None


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise _Explained(closest(text, choices))
        return text

    parse.__doc__ = " / ".join(choices)
    return parse


def _outsz(text: str) -> Triple | str:
    return "auto" if text.strip() == "auto" else parse_triple(text)


def _number(low: float, high: float = math.inf, *, above: bool = False, below: bool = False
            ) -> Callable[[str], float]:
    """A finite number from ``low`` to ``high``, each bound included unless ``above`` (> low) or ``below`` (< high)
    says otherwise: NaN and infinity are never a learning rate or a factor."""
    def parse(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise _Explained("not a finite number")
        too_low = value <= low if above else value < low
        too_high = value >= high if below else value > high
        if too_low and high == math.inf:
            raise _Explained(f"{value:g} is not {'>' if above else '>='} {low:g}")
        if too_low or too_high:
            raise _Explained(f"{value:g} is outside {'(' if above else '['}{low:g}, {high:g}{')' if below else ']'}")
        return value

    return parse


def _count(low: int = 0) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise ValueError(f"below {low}")
        return value

    return parse


def _text(text: str) -> str:
    return text.strip()


def _resolution(text: str) -> Resolution:
    try:
        return parse_resolution(text)
    except ValueError as exc:
        raise _Explained(str(exc)) from None


_NO_PYRAMID, _AUTO_PYRAMID = ("no", "none", "off", "false", "0"), ("auto", "yes", "on", "true")


def parse_pyramid(text: str) -> int | str:
    """The ``pyramid`` key and ``--pyramid``: ``no`` (0, none), ``auto`` (until a level is small), or a number of
    downsampled levels beyond full resolution; ValueError otherwise."""
    value = text.strip().lower()
    if value in _NO_PYRAMID or value in _AUTO_PYRAMID:
        return 0 if value in _NO_PYRAMID else "auto"
    try:
        levels = int(value)
    except ValueError:
        raise _Explained(f"{text.strip()!r} is not no, auto or a number of levels") from None
    if not 0 <= levels <= MAX_LEVELS:
        raise _Explained(f"{levels} levels: give 1 to {MAX_LEVELS} (each level halves some axes), or auto")
    return levels


# key: (parser, default, what a valid value looks like); each key is a typed field of Job, named as the key (a test
# checks the two agree). Paths are resolved against the job file later.
KEYS: dict[str, tuple[Callable[[str], Any], Any, str]] = {
    "fnet_spec": (_text, None, "a path to a .znn network file"),
    "fdata_spec": (_text, None, "a path to a .spec sample file"),
    "num_threads": (int, 0, "an integer (0 or less: all cores)"),
    "dtype": (_choice(("float32", "float64")), "float32", "float32 or float64"),
    "out_type": (_choice(("boundary", "affinity")), "boundary", "boundary or affinity"),
    "logging": (_bool, False, "yes or no"),
    "train_outsz": (parse_triple, (1, 100, 100), "a z,y,x output patch like 1,100,100"),
    "forward_outsz": (_outsz, (1, 100, 100), "a z,y,x output patch like 5,100,100, or auto"),
    "train_range": (parse_range, None, "sample ids like 1-3,6"),
    "test_range": (parse_range, None, "sample ids like 1-3,6"),
    "forward_range": (parse_range, None, "sample ids like 1-3,6"),
    "train_conv_mode": (_choice(JOB_CONV_MODES), "fft", " / ".join(JOB_CONV_MODES)),
    "forward_conv_mode": (_choice(JOB_CONV_MODES), "fft", " / ".join(JOB_CONV_MODES)),
    "cost_fn": (_choice(COST_FUNCTIONS), "auto", " / ".join(COST_FUNCTIONS)),
    "is_malis": (_bool, False, "yes or no"),
    "malis_norm_type": (_choice(MALIS_NORMS), "none", " / ".join(MALIS_NORMS)),
    "eta": (_number(0.0), 0.01, "a finite learning rate >= 0 (0: the weights stay as they are)"),
    "anneal_factor": (_number(0.0, 1.0, above=True), 1.0, "a factor in (0, 1] (eta is multiplied by it)"),
    "Num_iter_per_annealing": (_count(1), 100, "an integer >= 1"),
    "momentum": (_number(0.0, 1.0, below=True), 0.9, "a number in [0, 1) (at 1 the velocity never decays)"),
    "weight_decay": (_number(0.0), 0.0, "a finite number >= 0"),
    "is_data_aug": (_bool, True, "yes or no"),
    "is_bd_mirror": (_bool, True, "yes or no"),
    "rebalance_mode": (_choice(REBALANCE_MODES), "none", " / ".join(REBALANCE_MODES)),
    "is_rebalance": (_bool, False, "yes or no (older spelling of rebalance_mode = global)"),
    "is_patch_rebalance": (_bool, False, "yes or no (older spelling of rebalance_mode = patch)"),
    "Num_iter_per_show": (_count(1), 100, "an integer >= 1"),
    "Num_iter_per_test": (_count(1), 200, "an integer >= 1"),
    "test_num": (_count(1), 10, "an integer >= 1"),
    "Num_iter_per_save": (_count(1), 1000, "an integer >= 1"),
    "Max_iter": (_count(0), 200000, "an integer >= 0"),
    "train_net_prefix": (_text, None, "a path prefix for checkpoints, like experiments/net (experiments/: the "
                                      "folder, files net_*.h5 in it)"),
    "train_net": (_text, None, "a path prefix for checkpoints (older spelling of train_net_prefix)"),
    "forward_net": (_text, None, "a path to a network .h5 checkpoint"),
    "output_prefix": (_text, None, "a path prefix for forward outputs (outdir/: the folder, files sample*_output.* "
                                   "in it)"),
    "is_stdio": (_bool, True, "yes or no"),
    "is_debug": (_bool, False, "yes or no"),
    "is_check": (_bool, False, "yes or no"),
}
# Keys this project adds to ZNN's.
EXTRA_KEYS: dict[str, tuple[Callable[[str], Any], Any, str]] = {
    "scheduler": (_text, "threads", "threads, synchronous, local, or a scheduler address like tcp://host:8786"),
    "seed": (int, 0, "an integer random seed"),
    "output_format": (_choice(OUTPUT_FORMATS), "zarr", " / ".join(OUTPUT_FORMATS)),
    "spectra_cache": (_bool, True, "yes or no"),
    "replicas": (_count(1), 1, "an integer >= 1 (data-parallel training replicas, on a dask.distributed cluster)"),
    "resolution": (_resolution, None, "the input's voxel size z,y,x with a unit, like 40,4,4 nm (nm, um, mm, "
                                      "angstrom; written into the outputs' OME-Zarr metadata)"),
    "pyramid": (parse_pyramid, 0, "no, auto, or a number of downsampled output levels like 3"),
}
ALL_KEYS = {**KEYS, **EXTRA_KEYS}
PATH_KEYS = ("fnet_spec", "fdata_spec", "train_net_prefix", "train_net", "forward_net", "output_prefix")
# Prefixes of files the project writes; written with a trailing slash, one names the folder the files go in.
PREFIX_KEYS = ("train_net_prefix", "train_net", "output_prefix")
FOLDER_CHECKPOINT_STEM = "net"  # checkpoints in a train_net_prefix folder: net_current.h5, net_1000.h5, ...


def is_folder_prefix(prefix: str | os.PathLike[str]) -> bool:
    """Whether a prefix names a folder: written with a trailing slash (kept through path resolution)."""
    return os.fspath(prefix).endswith(("/", os.sep))


def prefixed(prefix: str | os.PathLike[str], name: str) -> str:
    """The file ``name`` under ``prefix``: ``<prefix>_<name>``, or ``<prefix>/<name>`` when it names a folder."""
    if is_folder_prefix(prefix):
        return str(Path(prefix) / name)
    return f"{os.fspath(prefix)}_{name}"


@dataclass(frozen=True)
class Job:
    """A parsed job file: one typed attribute per key of :data:`ALL_KEYS`, named as the key (its default where the
    file does not set it); ``path`` and ``ini`` are the file it came from. Paths are resolved against the job
    file's folder; a prefix written with a trailing slash stays text (a folder, see :func:`prefixed`)."""

    path: Path | None
    ini: IniFile
    # ZNN's keys (KEYS)
    fnet_spec: Path | None
    fdata_spec: Path | None
    num_threads: int
    dtype: str
    out_type: str
    logging: bool
    train_outsz: Triple
    forward_outsz: Triple | str  # or "auto"
    train_range: list[int] | None
    test_range: list[int] | None
    forward_range: list[int] | None
    train_conv_mode: str
    forward_conv_mode: str
    cost_fn: str
    is_malis: bool
    malis_norm_type: MalisNorm
    eta: float
    anneal_factor: float
    Num_iter_per_annealing: int
    momentum: float
    weight_decay: float
    is_data_aug: bool
    is_bd_mirror: bool
    rebalance_mode: str
    is_rebalance: bool
    is_patch_rebalance: bool
    Num_iter_per_show: int
    Num_iter_per_test: int
    test_num: int
    Num_iter_per_save: int
    Max_iter: int
    train_net_prefix: Path | str | None
    train_net: Path | str | None
    forward_net: Path | None
    output_prefix: Path | str | None
    is_stdio: bool
    is_debug: bool
    is_check: bool
    # this project's keys (EXTRA_KEYS)
    scheduler: str
    seed: int
    output_format: str
    spectra_cache: bool
    replicas: int
    resolution: Resolution | None
    pyramid: int | str  # or "auto"

    @property
    def values(self) -> Mapping[str, Any]:
        """Every key's value by name, read-only (for code that picks keys by name)."""
        return MappingProxyType({key: getattr(self, key) for key in ALL_KEYS})

    def require(self, key: str) -> Any:
        """The value of ``key``, or a ConfigError saying the job needs it."""
        value = getattr(self, key)
        if value is None:
            raise ConfigError(f"{self.ini.at(SECTION)}: this command needs key {key!r} ({ALL_KEYS[key][2]})")
        return value

    @property
    def rebalance(self) -> str:
        """Effective rebalancing mode, honouring the older is_rebalance / is_patch_rebalance keys."""
        if "rebalance_mode" in self.ini.sections[SECTION]:
            return self.rebalance_mode
        if self.is_patch_rebalance:
            return "patch"
        return "global" if self.is_rebalance else "none"

    @property
    def cost(self) -> str:
        """Effective cost function: auto = softmax for boundary, binomial cross-entropy for affinity."""
        if self.cost_fn != "auto":
            return self.cost_fn
        return "softmax_loss" if self.out_type == "boundary" else "binomial_cross_entropy"

    @property
    def net_prefix(self) -> Path | None:
        """The checkpoint prefix; for a folder (``train_net_prefix = nets/``) the files ``net_*.h5`` inside it."""
        prefix = self.train_net_prefix or self.train_net
        if prefix is None:
            return None
        return Path(prefix) / FOLDER_CHECKPOINT_STEM if is_folder_prefix(prefix) else Path(prefix)

    @property
    def threads(self) -> int:
        """num_threads with ZNN's meaning: 0 or less = all cores (:func:`znn.environment.cores`)."""
        return cores(self.num_threads)


def load_job(path: str | Path, overrides: Mapping[str, str] | None = None) -> Job:
    """Read and check the `.cfg` job file at ``path``. ``overrides`` (key -> text, as a workflow step sets them)
    replace the file's values and are checked like them; relative paths among them are resolved against the job
    file's folder, as the file's own are."""
    ini = read_ini(path, ConfigError, "job file (.cfg)")
    if overrides and SECTION in ini.sections:
        ini.sections[SECTION].update(overrides)
    return _job(ini)


def parse_job(text: str, path: str | Path | None = None) -> Job:
    return _job(parse_ini(text, Path(path) if path else None, ConfigError))


def _job(ini: IniFile) -> Job:
    if SECTION not in ini.sections:
        found = ", ".join(f"[{s}]" for s in ini.sections) or "none"
        raise ConfigError(f"{ini.at(SECTION) if ini.sections else ini.path}: no [parameters] section (found {found}); "
                          "a ZNN job file has one [parameters] section")
    for extra in ini.sections:
        if extra != SECTION:
            raise ConfigError(f"{ini.at(extra)}: unknown section; a job file has only [parameters]")
    raw = ini.sections[SECTION]
    values: dict[str, Any] = {key: default for key, (_, default, _) in ALL_KEYS.items()}
    for key, text in raw.items():
        if key not in ALL_KEYS:
            raise ConfigError(f"{ini.at(SECTION, key)}: unknown key {key!r}; {closest(key, ALL_KEYS)}")
        values[key] = _value(ini, key, text)
    _check_decay(ini, values)
    for key in PATH_KEYS:
        if values[key]:
            values[key] = _resolve_path(ini, key, values[key])
    return Job(ini.path, ini, **values)


def _resolve_path(ini: IniFile, key: str, text: str) -> Path | str:
    """``text`` against the job file's folder; a prefix keeps its trailing slash (a folder, see ``prefixed``)."""
    path = ini.resolve(text)
    return f"{path}{os.sep}" if key in PREFIX_KEYS and is_folder_prefix(text) else path


def _check_decay(ini: IniFile, values: Mapping[str, Any]) -> None:
    """Each step multiplies the weights by 1 - eta * weight_decay (ZNN's update): from 1 on it zeroes or flips them."""
    eta, decay = float(values["eta"]), float(values["weight_decay"])
    if eta * decay >= 1:
        key = "weight_decay" if "weight_decay" in ini.sections[SECTION] else "eta"
        raise ConfigError(f"{ini.at(SECTION, key)}: eta * weight_decay = {eta * decay:g}; each step multiplies the "
                          f"weights by 1 - eta * weight_decay, so keep weight_decay below 1 / eta = {1 / eta:g}")


def _value(ini: IniFile, key: str, text: str) -> Any:
    parse, _, valid = ALL_KEYS[key]
    if text.strip() == "" and key in PATH_KEYS:
        return None
    try:
        return parse(text.strip())
    except ValueError as exc:
        hint = f" ({exc})" if isinstance(exc, _Explained) else ""
        raise ConfigError(f"{ini.at(SECTION, key)}: {text.strip()!r} is not valid; expected {valid}{hint}") from None
