"""Network checkpoints in ZNN's `.h5` "stdio" layout (docs/formats.md).

``/processing/znn/train/network/<group>/`` holds each node and edge group's spec entries as scalar strings (and
``size``/``stride`` as integer arrays, as ZNN wrote them) plus ``filters``/``biases`` and ``momentum_vol``. The
learning curve lives under ``/processing/znn/train/statistics/``. Files are written to a temporary sibling and
renamed, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from znn.errors import CheckpointError, NetworkSpecError, ZnnError
from znn.io.files import existing_file
from znn.io.finite import find_non_finite
from znn.io.hdf5 import H5_ERRORS
from znn.network import Network
from znn.spec import EdgeGroup, NetworkSpec, NodeGroup

NETWORK = "processing/znn/train/network"
STATISTICS = "processing/znn/train/statistics"
MAX_ENTRY = 64  # values in one saved spec entry (a size or stride has 3)


def save_checkpoint(path: str | Path, net: Network, statistics: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write ``net`` (and an optional flat mapping ``"train/it" -> array`` of learning-curve series) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            root = f.create_group(NETWORK)
            for name, node in net.spec.nodes.items():
                _write_node(root.create_group(name), node, net)
            for name, edge in net.spec.edges.items():
                _write_edge(root.create_group(name), edge, net)
            for key, series in (statistics or {}).items():
                f.create_dataset(f"{STATISTICS}/{key}", data=np.asarray(series))
        with open(tmp, "rb") as done:  # on disk before it takes the name, so the name never points at a stub
            os.fsync(done.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporaries of ``path`` left by writers that were killed (their process no longer exists)."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            tmp.unlink(missing_ok=True)


def _strings(group: h5py.Group, entries: Mapping[str, object]) -> None:
    for key, value in entries.items():
        group.create_dataset(key, data=str(value), dtype=h5py.string_dtype())


def _hyper(net: Network) -> dict[str, str]:
    return {k: repr(float(net.hyper.get(k, 0.0))) for k in ("eta", "momentum", "weight_decay")}


def _write_node(group: h5py.Group, node: NodeGroup, net: Network) -> None:
    _strings(group, {"name": node.name, "type": node.type, "group_type": "node"})
    group.create_dataset("size", data=np.array([node.size], dtype=np.int64))
    if node.type == "transfer":
        _strings(group, {"function": node.function, **_hyper(net)})
        if node.function_args:
            _strings(group, {"function_args": ",".join(repr(a) for a in node.function_args)})
        group.create_dataset("biases", data=net.biases[node.name].astype(np.float32))
        group.create_dataset("momentum_vol", data=net.bias_momentum[node.name].astype(np.float32))


def _write_edge(group: h5py.Group, edge: EdgeGroup, net: Network) -> None:
    _strings(group, {"name": edge.name, "type": edge.type, "group_type": "edge", "input": edge.input,
                     "output": edge.output, "init": edge.init, "fft": edge.options.get("fft", "1"), **_hyper(net)})
    group.create_dataset("size", data=np.array(edge.size, dtype=np.int64))
    group.create_dataset("stride", data=np.array(edge.stride, dtype=np.int64))
    if edge.type == "dropout":
        _strings(group, {"ratio": repr(edge.ratio)})
    if edge.type == "crop":
        group.create_dataset("offset", data=np.array(edge.offset, dtype=np.int64))
    if edge.type == "conv":
        group.create_dataset("filters", data=net.kernels[edge.name].astype(np.float32))
        group.create_dataset("momentum_vol", data=net.kernel_momentum[edge.name].astype(np.float32))


def load_checkpoint(path: str | Path, spec: NetworkSpec | None = None,
                    dtype: np.dtype | type = np.float32) -> Network:
    """Load a network. With ``spec``, parameters are checked against it; without, the spec saved in the file is
    used (ZNN stores every group's options beside its parameters)."""
    with _reading(path) as (path, f):
        root = f.get(NETWORK)
        if not isinstance(root, h5py.Group):
            raise CheckpointError(f"{path}: no /{NETWORK} group; this is not a ZNN network checkpoint")
        spec = spec or _spec_from_file(path, root)
        net = _parameters(path, root, spec, dtype)
    net.check_shapes(str(path))
    return net


def load_statistics(path: str | Path) -> dict[str, np.ndarray]:
    """The learning-curve series saved in a checkpoint, keyed like ``"train/it"`` (empty if none)."""
    out: dict[str, np.ndarray] = {}
    with _reading(path) as (path, f):
        group = f.get(STATISTICS)
        if group is None:
            return {}
        if not isinstance(group, h5py.Group):
            raise CheckpointError(f"{path}: /{STATISTICS} is not a group of learning-curve series")
        names: list[str] = []
        group.visit(names.append)
        for name in names:
            node = group.get(name)
            if isinstance(node, h5py.Dataset):
                out[name] = _numeric(path, node)
    return out


@contextmanager
def _reading(path: str | Path) -> Iterator[tuple[Path, h5py.File]]:
    """Open a checkpoint to read; whatever h5py raises on the way (a damaged file) becomes a CheckpointError."""
    path = existing_file(path, CheckpointError, ".h5 network checkpoint", "give the path of a .h5 checkpoint")
    try:
        with h5py.File(path, "r") as f:
            yield path, f
    except ZnnError:
        raise
    except H5_ERRORS as exc:
        raise CheckpointError(f"{path}: cannot be read as HDF5 ({type(exc).__name__}: {exc}); is it a complete .h5 "
                              "checkpoint?") from None


def _numeric(path: Path, dset: h5py.Dataset) -> np.ndarray:
    # Checked on the header before reading: a damaged header can claim any type and any number of values.
    if dset.dtype.kind not in "fiu" or dset.shape is None:
        raise CheckpointError(f"{path}: {dset.name} is not a numeric array")
    if dset.size > max(path.stat().st_size, 1 << 20):
        raise CheckpointError(f"{path}: {dset.name} claims {dset.shape} values, more than the file can hold; the "
                              "checkpoint is damaged")
    data: np.ndarray | np.generic = dset[()]
    if isinstance(data, np.generic):  # a scalar dataset (the iteration of the learning curve)
        data = np.asarray(data)
    return data


def _text(group: h5py.Group, key: str, default: str | None = None) -> str:
    path = Path(group.file.filename)
    node = group.get(key)
    if node is None:
        if default is None:
            raise CheckpointError(f"{path}: /{group.name.lstrip('/')} has no {key!r} entry")
        return default
    if not isinstance(node, h5py.Dataset):
        raise CheckpointError(f"{path}: /{group.name.lstrip('/')}/{key} is a group; expected a string or integers")
    if node.shape is None or node.size > MAX_ENTRY:  # checked before reading: the header may be damaged
        raise CheckpointError(f"{path}: {node.name} holds {node.shape} values; a saved network entry is a string "
                              "or a few integers")
    value = node[()]
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError:
            raise CheckpointError(f"{path}: {node.name} is not UTF-8 text") from None
    elif isinstance(value, np.ndarray):
        if value.dtype.kind not in "iu":
            raise CheckpointError(f"{path}: {node.name} holds {value.dtype} values; expected a string or integers")
        value = ",".join(str(int(v)) for v in value.ravel())
    return _word(path, node.name, str(value))


def _word(path: Path, where: str, text: str) -> str:
    """``text`` if it is one word: entries become `.znn` lines, and white space would split or add lines."""
    if not text or any(c.isspace() for c in text):
        raise CheckpointError(f"{path}: {where} is {text!r}; a saved network entry is one word without spaces")
    return text


def _spec_from_file(path: Path, root: h5py.Group) -> NetworkSpec:
    """Rebuild the `.znn` text from the saved entries and parse it, so a saved spec is checked like a file."""
    from znn.io.netfile import parse_network

    lines: list[str] = []
    for name in root:
        group = root.get(name)
        if not isinstance(group, h5py.Group):
            raise CheckpointError(f"{path}: /{NETWORK}/{name} is not a group; every node and edge group is one")
        _word(path, f"the group name under /{NETWORK}", name)
        kind = _text(group, "group_type")
        if kind == "node":
            lines += [f"nodes {name}", f"type {_text(group, 'type')}", f"size {_text(group, 'size')}"]
            for key in ("function", "function_args"):
                if key in group:
                    lines.append(f"{key} {_text(group, key)}")
        elif kind == "edge":
            lines += [f"edges {name}", f"type {_text(group, 'type')}", f"input {_text(group, 'input')}",
                      f"output {_text(group, 'output')}"]
            for key in ("size", "stride", "init", "ratio", "offset"):
                if key in group:
                    lines.append(f"{key} {_text(group, key)}")
        else:
            raise CheckpointError(f"{path}: /{group.name.lstrip('/')} has group_type {kind!r}; expected node or edge")
        lines.append("")
    try:
        return parse_network("\n".join(lines), f"{path} (saved network)")
    except NetworkSpecError as exc:
        raise CheckpointError(f"{path}: the saved network is inconsistent: {exc}") from None


def _parameters(path: Path, root: h5py.Group, spec: NetworkSpec, dtype: np.dtype | type) -> Network:
    kernels, kernel_m, biases, bias_m = {}, {}, {}, {}
    for name in spec.conv_edges():
        group = _group(path, root, name, "conv edge group")
        kernels[name] = _array(path, group, "filters", dtype)
        kernel_m[name] = _array(path, group, "momentum_vol", dtype) if "momentum_vol" in group else np.zeros_like(kernels[name])
    for name in spec.bias_nodes():
        group = _group(path, root, name, "transfer node group")
        biases[name] = _array(path, group, "biases", dtype)
        bias_m[name] = _array(path, group, "momentum_vol", dtype) if "momentum_vol" in group else np.zeros_like(biases[name])
    for arrays, kind, key in ((kernels, "edge", "filters"), (kernel_m, "edge", "momentum_vol"),
                              (biases, "node", "biases"), (bias_m, "node", "momentum_vol")):
        _refuse_non_finite(path, arrays, kind, key)
    net = Network(spec, kernels, biases, kernel_m, bias_m)
    groups = [g for g in (root.get(name) for name in root) if isinstance(g, h5py.Group)]
    for key in ("eta", "momentum", "weight_decay"):
        group = next((g for g in groups if key in g), None)
        if group is not None:
            try:
                net.hyper[key] = float(_text(group, key))
            except ValueError:
                raise CheckpointError(f"{path}: /{group.name.lstrip('/')}/{key} is not a number") from None
            if not math.isfinite(net.hyper[key]):
                raise CheckpointError(f"{path}: /{group.name.lstrip('/')}/{key} is {net.hyper[key]}; the checkpoint "
                                      "is damaged, use an earlier one")
    return net


def _refuse_non_finite(path: Path, arrays: Mapping[str, np.ndarray], kind: str, key: str) -> None:
    """CheckpointError naming the group and the first NaN or infinite value of its ``key`` (as loaded, in the
    network's dtype): one NaN weight makes every prediction NaN."""
    for name, array in arrays.items():
        found = find_non_finite(array)
        if found is not None:
            raise CheckpointError(f"{path}: {kind} group {name!r} (/{NETWORK}/{name}/{key}) holds "
                                  f"{found.describe(axes=None)}; the run that saved it diverged or the file is "
                                  "damaged: use an earlier checkpoint")


def _group(path: Path, root: h5py.Group, name: str, what: str) -> h5py.Group:
    group = root.get(name)
    if not isinstance(group, h5py.Group):
        raise CheckpointError(f"{path}: no /{NETWORK}/{name} group for {what} {name!r}; the checkpoint was saved "
                              "for a different network")
    return group


def _array(path: Path, group: h5py.Group, key: str, dtype: np.dtype | type) -> np.ndarray:
    dset = group.get(key)
    if not isinstance(dset, h5py.Dataset):
        raise CheckpointError(f"{path}: /{group.name.lstrip('/')} has no {key!r} dataset")
    return _numeric(path, dset).astype(dtype)
