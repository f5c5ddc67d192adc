"""Volume I/O: one contract every format passes, then format-specific behaviour and an out-of-core read."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import dask.array as da
import h5py
import numpy as np
import pytest
import zarr

from tests.shared import ROOT
from znn.errors import VolumeError, ZnnFileNotFoundError
from znn.io.volume import (
    VolumePath,
    create_volume,
    open_volume,
    parse_volume_path,
    read_volume,
    volume_shape_dtype,
    write_volume,
)

SHARED = ROOT / ".." / "shared"
SHAPES = [(13, 17), (4, 13, 17), (2, 3, 13, 17)]


def _data(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    """Seeded random values spanning the dtype's range (floats with fractional parts)."""
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return (rng.standard_normal(shape) * 1e3).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def _failing(shape: tuple[int, ...], fail_at: int) -> da.Array:
    """A dask array whose block ``fail_at`` (along axis 0) raises while being computed."""

    def block(x: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        if block_info is not None and block_info[None]["chunk-location"][0] == fail_at:
            raise RuntimeError("block failed")
        return x

    return da.zeros(shape, dtype="uint8", chunks=(1,) + shape[1:]).map_blocks(block, dtype="uint8")


class VolumeContract:
    """Behaviour every format shares; subclasses set ``ext``."""

    ext: str = ""

    def path(self, tmp_path: Path, name: str = "vol") -> str:
        return str(tmp_path / f"{name}{self.ext}")

    @pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d", "4d"])
    @pytest.mark.parametrize("dtype", ["uint8", "float32"])
    def test_round_trip_exact(self, tmp_path: Path, shape: tuple[int, ...], dtype: str) -> None:
        data = _data(shape, dtype)
        write_volume(self.path(tmp_path), data)
        back = read_volume(self.path(tmp_path))
        assert back.dtype == data.dtype and back.shape == data.shape
        np.testing.assert_array_equal(back, data)

    @pytest.mark.parametrize("dtype", ["uint16", "int32", "float64"])
    def test_round_trip_other_dtypes(self, tmp_path: Path, dtype: str) -> None:
        data = _data((3, 11, 7), dtype)
        write_volume(self.path(tmp_path), data)
        back = read_volume(self.path(tmp_path))
        assert back.dtype == data.dtype
        np.testing.assert_array_equal(back, data)

    @pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d", "4d"])
    def test_lazy_open_equals_read(self, tmp_path: Path, shape: tuple[int, ...]) -> None:
        write_volume(self.path(tmp_path), _data(shape, "float32"))
        lazy = open_volume(self.path(tmp_path), chunks=(2,) * (len(shape) - 2) + (5, 6))
        assert lazy.numblocks[-1] > 1 and lazy.dtype == np.float32
        np.testing.assert_array_equal(lazy.compute(scheduler="sync"), read_volume(self.path(tmp_path)))

    def test_lazy_default_chunks_and_deterministic_keys(self, tmp_path: Path) -> None:
        write_volume(self.path(tmp_path), _data((4, 13, 17), "uint8"))
        one, two = open_volume(self.path(tmp_path)), open_volume(self.path(tmp_path))
        assert one.shape == (4, 13, 17) and one.name == two.name
        np.testing.assert_array_equal(one.compute(), read_volume(self.path(tmp_path)))

    def test_graph_pickles_without_file_handles(self, tmp_path: Path) -> None:
        write_volume(self.path(tmp_path), _data((4, 13, 17), "int32"))
        lazy = open_volume(self.path(tmp_path), chunks=(2, 13, 17))
        graph = pickle.loads(pickle.dumps(dict(lazy.__dask_graph__())))
        back = da.Array(graph, lazy.name, lazy.chunks, meta=lazy._meta)
        np.testing.assert_array_equal(back.compute(scheduler="sync"), read_volume(self.path(tmp_path)))

    def test_write_dask_array(self, tmp_path: Path) -> None:
        data = _data((2, 5, 13, 17), "float32")
        lazy = da.from_array(data, chunks=(1, 2, 7, 17)) * 2 + 1  # irregular last blocks, a real graph
        write_volume(self.path(tmp_path), lazy)
        np.testing.assert_array_equal(read_volume(self.path(tmp_path)), data * 2 + 1)

    def test_shape_dtype(self, tmp_path: Path) -> None:
        write_volume(self.path(tmp_path), _data((3, 13, 17), "uint16"))
        assert volume_shape_dtype(self.path(tmp_path)) == ((3, 13, 17), np.dtype("uint16"))

    def test_missing_file(self, tmp_path: Path) -> None:
        path = self.path(tmp_path, "absent")
        for call in (read_volume, open_volume, volume_shape_dtype):
            with pytest.raises(ZnnFileNotFoundError, match="absent") as info:
                call(path)
            assert isinstance(info.value, FileNotFoundError)

    def test_overwrite_protection(self, tmp_path: Path) -> None:
        first, second = _data((13, 17), "uint8", 1), _data((13, 17), "uint8", 2)
        write_volume(self.path(tmp_path), first)
        with pytest.raises(VolumeError, match="overwrite=True"):
            write_volume(self.path(tmp_path), second)
        np.testing.assert_array_equal(read_volume(self.path(tmp_path)), first)
        write_volume(self.path(tmp_path), second, overwrite=True)
        np.testing.assert_array_equal(read_volume(self.path(tmp_path)), second)

    def test_failed_write_leaves_nothing(self, tmp_path: Path) -> None:
        with pytest.raises(RuntimeError, match="block failed"):
            write_volume(self.path(tmp_path), _failing((4, 13, 17), fail_at=2))
        assert list(tmp_path.iterdir()) == []

    @pytest.mark.parametrize("shape", [(5,), (1, 2, 3, 4, 5)])
    def test_rejects_bad_ndim(self, tmp_path: Path, shape: tuple[int, ...]) -> None:
        with pytest.raises(VolumeError, match=rf"{len(shape)}D .*2D to 4D"):
            write_volume(self.path(tmp_path), np.zeros(shape, "uint8"))
        assert list(tmp_path.iterdir()) == []

    def test_rejects_bad_dtype(self, tmp_path: Path) -> None:
        with pytest.raises(VolumeError, match="complex128 is not supported"):
            write_volume(self.path(tmp_path), np.zeros((3, 3), complex))


class TestTif(VolumeContract):
    ext = ".tif"

    def test_tiff_suffix_and_rgb_like_shape(self, tmp_path: Path) -> None:
        data = _data((5, 7, 3), "uint8")  # a last axis of 3 must not turn into RGB samples
        write_volume(tmp_path / "v.tiff", data)
        np.testing.assert_array_equal(read_volume(tmp_path / "v.tiff"), data)

    def test_failed_overwrite_keeps_old_file(self, tmp_path: Path) -> None:
        write_volume(self.path(tmp_path), np.ones((4, 13, 17), "uint8"))
        with pytest.raises(RuntimeError):
            write_volume(self.path(tmp_path), _failing((4, 13, 17), fail_at=1), overwrite=True)
        np.testing.assert_array_equal(read_volume(self.path(tmp_path)), 1)
        assert len(list(tmp_path.iterdir())) == 1

    def test_create_volume_is_zarr_only(self, tmp_path: Path) -> None:
        with pytest.raises(VolumeError, match="zarr only"):
            create_volume(self.path(tmp_path), (4, 4), "uint8", (2, 2))

    def test_compression_is_h5_only(self, tmp_path: Path) -> None:
        with pytest.raises(VolumeError, match="h5 volumes only"):
            write_volume(self.path(tmp_path), np.zeros((3, 3)), compression="gzip")

    @pytest.mark.parametrize("bits", [0, 65535])
    def test_first_page_without_a_data_type(self, tmp_path: Path, bits: int) -> None:
        """tifffile meets a shaped series whose first page has no data type with a bare ``assert``."""
        path = Path(self.path(tmp_path))
        write_volume(path, _data((2, 16, 16), "uint16"))
        raw = bytearray(path.read_bytes())
        ifd = struct.unpack("<I", raw[4:8])[0]
        entries = [ifd + 2 + 12 * i for i in range(struct.unpack("<H", raw[ifd:ifd + 2])[0])]
        bits_per_sample = next(e for e in entries if struct.unpack("<H", raw[e:e + 2])[0] == 258)
        raw[bits_per_sample + 8:bits_per_sample + 10] = struct.pack("<H", bits)
        path.write_bytes(raw)
        for load in (read_volume, lambda p: open_volume(p).compute(scheduler="sync")):
            with pytest.raises(VolumeError, match=rf"{path.name}: not a readable TIFF file"):
                load(path)

    def test_isbi2012_train_volume(self) -> None:
        path = SHARED / "data" / "isbi2012" / "train-volume.tif"
        if not path.exists():
            pytest.skip(f"shared data absent: {path}")
        assert volume_shape_dtype(path) == ((20, 512, 512), np.dtype("uint8"))
        whole = read_volume(path)
        np.testing.assert_array_equal(open_volume(path, chunks=(3, 200, 512)).compute(), whole)


class TestH5(VolumeContract):
    ext = ".h5"

    @pytest.fixture
    def several(self, tmp_path: Path) -> Path:
        path = tmp_path / "data.h5"
        with h5py.File(path, "w") as f:
            for name in ("a", "b", "g/c"):
                f[name] = np.full((3, 4), len(name), "int32")
        return path

    def test_several_datasets_need_a_name(self, several: Path) -> None:
        with pytest.raises(VolumeError, match=r"3 datasets \(a, b, g/c\); name one as .*data.h5:/a"):
            read_volume(several)
        np.testing.assert_array_equal(read_volume(f"{several}:/g/c"), 3)

    def test_missing_dataset_lists_existing(self, several: Path) -> None:
        for call in (read_volume, open_volume, volume_shape_dtype):
            with pytest.raises(VolumeError, match=r"no dataset 'missing'.*\(a, b, g/c\)"):
                call(f"{several}:/missing")

    def test_empty_file(self, tmp_path: Path) -> None:
        h5py.File(tmp_path / "e.h5", "w").close()
        with pytest.raises(VolumeError, match="holds no datasets"):
            read_volume(tmp_path / "e.h5")

    def test_named_dataset_added_keeping_others(self, several: Path) -> None:
        write_volume(f"{several}:/new/x", np.arange(6, dtype="float64").reshape(2, 3))
        with pytest.raises(VolumeError, match="dataset exists; pass overwrite=True"):
            write_volume(f"{several}:/a", np.zeros((2, 2), "uint8"))
        write_volume(f"{several}:/a", np.zeros((2, 2), "uint8"), overwrite=True)
        with h5py.File(several) as f:
            assert sorted(f) == ["a", "b", "g", "new"] and f["a"].shape == (2, 2)
        assert [p.name for p in several.parent.iterdir()] == ["data.h5"]

    @pytest.mark.parametrize("compression", ["gzip", "lzf"])
    def test_compression(self, tmp_path: Path, compression: str) -> None:
        data = _data((4, 13, 17), "int32")
        write_volume(tmp_path / "c.hdf5", da.from_array(data, chunks=(2, 7, 7)), chunks=(2, 8, 8),
                     compression=compression)
        with h5py.File(tmp_path / "c.hdf5") as f:
            assert f["main"].compression == compression and f["main"].chunks == (2, 8, 8)
        np.testing.assert_array_equal(read_volume(tmp_path / "c.hdf5"), data)

    def test_failed_overwrite_keeps_old_file(self, tmp_path: Path) -> None:
        write_volume(self.path(tmp_path), np.ones((4, 13, 17), "uint8"))
        with pytest.raises(RuntimeError):
            write_volume(self.path(tmp_path), _failing((4, 13, 17), fail_at=1), overwrite=True)
        np.testing.assert_array_equal(read_volume(self.path(tmp_path)), 1)
        assert len(list(tmp_path.iterdir())) == 1

    def test_gala_fib_lzf_labels(self) -> None:
        path = SHARED / "data" / "gala-fib" / "train-gt.lzf.h5"
        if not path.exists():
            pytest.skip(f"shared data absent: {path}")
        assert volume_shape_dtype(path) == ((50, 100, 200), np.dtype("int32"))
        whole = read_volume(f"{path}:/stack")
        np.testing.assert_array_equal(read_volume(path), whole)
        np.testing.assert_array_equal(open_volume(path, chunks=(16, 50, 64)).compute(), whole)


class TestZarr(VolumeContract):
    ext = ".zarr"

    def test_nested_groups(self, tmp_path: Path) -> None:
        store = tmp_path / "s.zarr"
        data = _data((3, 13, 17), "float32")
        write_volume(f"{store}/a/b/raw", data, chunks=(1, 8, 8))
        np.testing.assert_array_equal(read_volume(f"{store}/a/b/raw"), data)
        np.testing.assert_array_equal(read_volume(f"{store}/a"), data)  # a group with one array
        assert open_volume(f"{store}/a/b/raw").chunks[1] == (8, 5)  # the store's chunks
        write_volume(f"{store}/a/labels", np.zeros((3, 4), "uint8"))
        with pytest.raises(VolumeError, match=r"group holding 2 volumes \(a/b/raw, a/labels\)"):
            read_volume(f"{store}/a")
        with pytest.raises(VolumeError, match=r"no array 'a/nope'.*\(a/b/raw, a/labels\)"):
            read_volume(f"{store}/a/nope")

    def test_failed_write_into_existing_store_keeps_siblings(self, tmp_path: Path) -> None:
        store = tmp_path / "s.zarr"
        write_volume(f"{store}/keep", np.ones((3, 3), "uint8"))
        with pytest.raises(RuntimeError):
            write_volume(f"{store}/g/bad", _failing((4, 13, 17), fail_at=3))
        assert not (store / "g").exists()
        np.testing.assert_array_equal(read_volume(store), 1)

    def test_create_volume(self, tmp_path: Path) -> None:
        z = create_volume(tmp_path / "out.zarr/pred", (2, 6, 8, 8), "float32", (1, 3, 8, 8))
        z[1, 3:6] = 7.0
        with pytest.raises(VolumeError, match="array exists"):
            create_volume(tmp_path / "out.zarr/pred", (2, 6, 8, 8), "float32", (1, 3, 8, 8))
        assert read_volume(tmp_path / "out.zarr/pred").sum() == 7 * 3 * 64
        assert volume_shape_dtype(tmp_path / "out.zarr") == ((2, 6, 8, 8), np.dtype("float32"))
        assert open_volume(tmp_path / "out.zarr/pred").chunks[1] == (3, 3)


def test_formats_on_distributed(tmp_path: Path) -> None:
    """Lazy reads and dask writes of every format run on worker processes (nothing unpicklable in graphs)."""
    distributed = pytest.importorskip("distributed")
    data = _data((4, 13, 17), "uint16")
    sources = {ext: str(tmp_path / f"in{ext}") for ext in (".tif", ".h5", ".zarr")}
    for path in sources.values():
        write_volume(path, data)
    with distributed.Client(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None):
        for ext, path in sources.items():
            lazy = open_volume(path, chunks=(1, 7, 17))
            np.testing.assert_array_equal(lazy.compute(), data)
            write_volume(tmp_path / f"out{ext}", lazy + 1)
            np.testing.assert_array_equal(read_volume(tmp_path / f"out{ext}"), data + 1)


def test_parse_volume_path() -> None:
    assert parse_volume_path("a/b.tiff") == VolumePath("tif", Path("a/b.tiff"))
    assert parse_volume_path("b.H5:/g/d") == VolumePath("h5", Path("b.H5"), "g/d")
    assert parse_volume_path("b.hdf:") == VolumePath("h5", Path("b.hdf"))
    assert parse_volume_path("/x/s.zarr/g/a") == VolumePath("zarr", Path("/x/s.zarr"), "g/a")
    assert str(parse_volume_path("b.h5:/g/d")) == "b.h5:/g/d"
    with pytest.raises(VolumeError, match=r"cannot tell the volume format.*store.zarr\[/group/array\]"):
        parse_volume_path("image.png")


# ---- out of core -------------------------------------------------------------------------------------------

HEADROOM = 128 << 20  # address space the child may add to its baseline
OOC_SHAPE, OOC_CHUNKS = (192, 1024, 2048), (2, 1024, 2048)  # 384 MiB = 3x the headroom, 4 MiB chunks

CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import dask
    from znn.io.volume import open_volume, read_volume

    path, headroom = sys.argv[1], int(sys.argv[2])
    lazy = open_volume(path)
    # warm up so zarr's event loop and codec threads exist before the limit is set
    dask.compute(lazy[:4].sum(dtype="int64"), scheduler="synchronous")
    with open("/proc/self/statm") as f:
        baseline = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (baseline + headroom, baseline + headroom))
    total, top = dask.compute(lazy.sum(dtype="int64"), lazy.max(), scheduler="synchronous")
    try:
        read_volume(path)
        whole = "read"
    except MemoryError:
        whole = "MemoryError"
    print(json.dumps({"sum": int(total), "max": int(top), "whole": whole, "blocks": lazy.npartitions}))
    """
)


@pytest.fixture(scope="module")
def big_zarr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int, int]]:
    """A random uint8 zarr volume of OOC_SHAPE (uncompressed: as large on disk as in memory), its sum, max."""
    path = tmp_path_factory.mktemp("ooc") / "big.zarr"
    z = zarr.create_array(path, shape=OOC_SHAPE, chunks=OOC_CHUNKS, dtype="uint8", compressors=None)
    rng, total, top = np.random.default_rng(7), 0, 0
    for z0 in range(0, OOC_SHAPE[0], OOC_CHUNKS[0]):
        block = rng.integers(0, 255, size=OOC_CHUNKS, dtype="uint8", endpoint=True)
        z[z0 : z0 + OOC_CHUNKS[0]] = block
        total, top = total + int(block.sum(dtype=np.int64)), max(top, int(block.max()))
    yield path, total, top


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc for the address space")
def test_out_of_core_read(big_zarr: tuple[Path, int, int]) -> None:
    path, total, top = big_zarr
    assert np.prod(OOC_SHAPE) >= 3 * HEADROOM
    env = os.environ | {"MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", CHILD, str(path), str(HEADROOM)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"sum": total, "max": top, "whole": "MemoryError", "blocks": OOC_SHAPE[0] // 2}
