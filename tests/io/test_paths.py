"""Where outputs may go (:mod:`znn.io.paths`) and one run per output (:mod:`znn.io.locks`)."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import pytest

from znn.errors import OutputBusyError, OutputError
from znn.io.locks import RunLock, lock_beside
from znn.io.paths import check_apart, check_writable, volume_file


def _unwritable_for_us() -> Path | None:
    """A folder this process cannot create a file in, also as root (sysfs), or None."""
    for folder in (Path("/sys"), Path("/proc/sys")):
        try:
            fd, probe = tempfile.mkstemp(dir=folder)
        except OSError:
            return folder if folder.is_dir() else None
        os.close(fd)
        os.unlink(probe)
    return None


# ---------------------------------------------------------------------------------------------- check_apart
@pytest.mark.parametrize("output, source", [
    ("in.tif", "in.tif"),
    ("in.tif", "in.tif[0:2]"),
    ("sub/../in.tif", "in.tif"),
    ("in.h5:/pred", "in.h5:/raw"),
    ("in.zarr", "in.zarr/raw"),
    ("in.zarr/pred_sample1_output.zarr", "in.zarr/raw"),
    ("in.zarr/raw/deeper.json", "in.zarr"),
    ("folder", "folder/in.tif"),
])
def test_outputs_sharing_bytes_with_an_input_are_refused(tmp_path, monkeypatch, output, source):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    with pytest.raises(OutputError, match=r"^--out .* would write over labels .*; name another"):
        check_apart([("--out", output)], [("labels", source)], "name another")


def test_symlinks_and_hard_links_are_followed(tmp_path):
    (tmp_path / "in.tif").write_bytes(b"data")
    (tmp_path / "link.tif").symlink_to(tmp_path / "in.tif")
    os.link(tmp_path / "in.tif", tmp_path / "hard.tif")
    for alias in ("link.tif", "hard.tif"):
        with pytest.raises(OutputError, match="the same file"):
            check_apart([("out", tmp_path / alias)], [("input", tmp_path / "in.tif")], "fix")


def test_separate_outputs_pass(tmp_path):
    check_apart([("out", tmp_path / "out.zarr"), ("export", f"{tmp_path}/out.h5:/raw")],
                [("input", tmp_path / "in.zarr/raw"), ("other", f"{tmp_path}/in.h5:/raw"),
                 ("remote", "s3://bucket/in.zarr")], "fix")
    assert volume_file(f"{tmp_path}/a.h5:/x") == volume_file(tmp_path / "a.h5")


# ------------------------------------------------------------------------------------------- check_writable
def test_writable_places(tmp_path):
    assert check_writable(tmp_path / "new" / "deeper" / "out.zarr", "store", folder=True) == \
        tmp_path / "new" / "deeper" / "out.zarr"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    (tmp_path / "file.tif").write_bytes(b"")
    check_writable(tmp_path / "file.tif", "export", folder=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.tif"]  # the probe is gone


@pytest.mark.parametrize("name, folder, message", [
    ("afile", True, "is a file, but a folder goes there"),
    ("adir", False, "is a folder"),
    ("afile/below/out.zarr", True, "afile is a file, not a folder"),
])
def test_wrong_kind_of_place(tmp_path, name, folder, message):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    with pytest.raises(OutputError, match=f"^what {tmp_path / name}: .*{message}; the fix$"):
        check_writable(tmp_path / name, "what", folder=folder, fix="the fix")


def test_a_folder_nobody_may_write_is_found_by_trying():
    folder = _unwritable_for_us()
    if folder is None:
        pytest.skip("no folder here refuses new files to this user")
    with pytest.raises(OutputError, match=f"cannot write in {folder}"):
        check_writable(folder / "out" / "pred.zarr", "output store", folder=True)


# ---------------------------------------------------------------------------------------------------- RunLock
def test_lock_records_its_holder_and_refuses_another_thread(tmp_path):
    lock = lock_beside(tmp_path / "out.zarr")
    assert lock == tmp_path / "out.zarr.lock"
    errors: list[BaseException] = []
    with RunLock(lock, "output store out.zarr"):
        assert RunLock.held(lock)
        with RunLock(lock, "again"):  # re-entrant within one thread
            pass
        assert lock.with_name("out.zarr.lock.json").is_file()  # the outer hold keeps its record

        def other() -> None:
            try:
                with RunLock(lock, "output store out.zarr"):
                    pass
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                errors.append(exc)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert len(errors) == 1 and isinstance(errors[0], OutputBusyError)
    assert f"output store out.zarr is in use by another run (pid {os.getpid()} on host " in str(errors[0])
    assert not RunLock.held(lock) and not lock.with_name("out.zarr.lock.json").exists()
