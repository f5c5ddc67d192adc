"""Batch workflow files (`znn run WORKFLOW.yaml`): read safely, checked, fan-out expanded, in dependency order.

A workflow is a YAML mapping::

    scheduler: threads            # optional; `znn run --scheduler` overrides it (else each job's own key)
    parallel: 1                   # optional; steps run at once on a dask cluster (in-process schedulers: 1)
    steps:
      train:    {run: train, job: train.cfg, max_iter: 6}
      forward:
        run: forward
        job: forward.cfg
        needs: [train]
        over: [1, 2]                              # fan-out: forward[0], forward[1]
        set: {forward_range: "{item}"}            # job keys replaced for this step
      evaluate:
        run: evaluate
        needs: ["forward[{index}]"]               # each evaluation waits for its own prediction
        over: [{sample: 1}, {sample: 2}]
        pred: out/pred_sample{sample}_output.zarr/output
        labels: labels{sample}.tif
        out: out/scores{sample}.json

A ``segment`` step is `znn segment PRED OUT` (keys ``pred``, ``out`` and the options: ``type``, ``dims``,
``block``, ``halo`` as ``z,y,x``, ``seed_threshold``, ``min_size``, ``sigma``, ``merge_threshold``,
``nonboundary``, and ``choose_on`` / ``choose_pred`` as `--choose-on` / `--choose-pred`); an ``evaluate`` step may score its labels with ``type: segmentation``, or segment a prediction
itself with ``segment: watershed`` (and the same method keys).

Paths are relative to the workflow file. ``over`` lists the values of a fan-out: a scalar binds ``{item}``, a
mapping binds its keys; ``{index}`` is the position. Placeholders are replaced in every text value of the step
(also in ``needs`` and ``set``); nothing else in the file is interpreted. The file is read with a safe YAML
loader that refuses tags (``!!python/...``), aliases and duplicate keys.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from znn.errors import WorkflowError, ZnnError, closest, where
from znn.io.config import ALL_KEYS, PATH_KEYS, Job, is_folder_prefix, load_job
from znn.io.files import existing_file
from znn.io.paths import check_apart
from znn.pipeline.dense.outputs import TRANSFORMS
from znn.ops.segment import OUT_TYPES
from znn.pipeline.jobs.evaluate import PRED_TYPES, SEGMENT_DIMS, SEGMENT_METHODS
from znn.pipeline.run.schedulers import check_scheduler
from znn.text import parse_bytes
from znn.types import Triple

__all__ = ["Step", "Workflow", "load_workflow", "KINDS"]

KINDS = ("train", "forward", "segment", "evaluate")
TOP_KEYS = ("steps", "scheduler", "parallel")
COMMON_KEYS = ("run", "needs", "over")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Files whose contents are part of a step's digest: the job file and the network and sample files it names.
_DIGEST_KEYS = ("fnet_spec", "fdata_spec")


# ------------------------------------------------------------------------------------------- value checkers
# Each takes the YAML value and returns the checked value or raises ValueError saying what is valid.
def _text(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value).strip() == "":
        raise ValueError("expected a path or text")
    return str(value)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("expected an integer >= 0")
    return value


def _positive(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError("expected a finite number > 0")
    return float(value)


def _probability(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError("expected a number in [0, 1]")
    return float(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(closest(str(value), choices))
        return str(value)

    return check


def _non_negative(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError("expected a finite number >= 0")
    return float(value)


def _triple(minimum: int) -> Callable[[Any], Triple]:
    """``z,y,x`` (text or a list of three integers), each at least ``minimum``."""
    def check(value: Any) -> Triple:
        parts = value.replace(" ", "").split(",") if isinstance(value, str) else value
        try:
            if not isinstance(parts, list) or len(parts) != 3 or any(isinstance(p, (bool, float)) for p in parts):
                raise ValueError
            z, y, x = (int(p) for p in parts)
        except (TypeError, ValueError):
            raise ValueError(f"expected z,y,x: three integers >= {minimum}, like 8,32,32") from None
        if min(z, y, x) < minimum:
            raise ValueError(f"expected z,y,x: three integers >= {minimum}, like 8,32,32")
        return z, y, x

    return check


def _memory(value: Any) -> int:
    try:
        return parse_bytes(value)
    except ZnnError as exc:
        raise ValueError(str(exc)) from None


def _settings(value: Any) -> dict[str, str]:
    """``set:``: job keys and their values (scalars, written as in a .cfg file)."""
    if not isinstance(value, dict):
        raise ValueError("expected a mapping of job keys to values, like {forward_range: 2}")
    out = {}
    for key, v in value.items():
        if key not in ALL_KEYS:
            raise ValueError(f"{key!r} is not a job key; {closest(key, ALL_KEYS)}")
        if isinstance(v, bool):
            v = "yes" if v else "no"
        if not isinstance(v, (str, int, float)):
            raise ValueError(f"{key}: expected a value as written in a .cfg file, got {type(v).__name__}")
        out[key] = str(v)
    return out


# The settings of the segmentation method (znn.ops.segment.Method), in segment and evaluate steps.
METHOD_KEYS: dict[str, tuple[Callable[[Any], Any], bool]] = {
    "seed_threshold": (_probability, False), "min_size": (_count, False), "sigma": (_non_negative, False),
    "merge_threshold": (_probability, False)}

# Per kind: key -> (checker, is a path relative to the workflow file). Required keys are listed separately.
KEYS: dict[str, dict[str, tuple[Callable[[Any], Any], bool]]] = {
    "train": {"job": (_text, True), "set": (_settings, False), "seed": (_text, True), "max_iter": (_count, False),
              "minutes": (_positive, False)},
    "forward": {"job": (_text, True), "set": (_settings, False), "transform": (_choice(*TRANSFORMS), False),
                "memory": (_memory, False)},
    "segment": {"pred": (_text, True), "out": (_text, True), "type": (_choice(*OUT_TYPES), False),
                "dims": (_choice(*SEGMENT_DIMS), False), "nonboundary": (_flag, False), "block": (_triple(1), False),
                "halo": (_triple(0), False), "choose_on": (_text, True), "choose_pred": (_text, True),
                **METHOD_KEYS},
    "evaluate": {"pred": (_text, True), "labels": (_text, True), "out": (_text, True), "mask": (_text, True),
                 "type": (_choice(*PRED_TYPES), False), "threshold": (_probability, False),
                 "dims": (_choice(*SEGMENT_DIMS), False), "nonboundary": (_flag, False), "crop": (_flag, False),
                 "segment": (_choice(*SEGMENT_METHODS), False), **METHOD_KEYS},
}
REQUIRED = {"train": ("job",), "forward": ("job",), "segment": ("pred", "out"), "evaluate": ("pred", "labels", "out")}


# --------------------------------------------------------------------------------------------- safe loading
class _Map(dict):  # type: ignore[type-arg]
    """A YAML mapping that remembers the line of each key, for error messages."""

    lines: dict[str, int]


class _Loader(yaml.SafeLoader):  # type: ignore[misc]  # yaml has no stubs here: SafeLoader is Any
    """PyYAML's safe loader (no tags that construct objects), without aliases, with duplicate-key errors."""

    path: Path

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            line = self.peek_event().start_mark.line + 1
            raise WorkflowError(f"{where(self.path, line)}: YAML aliases (*name) are not allowed in a workflow; "
                                "write the value out")
        return super().compose_node(parent, index)


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> Iterator[_Map]:
    data = _Map()
    data.lines = {}
    yield data
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise WorkflowError(f"{where(loader.path, line)}: {key!r} is not a name; keys are names like steps")
        if key in data:
            raise WorkflowError(f"{where(loader.path, line)}: key {key!r} appears twice (first on line "
                                f"{data.lines[key]}); keep one")
        data[key] = loader.construct_object(value_node, deep=True)
        data.lines[key] = line


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)


def read_yaml(path: Path) -> Any:
    """The YAML document of ``path``; WorkflowError naming the file (and line) when it is not safe, text YAML."""
    existing_file(path, WorkflowError, "workflow file")
    data = path.read_bytes()
    try:
        if b"\0" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\0"), data.index(b"\0") + 1, "NUL byte")
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WorkflowError(f"{path}: not a text YAML workflow file ({exc.reason} at byte {exc.start})") from None
    loader = _Loader(text)
    loader.path = path
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "invalid YAML"
        if "constructor" in problem:  # a tag such as !!python/object
            problem += "; a workflow holds plain YAML only (no tags)"
        raise WorkflowError(f"{where(path, line)}: not a valid YAML workflow: {problem}") from None
    except yaml.YAMLError as exc:
        raise WorkflowError(f"{path}: not a valid YAML workflow: {exc}") from None
    finally:
        loader.dispose()


# ----------------------------------------------------------------------------------------------- the model
@dataclass
class Step:
    """One concrete step (a fan-out gives ``name[0]``, ``name[1]``, ...).

    ``definition`` is the step as written with placeholders filled in (its paths as written): it identifies the
    step in its digest. ``options`` holds the checked values with paths resolved against the workflow file.
    """

    name: str
    group: str
    kind: str
    needs: tuple[str, ...]
    definition: dict[str, Any]
    options: dict[str, Any]
    job: Job | None = None
    digest: str = ""


@dataclass
class Workflow:
    path: Path
    steps: dict[str, Step]  # in dependency order
    scheduler: str | None = None
    parallel: int = 1
    groups: dict[str, list[str]] = field(default_factory=dict)

    @property
    def state_path(self) -> Path:
        return self.path.with_suffix(".state.json")

    def dependants(self, name: str) -> list[str]:
        """Steps that need ``name``, directly or not, in order."""
        found = {name}
        for step in self.steps.values():
            if found.intersection(step.needs):
                found.add(step.name)
        return [n for n in self.steps if n in found and n != name]


def load_workflow(path: str | Path) -> Workflow:
    """Read and check the workflow file at ``path``: every step, its job file (with ``set`` applied), its
    dependencies (no cycles); returns the concrete steps in dependency order with their digests."""
    path = Path(path)
    doc = read_yaml(path)
    if not isinstance(doc, _Map):
        raise WorkflowError(f"{path}: not a workflow; a workflow is a YAML mapping with a `steps:` mapping of "
                            "step names to steps (see workflows/batch/)")
    for key in doc:
        if key not in TOP_KEYS:
            raise WorkflowError(f"{where(path, doc.lines[key])}: unknown key {key!r}; {closest(key, TOP_KEYS)}")
    if "steps" not in doc:
        raise WorkflowError(f"{path}: no `steps:`; a workflow has a `steps:` mapping of step names to steps (see "
                            "workflows/batch/)")
    scheduler = None
    if doc.get("scheduler") is not None:
        try:
            scheduler = check_scheduler(_text(doc["scheduler"]), "scheduler")
        except (ValueError, ZnnError) as exc:
            raise WorkflowError(f"{where(path, doc.lines['scheduler'])}: {exc}") from None
    parallel = doc.get("parallel", 1)
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise WorkflowError(f"{where(path, doc.lines['parallel'])}: parallel {parallel!r}: expected an integer "
                            ">= 1 (steps run at once)")
    steps_doc = doc["steps"]
    if not isinstance(steps_doc, _Map) or not steps_doc:
        raise WorkflowError(f"{where(path, doc.lines['steps'])}: steps: expected a mapping of step names to steps")
    groups: dict[str, list[Step]] = {}
    for name, body in steps_doc.items():
        groups[name] = _expand(path, name, body, steps_doc.lines[name])
    concrete = {s.name: s for steps in groups.values() for s in steps}
    lines = {s.name: steps_doc.lines[s.group] for s in concrete.values()}
    for step in concrete.values():
        step.needs = _resolve_needs(path, step, groups, concrete, lines[step.name])
    ordered = _order(path, concrete, lines)
    for step in ordered:
        step.digest = _digest(step, concrete)
    return Workflow(path, {s.name: s for s in ordered}, scheduler, parallel,
                    {g: [s.name for s in steps] for g, steps in groups.items()})


def _expand(path: Path, name: str, body: Any, line: int) -> list[Step]:
    at = f"{where(path, line)}: step {name!r}"
    if not _NAME.fullmatch(name):
        raise WorkflowError(f"{at}: a step name is letters, digits, '_', '-' or '.' (fan-out adds [i])")
    if not isinstance(body, _Map):
        raise WorkflowError(f"{at}: expected a mapping with `run:` (train, forward, segment or evaluate) and its "
                            "keys")
    kind = body.get("run")
    if kind not in KINDS:
        what = "has no `run:`" if kind is None else f"run {kind!r} is not a step kind; {closest(str(kind), KINDS)}"
        raise WorkflowError(f"{at}: {what} (train, forward, segment or evaluate)")
    allowed = (*COMMON_KEYS, *KEYS[kind])
    for key in body:
        if key not in allowed:
            raise WorkflowError(f"{where(path, body.lines[key])}: step {name!r}: unknown key {key!r} for a {kind} "
                                f"step; {closest(key, allowed)}")
    for key in REQUIRED[kind]:
        if key not in body:
            raise WorkflowError(f"{at}: a {kind} step needs key {key!r}")
    bindings = _bindings(path, name, body)
    steps = []
    for index, bound in enumerate(bindings):
        concrete = name if "over" not in body else f"{name}[{index}]"
        definition = {k: _fill(v, bound, f"{where(path, body.lines[k])}: step {concrete!r}: {k}")
                      for k, v in body.items() if k != "over"}
        steps.append(_checked(path, name, concrete, kind, definition, body.lines))
    return steps


def _bindings(path: Path, name: str, body: _Map) -> list[dict[str, str]]:
    if "over" not in body:
        return [{}]
    over = body["over"]
    at = f"{where(path, body.lines['over'])}: step {name!r}: over"
    if not isinstance(over, list) or not over:
        raise WorkflowError(f"{at}: expected a non-empty list of values or of mappings (one step per entry)")
    result = []
    for i, entry in enumerate(over):
        bound = {"index": str(i)}
        if isinstance(entry, dict):
            for key, value in entry.items():
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or key == "index":
                    raise WorkflowError(f"{at}[{i}]: {key!r} is not a placeholder name (letters, digits, _; not "
                                        "index)")
                bound[key] = _scalar(value, f"{at}[{i}].{key}")
        else:
            bound["item"] = _scalar(entry, f"{at}[{i}]")
        result.append(bound)
    return result


def _scalar(value: Any, at: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise WorkflowError(f"{at}: expected a text or number, got {type(value).__name__}")
    return str(value)


def _fill(value: Any, bound: Mapping[str, str], at: str) -> Any:
    """``value`` with ``{name}`` placeholders replaced (in text, lists and mappings)."""
    if isinstance(value, str):
        def replace(match: re.Match[str]) -> str:
            key = match.group(1)
            if key not in bound:
                fix = closest(key, bound) if bound else "add `over:` to the step to bind placeholders"
                raise WorkflowError(f"{at}: placeholder {{{key}}} is not bound by `over:`; {fix}")
            return bound[key]

        return _PLACEHOLDER.sub(replace, value)
    if isinstance(value, list):
        return [_fill(v, bound, at) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, bound, f"{at}.{k}") for k, v in value.items()}
    return value


def _set_path(workflow: Path, value: str) -> str:
    """A ``set:`` path, relative to the workflow's folder, made absolute: the job resolves a relative one against its
    own folder, which would apply the workflow's folder twice when the workflow is named by a relative path. A
    trailing slash (a folder prefix) is kept."""
    resolved = str((workflow.parent / value).absolute())
    return resolved + os.sep if is_folder_prefix(value) else resolved


def _checked(path: Path, group: str, name: str, kind: str, definition: dict[str, Any],
             lines: Mapping[str, int]) -> Step:
    options: dict[str, Any] = {}
    for key, (check, is_path) in KEYS[kind].items():
        if key not in definition:
            continue
        try:
            value = check(definition[key])
        except ValueError as exc:
            raise WorkflowError(f"{where(path, lines[key])}: step {name!r}: {key} {definition[key]!r}: {exc}") \
                from None
        options[key] = str(path.parent / value) if is_path else value
    if kind in ("evaluate", "segment"):
        _check_apart(f"{where(path, lines['out'])}: step {name!r}", options)
    job = None
    if "job" in options:
        settings = {k: _set_path(path, v) if k in PATH_KEYS else v for k, v in options.get("set", {}).items()}
        try:
            job = load_job(options["job"], settings)
        except ZnnError as exc:
            via = " (with the step's `set:` keys)" if settings else ""
            raise type(exc)(f"{where(path, lines['job'])}: step {name!r}: job{via}: {exc}") from None
    return Step(name, group, kind, (), definition, options, job)


def _check_apart(at: str, options: Mapping[str, Any]) -> None:
    """An evaluate or segment step's ``out`` is none of the volumes it reads (found on loading, before any step
    runs)."""
    inputs = [(key, options[key]) for key in ("pred", "labels", "mask") if key in options]
    what = "file for the scores" if "labels" in options else "zarr store for the labels"
    check_apart([(f"{at}: out", options["out"])], inputs, f"name another `out:` {what}")


def _resolve_needs(path: Path, step: Step, groups: Mapping[str, list[Step]], concrete: Mapping[str, Step],
                   line: int) -> tuple[str, ...]:
    needs = step.definition.get("needs", [])
    if isinstance(needs, str):
        needs = [needs]
    at = f"{where(path, line)}: step {step.name!r}: needs"
    if not isinstance(needs, list) or not all(isinstance(n, str) for n in needs):
        raise WorkflowError(f"{at}: expected a list of step names, like [train]")
    result: list[str] = []
    for need in needs:
        if need in groups:
            result += [s.name for s in groups[need]]
        elif need in concrete:
            result.append(need)
        else:
            raise WorkflowError(f"{at}: no step {need!r}; {closest(need, [*groups, *concrete])}")
    if step.name in result:
        raise WorkflowError(f"{at}: a step cannot need itself")
    return tuple(dict.fromkeys(result))


def _order(path: Path, steps: Mapping[str, Step], lines: Mapping[str, int]) -> list[Step]:
    """Steps in dependency order (file order among those that are ready together); WorkflowError on a cycle."""
    done: set[str] = set()
    ordered: list[Step] = []
    while len(ordered) < len(steps):
        ready = [s for s in steps.values() if s.name not in done and done.issuperset(s.needs)]
        if not ready:
            cycle = _cycle(steps, done)
            raise WorkflowError(f"{where(path, lines[cycle[0]])}: steps need each other in a cycle: "
                                f"{' -> '.join(cycle)}; remove one of these needs")
        for s in ready:
            done.add(s.name)
            ordered.append(s)
    return ordered


def _cycle(steps: Mapping[str, Step], done: set[str]) -> list[str]:
    """One dependency cycle among the steps not in ``done`` (every one of them lies on or leads to a cycle)."""
    name = next(n for n in steps if n not in done)
    seen: list[str] = []
    while name not in seen:
        seen.append(name)
        name = next(n for n in steps[name].needs if n not in done)
    return seen[seen.index(name):] + [name]


def _file_digest(path: Any) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _digest(step: Step, steps: Mapping[str, Step]) -> str:
    """What the step's result depends on: its definition, its job file and the network and sample files the job
    names, and the digests of the steps it needs (so a changed step reruns everything after it)."""
    files = {}
    if step.job is not None:
        files["job"] = _file_digest(step.options["job"])
        for key in _DIGEST_KEYS:
            if step.job.values.get(key):
                files[key] = _file_digest(step.job.values[key])
    record = {"kind": step.kind, "definition": step.definition, "files": files,
              "needs": {n: steps[n].digest for n in step.needs}}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:20]
