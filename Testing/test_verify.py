"""``verify``: one tiny broken dataset per check, each built here and broken in one way.

Every test asserts that the problem is found with the right severity, that its message
names the offending file (or case) and states the offending values.
"""

import io
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AutoSegLib import verify
from AutoSegLib.events import Reporter
from AutoSegLib.imageio import Geometry, write_image
from AutoSegLib.verify import verify_dataset

SHAPE = (8, 12, 10)
GEOMETRY = Geometry((2.0, 1.0, 1.5), (10.0, -20.0, 30.0), tuple(np.eye(3).ravel()))
LABELS = {"background": 0, "organ": 1}


def image_array(seed: int = 0, shape=SHAPE) -> np.ndarray:
    return (np.random.default_rng(seed).normal(40, 5, shape)).astype(np.int16)


def label_array(shape=SHAPE) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[2:6, 3:9, 2:8] = 1
    return label


def make_dataset(root: Path, cases: int = 2, channels: int = 1, test_cases: int = 0,
                 ending: str = ".nii.gz", geometry: Geometry = GEOMETRY) -> Path:
    """A valid dataset: ``case_{i}`` with ``channels`` channels, and ``test_{i}`` in imagesTs."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(cases):
        for c in range(channels):
            write_image(image_array(i * 10 + c), geometry, root / "imagesTr" / f"case_{i}_{c:04d}{ending}")
        write_image(label_array(), geometry, root / "labelsTr" / f"case_{i}{ending}")
    for i in range(test_cases):
        for c in range(channels):
            write_image(image_array(100 + i * 10 + c), geometry, root / "imagesTs" / f"test_{i}_{c:04d}{ending}")
    spec = {"channel_names": {str(c): f"MR{c}" for c in range(channels)}, "labels": LABELS,
            "numTraining": cases, "file_ending": ending}
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


@pytest.fixture
def ds(tmp_path) -> Path:
    return make_dataset(tmp_path / "Dataset001_Tiny")


def found(report, check: str, severity: str = "error") -> list:
    """The problems of one check; the rest of the report must hold no other error."""
    problems = [p for p in report.problems if p.check == check and p.severity == severity]
    assert problems, report.format()
    return problems


def only(report, check: str, severity: str = "error"):
    problems = found(report, check, severity)
    others = [p for p in report.errors if p.check != check]
    assert not others, report.format()
    assert len(problems) == 1, report.format()
    return problems[0]


def rewrite(path: Path, array: np.ndarray, geometry: Geometry = GEOMETRY) -> None:
    write_image(array, geometry, path)


# -- clean ---------------------------------------------------------------------------------------
def test_clean_dataset_has_no_problems(tmp_path):
    root = make_dataset(tmp_path / "ds", cases=3, channels=2, test_cases=2)
    report = verify_dataset(root, num_processes=1)
    assert report.ok and report.problems == [], report.format()
    assert (report.training_cases, report.test_cases) == (3, 2)
    assert "0 error(s), 0 warning(s)" in report.format()


# -- dataset.json ----------------------------------------------------------------------------------
@pytest.mark.parametrize("write, expected", [
    (None, "dataset.json not found"),
    ('{"channel_names": {"0": "CT"}, ', "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not a text file (byte 0 is not UTF-8)"),
    (json.dumps({"channel_names": {"0": "CT"}, "numTraining": 2, "file_ending": ".nii.gz"}), "missing key 'labels'"),
    (json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 2}, "numTraining": 2,
                 "file_ending": ".nii.gz"}), "consecutive from 0, found [0, 2]"),
])
def test_bad_dataset_json_is_the_only_problem_reported(ds, write, expected):
    (ds / "dataset.json").unlink()
    if write is not None:
        (ds / "dataset.json").write_bytes(write if isinstance(write, bytes) else write.encode())
    (ds / "labelsTr" / "case_0.nii.gz").unlink()  # not reported: nothing can be checked without the spec
    report = verify_dataset(ds, num_processes=1)
    problem = only(report, "dataset_json")
    assert expected in problem.message and "dataset.json" in problem.message
    assert problem.file == ds / "dataset.json"


def test_num_training_mismatch(ds):
    spec = json.loads((ds / "dataset.json").read_text())
    (ds / "dataset.json").write_text(json.dumps({**spec, "numTraining": 5}))
    problem = only(verify_dataset(ds, num_processes=1), "num_training")
    assert "numTraining is 5" in problem.message and "2 training case(s)" in problem.message


def test_empty_dataset(tmp_path):
    root = make_dataset(tmp_path / "ds", cases=0)
    problem = only(verify_dataset(root, num_processes=1), "empty")
    assert "imagesTr" in problem.message and "no training cases" in problem.message


# -- layout ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("check, breakage, expected", [
    ("missing_channel", lambda r: (r / "imagesTr/case_1_0001.nii.gz").unlink(),
     ["case 'case_1'", "imagesTr/case_1_0001.nii.gz"]),
    ("missing_label", lambda r: (r / "labelsTr/case_1.nii.gz").unlink(), ["case 'case_1'", "labelsTr/case_1.nii.gz"]),
    ("orphan_label", lambda r: (r / "labelsTr/case_9.nii.gz").write_bytes((r / "labelsTr/case_0.nii.gz").read_bytes()),
     ["labelsTr/case_9.nii.gz", "imagesTr/case_9_0000.nii.gz"]),
    ("unexpected_file", lambda r: (r / "imagesTr/notes.txt").write_text("x"), ["imagesTr/notes.txt", "not an image"]),
    ("unexpected_file", lambda r: (r / "imagesTr/case_0_0002.nii.gz").write_bytes(b""),
     ["imagesTr/case_0_0002.nii.gz", "channel 2 is not in channel_names [0, 1]"]),
])
def test_layout_problems_name_the_files(tmp_path, check, breakage, expected):
    root = make_dataset(tmp_path / "ds", channels=2)
    breakage(root)
    problem = found(verify_dataset(root, num_processes=1), check)[0]
    for text in expected:
        assert text in problem.message


def test_duplicate_case_ids(ds):
    for sub, name in [("imagesTr", "CASE_0_0000.nii.gz"), ("labelsTr", "CASE_0.nii.gz")]:
        (ds / sub / name).write_bytes((ds / sub / name.lower()).read_bytes())
    spec = json.loads((ds / "dataset.json").read_text())
    (ds / "dataset.json").write_text(json.dumps({**spec, "numTraining": 3}))
    problems = found(verify_dataset(ds, num_processes=1), "duplicate")
    assert any("imagesTr/CASE_0_0000.nii.gz" in p.message and "imagesTr/case_0_0000.nii.gz" in p.message
               for p in problems)


# -- label against image ---------------------------------------------------------------------------
def test_label_shape_mismatch_gives_both_shapes(ds):
    rewrite(ds / "labelsTr/case_1.nii.gz", label_array((8, 12, 9)))
    problem = only(verify_dataset(ds, num_processes=1), "shape")
    assert problem.case == "case_1" and problem.file == ds / "labelsTr/case_1.nii.gz"
    assert "labelsTr/case_1.nii.gz" in problem.message and "imagesTr/case_1_0000.nii.gz" in problem.message
    assert "8x12x9" in problem.message and "8x12x10" in problem.message


@pytest.mark.parametrize("field, value, expected", [
    ("spacing", (2.0, 1.0, 1.6), ["[2, 1, 1.6]", "[2, 1, 1.5]"]),
    ("origin", (10.0, -20.0, 30.01), ["[10, -20, 30.01]", "[10, -20, 30]"]),
    ("direction", (1.0, 0, 0, 0, 0, -1.0, 0, 1.0, 0), ["[1, 0, 0, 0, 0, -1, 0, 1, 0]", "[1, 0, 0, 0, 1, 0, 0, 0, 1]"]),
])
def test_label_geometry_mismatch_gives_both_values(ds, field, value, expected):
    rewrite(ds / "labelsTr/case_0.nii.gz", label_array(), Geometry(**{**GEOMETRY.__dict__, field: value}))
    problem = only(verify_dataset(ds, num_processes=1), "geometry")
    assert problem.message.startswith("labelsTr/case_0.nii.gz: label " + field)
    for text in expected:
        assert text in problem.message


def test_geometry_differences_within_tolerance_pass(ds):
    # float32 NIfTI round-off is ~1e-7; these sit just inside the documented tolerances.
    geometry = Geometry((2.0 * (1 + 5e-5), 1.0, 1.5), (10.0005, -20.0, 30.0), tuple(np.eye(3).ravel()))
    rewrite(ds / "labelsTr/case_0.nii.gz", label_array(), geometry)
    assert verify_dataset(ds, num_processes=1).problems == []


# -- channels of one case --------------------------------------------------------------------------
@pytest.mark.parametrize("array, geometry, check, expected", [
    (image_array(shape=(8, 11, 10)), GEOMETRY, "shape", ["8x11x10", "8x12x10"]),
    (image_array(), Geometry((3.0, 1.0, 1.5), GEOMETRY.origin, GEOMETRY.direction), "geometry", ["[3, 1, 1.5]", "[2, 1, 1.5]"]),
])
def test_channels_of_a_case_must_agree(tmp_path, array, geometry, check, expected):
    root = make_dataset(tmp_path / "ds", channels=2)
    rewrite(root / "imagesTr/case_1_0001.nii.gz", array, geometry)
    report = verify_dataset(root, num_processes=1)
    problem = [p for p in found(report, check) if "channel" in p.message][0]
    assert problem.message.startswith("imagesTr/case_1_0001.nii.gz: channel")
    assert "imagesTr/case_1_0000.nii.gz" in problem.message
    for text in expected:
        assert text in problem.message


# -- voxel content ---------------------------------------------------------------------------------
def test_undeclared_label_values_found_vs_declared(ds):
    label = label_array()
    label[0, 0, :3] = [3, 7, 255]
    rewrite(ds / "labelsTr/case_1.nii.gz", label)
    problem = only(verify_dataset(ds, num_processes=1), "label_values")
    assert problem.message.startswith("labelsTr/case_1.nii.gz: label value(s) 3, 7, 255 not declared")
    assert "found: 0, 1, 3, 7, 255" in problem.message and "declared: 0, 1" in problem.message
    assert "0/255" in problem.message


def test_float_label_with_fractions_is_an_error(ds):
    label = label_array().astype(np.float32)
    label[0, 0, :2] = [0.5, 0.25]
    rewrite(ds / "labelsTr/case_0.nii.gz", label)
    problem = only(verify_dataset(ds, num_processes=1), "label_type")
    assert problem.message.startswith("labelsTr/case_0.nii.gz: label has float pixel type (32-bit float)")
    assert "2 voxel(s) with non-integer values (e.g. 0.25, 0.5)" in problem.message


def test_float_label_with_whole_values_is_a_warning(ds):
    rewrite(ds / "labelsTr/case_0.nii.gz", label_array().astype(np.float32))
    report = verify_dataset(ds, num_processes=1)
    assert report.ok, report.format()
    problem = found(report, "label_type", "warning")[0]
    assert problem.message.startswith("labelsTr/case_0.nii.gz: label is stored as 32-bit float")


@pytest.mark.parametrize("ending", [".mha", ".nrrd", ".nii.gz", ".nii"])
def test_nan_and_inf_voxels_are_counted(tmp_path, ending):
    # NIfTI included: ITK's reader turns them into 0, imageio finds them in the raw bytes.
    root = make_dataset(tmp_path / "ds", ending=ending)
    image = image_array().astype(np.float32)
    image[0, 0, :3] = np.nan
    image[1, 1, :2] = np.inf
    rewrite(root / f"imagesTr/case_1_0000{ending}", image)
    problem = only(verify_dataset(root, num_processes=1), "nan")
    assert problem.message.startswith(f"imagesTr/case_1_0000{ending}: 3 NaN and 2 infinite voxel(s) of 960")


def test_nan_in_a_label_is_reported(ds):
    label = label_array().astype(np.float32)
    label[0, 0, 0] = np.nan
    rewrite(ds / "labelsTr/case_0.nii.gz", label)
    problem = only(verify_dataset(ds, num_processes=1), "nan")
    assert problem.message.startswith("labelsTr/case_0.nii.gz: 1 NaN and 0 infinite voxel(s)")


# -- dimensions and pixel types --------------------------------------------------------------------
def write_sitk(image: sitk.Image, path: Path) -> None:
    sitk.WriteImage(image, str(path))


def test_4d_image_is_refused(ds):
    write_sitk(sitk.GetImageFromArray(np.zeros((2, *SHAPE), np.float32), isVector=False),
               ds / "imagesTr/case_0_0000.nii.gz")
    problem = [p for p in found(verify_dataset(ds, num_processes=1), "dimension") if "4D" in p.message][0]
    assert problem.message.startswith("imagesTr/case_0_0000.nii.gz: image is 4D (shape 2x8x12x10)")


def test_rgb_image_is_refused(ds):
    write_sitk(sitk.GetImageFromArray(np.zeros((*SHAPE, 3), np.uint8), isVector=True),
               ds / "imagesTr/case_0_0000.nii.gz")
    problem = found(verify_dataset(ds, num_processes=1), "components")[0]
    assert problem.message.startswith("imagesTr/case_0_0000.nii.gz: image has 3 components per voxel")
    assert "vector of 8-bit unsigned integer" in problem.message


def test_2d_label_next_to_3d_image(ds):
    rewrite(ds / "labelsTr/case_1.nii.gz", label_array()[4], Geometry.identity((1.0, 1.5)))
    problem = only(verify_dataset(ds, num_processes=1), "dimension")
    assert problem.message.startswith("labelsTr/case_1.nii.gz: label is 2D (shape 12x10); AutoSeg takes 3D images")


def test_2d_files_are_refused_as_planning_refuses_them(tmp_path):
    # Fingerprint and planning work on (z, y, x) volumes: a 2D file gets the same message from
    # verify here as from plan (test_fault_campaign), with the way to fix it.
    root = make_dataset(tmp_path / "ds", cases=3)
    geometry = Geometry((1.0, 1.5), (10.0, -20.0), (1.0, 0.0, 0.0, 1.0))
    rewrite(root / "imagesTr/case_2_0000.nii.gz", image_array()[0], geometry)
    rewrite(root / "labelsTr/case_2.nii.gz", label_array()[3], geometry)
    problems = found(verify_dataset(root, num_processes=1), "dimension")
    assert [(p.case, p.file.name) for p in problems] == [("case_2", "case_2_0000.nii.gz"), ("case_2", "case_2.nii.gz")]
    assert problems[0].message == ("imagesTr/case_2_0000.nii.gz: image is 2D (shape 12x10); AutoSeg takes 3D images "
                                   "- save a 2D image as a 3D volume of one slice (shape 1xHxW)")


def test_non_orthonormal_direction(tmp_path):
    # NIfTI writers coerce the matrix; MetaImage keeps it, as a hand-edited header would.
    root = make_dataset(tmp_path / "ds", ending=".mha")
    sheared = (1.0, 0.0, 0.0, 0.5, 1.0, 0.0, 0.0, 0.0, 1.0)
    for path in (root / "imagesTr/case_0_0000.mha", root / "labelsTr/case_0.mha"):
        rewrite(path, sitk.GetArrayFromImage(sitk.ReadImage(str(path))), Geometry(GEOMETRY.spacing, GEOMETRY.origin, sheared))
    problems = found(verify_dataset(root, num_processes=1), "direction")
    assert [p.file.name for p in problems] == ["case_0_0000.mha", "case_0.mha"]
    assert "[1, 0, 0, 0.5, 1, 0, 0, 0, 1] is not orthonormal" in problems[0].message


# -- unreadable files ------------------------------------------------------------------------------
@pytest.mark.parametrize("damage, reason", [
    # Cut in half, but never into the ~90-byte label's compressed header: the voxels are what is lost.
    (lambda data: data[: max(len(data) // 2, len(data) - 16)], "truncated"),
    (lambda data: b"", "not a readable image"),
    (lambda data: bytes(range(256)) * 4, "not a readable image"),
])
@pytest.mark.parametrize("name", ["imagesTr/case_1_0000.nii.gz", "labelsTr/case_1.nii.gz"])
def test_unreadable_files_are_named_with_itk_reason(ds, damage, reason, name):
    path = ds / name
    path.write_bytes(damage(path.read_bytes()))
    problem = only(verify_dataset(ds, num_processes=1), "unreadable")
    assert problem.message.startswith(f"{name}: ") and reason in problem.message
    assert problem.case == "case_1" and problem.file == path


# -- imagesTs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("check, breakage, expected", [
    ("missing_channel", lambda r: (r / "imagesTs/test_1_0001.nii.gz").unlink(), "imagesTs/test_1_0001.nii.gz"),
    ("unreadable", lambda r: (r / "imagesTs/test_1_0001.nii.gz").write_bytes(b""), "imagesTs/test_1_0001.nii.gz: "),
    ("shape", lambda r: rewrite(r / "imagesTs/test_1_0001.nii.gz", image_array(shape=(7, 12, 10))),
     "imagesTs/test_1_0001.nii.gz: channel shape 7x12x10 differs from shape 8x12x10 of imagesTs/test_1_0000.nii.gz"),
])
def test_test_images_are_checked(tmp_path, check, breakage, expected):
    root = make_dataset(tmp_path / "ds", channels=2, test_cases=2)
    breakage(root)
    problem = only(verify_dataset(root, num_processes=1), check)
    assert expected in problem.message and problem.case == "test_1"


# -- warnings --------------------------------------------------------------------------------------
def test_all_background_label_is_a_warning(ds):
    rewrite(ds / "labelsTr/case_0.nii.gz", np.zeros(SHAPE, np.uint8))
    report = verify_dataset(ds, num_processes=1)
    assert report.ok
    problem = only(report, "empty_label", "warning")
    assert problem.message.startswith("labelsTr/case_0.nii.gz: label has no foreground voxel (values found: 0)")


@pytest.mark.parametrize("spacing, text", [((0.01, 1.0, 1.5), "[0.01, 1, 1.5]"), ((25.0, 1.0, 1.5), "[25, 1, 1.5]")])
def test_unusual_spacing_is_a_warning(tmp_path, spacing, text):
    root = make_dataset(tmp_path / "ds", geometry=Geometry(spacing, GEOMETRY.origin, GEOMETRY.direction))
    report = verify_dataset(root, num_processes=1)
    assert report.ok
    problems = found(report, "spacing", "warning")
    assert [p.case for p in problems] == ["case_0", "case_1"]
    assert problems[0].message.startswith(f"imagesTr/case_0_0000.nii.gz: spacing {text} mm")


def test_unit_spacing_zero_origin_everywhere_is_a_warning(tmp_path):
    root = make_dataset(tmp_path / "ds", geometry=Geometry.identity((1.0, 1.0, 1.0)))
    report = verify_dataset(root, num_processes=1)
    assert report.ok
    assert "lost their geometry" in only(report, "lost_geometry", "warning").message


# -- the report as a whole -------------------------------------------------------------------------
def break_many(root: Path) -> None:
    rewrite(root / "labelsTr/case_0.nii.gz", label_array((8, 12, 9)))
    (root / "imagesTr/case_1_0000.nii.gz").write_bytes(b"")
    (root / "labelsTr/case_2.nii.gz").unlink()
    label = label_array()
    label[0, 0, 0] = 4
    rewrite(root / "labelsTr/case_3.nii.gz", label)
    (root / "imagesTr/readme.md").write_text("x")


def test_every_problem_is_reported_at_once(tmp_path):
    root = make_dataset(tmp_path / "ds", cases=4)
    break_many(root)
    report = verify_dataset(root, num_processes=1)
    assert {(p.check, p.case) for p in report.errors} == {
        ("shape", "case_0"), ("unreadable", "case_1"), ("missing_label", "case_2"), ("label_values", "case_3"),
        ("unexpected_file", None)}
    text = report.format()
    for problem in report.problems:
        assert problem.message in text
    assert text.index("ERRORS:") < text.index("shape mismatch (1):")
    json.dumps(report.to_dict())  # serialisable for --events consumers
    assert report.to_dict()["ok"] is False and len(report.to_dict()["errors"]) == 5


def test_parallel_report_equals_serial(tmp_path):
    root = make_dataset(tmp_path / "ds", cases=4, test_cases=1)
    break_many(root)
    serial = verify_dataset(root, num_processes=1)
    parallel = verify_dataset(root, num_processes=2)
    assert parallel.to_dict() == serial.to_dict() and len(serial.errors) == 5


def test_progress_counts_every_checked_case(tmp_path):
    root = make_dataset(tmp_path / "ds", cases=3, test_cases=1)
    out = io.StringIO()
    verify_dataset(root, num_processes=2, reporter=Reporter(events=True, out=out, err=io.StringIO()))
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert events[0] == {**events[0], "event": "start", "stage": "verify", "of": 4}
    assert events[-1]["event"] == "progress" and events[-1]["done"] == events[-1]["of"] == 4


# -- dying workers ---------------------------------------------------------------------------------
@pytest.fixture
def deadline():
    """Fail instead of hanging if a dead worker were waited for forever."""
    def expire(*_):
        raise TimeoutError("verify_dataset hung on a dead worker")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_killed_worker_names_the_case_and_the_others_are_still_checked(tmp_path, monkeypatch, deadline):
    root = make_dataset(tmp_path / "ds", cases=3)
    rewrite(root / "labelsTr/case_2.nii.gz", label_array((8, 12, 9)))
    real_check = verify.check_case

    def dies_on_case_1(job):
        if job.case_id == "case_1":
            os._exit(9)  # like the out-of-memory killer: no exception, no cleanup
        return real_check(job)

    monkeypatch.setattr(verify, "check_case", dies_on_case_1)  # workers are forked, so they see it
    started = time.monotonic()
    report = verify_dataset(root, num_processes=2)
    assert time.monotonic() - started < 30
    assert {(p.check, p.case) for p in report.errors} == {("worker", "case_1"), ("shape", "case_2")}
    dead = found(report, "worker")[0]
    assert "case 'case_1'" in dead.message and "died" in dead.message and "case_1_0000.nii.gz" in dead.message


def test_a_bug_in_a_check_becomes_an_error_naming_the_case(ds, monkeypatch):
    def broken(job):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(verify, "check_case", broken)
    problems = found(verify_dataset(ds, num_processes=1), "internal")
    assert [p.case for p in problems] == ["case_0", "case_1"]
    assert "ZeroDivisionError: division by zero" in problems[0].message
