"""What a wheel holds: pyproject.toml lists every package under znn/ and the bundled job files of workflows/
(installed as ``znn.workflows``), and :func:`znn.io.bundled.bundled_file` finds them or says what is missing."""

from __future__ import annotations

import glob
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.shared import ROOT
from znn.errors import ZnnFileNotFoundError
from znn.io.bundled import bundled_file
from znn.pipeline.jobs.quickstart import JOB_FILES

WORKFLOWS = ROOT / "workflows"
JOB_SUFFIXES = (".znn", ".spec", ".cfg", ".yaml")


def pyproject() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def setuptools_config() -> dict[str, Any]:
    config: dict[str, Any] = pyproject()["tool"]["setuptools"]
    return config


def packages_on_disk() -> set[str]:
    """Dotted names of the directories under znn/ that hold an __init__.py."""
    return {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "znn").rglob("__init__.py")}


def job_files() -> set[str]:
    """Job files under workflows/ (relative, posix), leaving out the data/ folders users link volumes into."""
    found: set[str] = set()
    for folder, subfolders, names in os.walk(WORKFLOWS):
        subfolders[:] = [d for d in subfolders if d != "data"]
        found |= {Path(folder, n).relative_to(WORKFLOWS).as_posix() for n in names if n.endswith(JOB_SUFFIXES)}
    return found


def packaged(patterns: list[str]) -> set[str]:
    """The files of workflows/ that the package-data ``patterns`` take, matched as setuptools does (glob)."""
    return {Path(p).as_posix() for pattern in patterns for p in glob.glob(pattern, root_dir=WORKFLOWS)}


def test_packages_list_names_every_package_under_znn_and_the_workflows() -> None:
    listed = setuptools_config()["packages"]
    assert len(listed) == len(set(listed)), "a package is listed twice"
    assert set(listed) == packages_on_disk() | {"znn.workflows"}


def test_workflows_package_is_the_workflows_folder() -> None:
    assert setuptools_config()["package-dir"] == {"znn.workflows": "workflows"}


def test_every_job_file_is_package_data() -> None:
    package_data = setuptools_config()["package-data"]
    jobs = job_files()
    assert {"quickstart/net.znn", "inference/n337.znn", "batch/workflow.yaml"} <= jobs  # the walk found them
    assert jobs - packaged(package_data["znn.workflows"]) == set()


def test_the_version_is_written_once_as_znn_version() -> None:
    project = pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert setuptools_config()["dynamic"]["version"] == {"attr": "znn.__version__"}


@pytest.mark.parametrize("name", JOB_FILES)
def test_bundled_file_finds_the_quickstart_job(name: str) -> None:
    # where it lies depends on the installation (a wheel's site-packages, an editable checkout)
    path = bundled_file("quickstart", name)
    assert path.is_file()
    assert path.parts[-2:] == ("quickstart", name)


def test_bundled_file_refuses_a_missing_file() -> None:
    with pytest.raises(ZnnFileNotFoundError, match=r"workflows/quickstart/missing\.znn is missing"):
        bundled_file("quickstart", "missing.znn")
