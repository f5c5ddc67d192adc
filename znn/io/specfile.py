"""Read ZNN sample files (`.spec`): which volumes feed which network inputs and outputs.

Sections ``[imageN]``, ``[labelN]``, ``[maskN]`` and ``[sampleN]`` (see docs/formats.md). File names are resolved
against the spec file's folder; whether they exist is checked when a sample is opened, so a spec can be read
(and reported on) before its data is in place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from znn.errors import SpecFileError, VolumeError, ZnnFileNotFoundError, closest, where
from znn.io.inifile import IniFile, parse_ini, read_ini
from znn.io.ngff import Resolution, parse_resolution
from znn.ops.preprocess import IMAGE_PP_TYPES as IMAGE_PP
from znn.ops.preprocess import LABEL_PP_TYPES as LABEL_PP

SECTION_KEYS = {
    "image": ("fnames", "pp_types", "is_auto_crop", "resolution"),
    "label": ("fnames", "pp_types", "fmasks", "is_auto_crop", "resolution"),
    "mask": ("fnames", "pp_types", "is_auto_crop", "resolution"),
}
_SECTION_NAME = re.compile(r"^(image|label|mask|sample)(\d+)$")
_SAMPLE_KEY = re.compile(r"^(input|output|mask)(\d*)$")


@dataclass
class VolumeSet:
    """One ``[imageN]``, ``[labelN]`` or ``[maskN]`` section: files with their preprocessing."""

    kind: str
    id: int
    fnames: list[Path]
    pp_types: list[str]
    fmasks: list[Path] = field(default_factory=list)
    is_auto_crop: bool = True
    where: str = ""
    resolution: Resolution | None = None  # the voxel size of its volumes (``resolution = 40,4,4 nm``)

    def check_files(self) -> None:
        """Raise ZnnFileNotFoundError for the first listed file that does not exist."""
        from znn.io.volume import parse_volume_path

        for f in (*self.fnames, *self.fmasks):
            try:
                base = parse_volume_path(f).file
            except VolumeError as exc:
                raise SpecFileError(f"{self.where} fnames: {exc}") from None
            if not base.exists():
                raise ZnnFileNotFoundError(f"{self.where} fnames: {f} does not exist; fix the path (relative paths "
                                           "are resolved against the .spec file's folder)")


@dataclass
class Sample:
    """One ``[sampleN]``: the image ids of the network inputs and label ids of the outputs, in order.

    As read from the file, ``inputs``/``outputs``/``masks`` hold what the numbered keys (``input``, ``input1``,
    ...) say; keys named after network nodes (``input-r = 2``, ZNN's own spelling) wait in ``refs`` until the
    network is known: :func:`znn.io.sample_nodes.bind_sample` orders all of them by the network's nodes.
    ``masks[k]`` is the ``[maskN]`` of output k, None where that output has none.
    """

    id: int
    inputs: list[int]
    outputs: list[int]
    masks: list[int | None]
    where: str = ""
    refs: dict[str, int] = field(default_factory=dict)  # every key of the section -> its section number
    key_where: dict[str, str] = field(default_factory=dict)  # key -> ``file:line: [sampleN] key``


@dataclass
class SampleSpec:
    path: Path | None
    images: dict[int, VolumeSet]
    labels: dict[int, VolumeSet]
    masks: dict[int, VolumeSet]
    samples: dict[int, Sample]

    def sample(self, sample_id: int) -> Sample:
        if sample_id not in self.samples:
            raise SpecFileError(f"{self.path}: no [sample{sample_id}]; the file defines samples "
                                f"{', '.join(map(str, sorted(self.samples)))}")
        return self.samples[sample_id]


def load_spec(path: str | Path) -> SampleSpec:
    """Read and check the `.spec` sample file at ``path``."""
    return _spec(read_ini(path, SpecFileError, "sample file (.spec)"))


def parse_spec(text: str, path: str | Path | None = None) -> SampleSpec:
    return _spec(parse_ini(text, Path(path) if path else None, SpecFileError))


def _spec(ini: IniFile) -> SampleSpec:
    groups: dict[str, dict[int, VolumeSet]] = {"image": {}, "label": {}, "mask": {}}
    samples: dict[int, Sample] = {}
    for name, pairs in ini.sections.items():
        match = _SECTION_NAME.match(name)
        if not match:
            raise SpecFileError(f"{ini.at(name)}: unknown section; sections are [imageN], [labelN], [maskN] and "
                                f"[sampleN] with N a number ({closest(name, ('image1', 'label1', 'mask1', 'sample1'))})")
        kind, number = match.group(1), int(match.group(2))
        if kind == "sample":
            samples[number] = _sample(ini, name, number, pairs)
        else:
            groups[kind][number] = _volume_set(ini, name, kind, number, pairs)
    if not samples:
        raise SpecFileError(f"{where(ini.path)}: defines no [sampleN] section; a sample file pairs its [imageN] and "
                            "[labelN] sections in [sample1], [sample2], ... (see docs/formats.md)")
    spec = SampleSpec(ini.path, groups["image"], groups["label"], groups["mask"], samples)
    for sample in samples.values():
        _check_references(ini, spec, sample)
    return spec


def _volume_set(ini: IniFile, section: str, kind: str, number: int, pairs: dict[str, str]) -> VolumeSet:
    known = SECTION_KEYS[kind]
    for key in pairs:
        if key not in known:
            raise SpecFileError(f"{ini.at(section, key)}: unknown key {key!r}; {closest(key, known)}")
    if not pairs.get("fnames", "").strip():
        raise SpecFileError(f"{ini.at(section)}: needs `fnames = path/to/volume.tif` (one or more files)")
    fnames = [ini.resolve(f) for f in _list(pairs["fnames"])]
    valid_pp = IMAGE_PP if kind == "image" else LABEL_PP if kind == "label" else ("none",)
    pp_types = _list(pairs.get("pp_types", "none")) or ["none"]
    for pp in pp_types:
        if pp not in valid_pp:
            raise SpecFileError(f"{ini.at(section, 'pp_types')}: {pp!r} is not a {kind} preprocessing; "
                                f"{closest(pp, valid_pp)}")
    if len(pp_types) == 1:
        pp_types = pp_types * len(fnames)
    if len(pp_types) != len(fnames):
        raise SpecFileError(f"{ini.at(section, 'pp_types')}: {len(pp_types)} pp_types for {len(fnames)} fnames; "
                            "give one per file (or one for all)")
    fmasks = [ini.resolve(f) for f in _list(pairs.get("fmasks", ""))]
    if fmasks and len(fmasks) != len(fnames):
        raise SpecFileError(f"{ini.at(section, 'fmasks')}: {len(fmasks)} fmasks for {len(fnames)} fnames; "
                            "give one mask per file, or leave fmasks empty")
    crop = pairs.get("is_auto_crop", "yes").strip().lower()
    if crop not in ("yes", "no", "true", "false", "1", "0"):
        raise SpecFileError(f"{ini.at(section, 'is_auto_crop')}: {crop!r} is not valid; write yes or no")
    return VolumeSet(kind, number, fnames, pp_types, fmasks, crop in ("yes", "true", "1"), ini.at(section),
                     _resolution(ini, section, pairs))


def _resolution(ini: IniFile, section: str, pairs: dict[str, str]) -> Resolution | None:
    if not pairs.get("resolution", "").strip():
        return None
    try:
        return parse_resolution(pairs["resolution"])
    except ValueError as exc:
        raise SpecFileError(f"{ini.at(section, 'resolution')}: {exc}") from None


def _sample(ini: IniFile, section: str, number: int, pairs: dict[str, str]) -> Sample:
    slots: dict[str, dict[int, int]] = {"input": {}, "output": {}, "mask": {}}
    refs: dict[str, int] = {}
    for key, value in pairs.items():
        match = _SAMPLE_KEY.match(key)
        try:
            refs[key] = int(value)
        except ValueError:
            kind = "label" if match and match.group(1) == "output" else "image"
            raise SpecFileError(f"{ini.at(section, key)}: {value!r} is not a section number; write e.g. "
                                f"`{key} = 1` for [{kind}1]") from None
        if match:
            slots[match.group(1)][int(match.group(2) or 1)] = refs[key]
    # any other key names a network node (ZNN's `input-r = 2`); which one is known only with the network
    if not refs or (not slots["input"] and all(_SAMPLE_KEY.match(k) for k in refs)):
        raise SpecFileError(f"{ini.at(section)}: a sample needs `input = N` naming an [imageN] section (one key "
                            "per network input node, named after the node)")
    ordered = {k: [v[i] for i in sorted(v)] for k, v in slots.items()}
    masks: list[int | None] = list(ordered["mask"])
    return Sample(number, ordered["input"], ordered["output"], masks, ini.at(section), refs,
                  {key: ini.at(section, key) for key in refs})


def _check_references(ini: IniFile, spec: SampleSpec, sample: Sample) -> None:
    section = f"sample{sample.id}"
    ids: list[int] | list[int | None]
    for key, ids, table, kind in (("input", sample.inputs, spec.images, "image"),
                                  ("output", sample.outputs, spec.labels, "label"),
                                  ("mask", sample.masks, spec.masks, "mask")):
        for ref in ids:
            if ref is not None and ref not in table:
                have = ", ".join(f"[{kind}{i}]" for i in sorted(table)) or "none"
                raise SpecFileError(f"{ini.at(section, key)}: refers to [{kind}{ref}], which does not exist "
                                    f"(defined: {have})")


def _list(text: str) -> list[str]:
    return [item.strip() for item in re.split(r"[,\n]", text) if item.strip()]
