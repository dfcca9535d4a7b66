"""Fixtures of the Slicer-logic tests: real MRML classes from the slicer-core wheel, no Slicer app.

The module's logic package (AutoSegExtension/AutoSegLogic) is imported the way Slicer imports
it, from the module folder on sys.path. Every scene is built in code from phantom cases.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXTENSION = REPO / "AutoSegExtension"
for path in (str(REPO), str(EXTENSION)):
    if path not in sys.path:
        sys.path.insert(0, path)

slicer = pytest.importorskip("slicer", reason="the Slicer logic tests need the slicer-core wheel")


@pytest.fixture(autouse=True)
def job_logs_in_tmp_path(tmp_path, monkeypatch):
    """Jobs started without a log path log to a new temporary file (as in Slicer); in tests that
    file belongs in the test's own folder, not in /tmp."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture(scope="session")
def planned(tmp_path_factory):
    """Five phantom CT cases exported from a scene, planned and preprocessed for 3d_fullres with a
    tiny network: (dataset folder, work folder). Tests that train copy the work folder."""
    from AutoSegLib import cli
    from AutoSegLogic import dataset_export, testing

    root = tmp_path_factory.mktemp("planned")
    dataset, work = root / "Dataset900_Phantom", root / "Dataset900_Phantom.autoseg"
    scene = slicer.vtkMRMLScene()
    cases = [dataset_export.SceneCase(*testing.phantom_case(scene, seed=3, index=i)) for i in range(5)]
    dataset_export.export_cases(dataset, cases, scene, ["CT"])
    assert cli.main(["plan-and-preprocess", str(dataset), "-w", str(work), "-c", "3d_fullres", "--events"]) == 0
    testing.shrink_plans(work)
    return dataset, work


@pytest.fixture
def work_copy(planned, tmp_path):
    """Private copies of the planned dataset and work folder (tests add cases and train)."""
    import shutil

    dataset, work = planned
    shutil.copytree(dataset, tmp_path / dataset.name)
    shutil.copytree(work, tmp_path / "work")
    return tmp_path / dataset.name, tmp_path / "work"
