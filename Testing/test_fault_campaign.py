"""Fault campaign: every command, fed bad input, fails cleanly and says where.

Each row of the tables below is one kind of bad input (a broken dataset, a bad flag, a missing
or damaged file) run through ``AutoSegLib.cli.main`` in this process with ``--events``. A row
passes when the command

* exits 1 (2 for an argparse usage error, the command line's convention),
* reports errors of one line each that name the file or case (and the offending value),
* prints no traceback, and
* leaves nothing that looks finished: no new file at all, except, where a stage goes on with
  the other cases by design (preprocess), no output of the failed case.

:func:`test_plan_and_preprocess_rejects_everything_verify_rejects` runs ``verify`` and
``plan-and-preprocess`` over the same broken datasets: no command may accept what ``verify``
rejects (they share one implementation of the checks, AutoSegLib/verify_checks.py).

Every dataset is a copy of one tiny base (3 cases of 8x16x16, built in code) broken in one way;
one model is trained once for a single iteration for the predict rows.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import box_case, write_dataset

from AutoSegLib.cli import main
from AutoSegLib.imageio import Geometry, read_image, write_image

SHAPE = (8, 16, 16)
GEOMETRY = Geometry((2.0, 1.0, 1.0), (10.0, -20.0, 30.0), tuple(np.eye(3).ravel()))
IMAGE = "imagesTr/case_1_0000.nii.gz"
CHANNEL_1 = "imagesTr/case_1_0001.nii.gz"
LABEL = "labelsTr/case_1.nii.gz"
NAME = "Dataset001_Broken"


# -- the base dataset, the trained model -------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    cases = {f"case_{i}": box_case(shape=SHAPE, box=((2, 6), (4, 12), (4, 12)), seed=i) for i in range(3)}
    return write_dataset(tmp_path_factory.mktemp("base") / NAME, cases, geometry=GEOMETRY)


@pytest.fixture(scope="module")
def planned_work(base, tmp_path_factory) -> Path:
    """plans.json (and fingerprint) of the base dataset, for the preprocess and train rows."""
    work = tmp_path_factory.mktemp("planned") / "work"
    assert main(["plan", str(base), "-w", str(work), "-np", "1"]) == 0
    return work


@pytest.fixture(scope="module")
def model(base, tmp_path_factory) -> Path:
    """A model folder of one 3d_fullres fold trained for one iteration (the predict rows need one)."""
    root = tmp_path_factory.mktemp("trained")
    dataset = Path(shutil.copytree(base, root / NAME))
    work = root / "work"
    assert main(["plan-and-preprocess", str(dataset), "-w", str(work), "-c", "3d_fullres", "-np", "1"]) == 0
    assert main(["train", str(dataset), "3d_fullres", "all", "-w", str(work), "--epochs", "1",
                 "--iterations-per-epoch", "1", "--no-validation", "--device", "cpu", "--num-workers", "0"]) == 0
    return work / "model"


# -- breaking a dataset --------------------------------------------------------------------------
def original(root: Path, rel: str) -> np.ndarray:
    return read_image(root / rel)[0]


def put(root: Path, rel: str, array: np.ndarray, geometry: Geometry = GEOMETRY) -> None:
    write_image(array, geometry, root / rel)


def label_value(value, dtype) -> Callable[[Path], None]:
    def breakage(root: Path) -> None:
        label = original(root, LABEL).astype(dtype)
        label[0, 0, 0] = value
        put(root, LABEL, label)
    return breakage


def label_fraction(root: Path) -> None:
    label = original(root, LABEL).astype(np.float32)
    label[3, 8, 8] = 0.5  # inside the organ: a class voxel that would become background
    put(root, LABEL, label)


def non_finite(rel: str, value: float) -> Callable[[Path], None]:
    def breakage(root: Path) -> None:
        array = original(root, rel).astype(np.float32)
        array[0, 0, :2] = value
        put(root, rel, array)
    return breakage


def geometry_of(rel: str, **change) -> Callable[[Path], None]:
    def breakage(root: Path) -> None:
        put(root, rel, original(root, rel), Geometry(**{**GEOMETRY.__dict__, **change}))
    return breakage


def reshaped(rel: str, cut) -> Callable[[Path], None]:
    def breakage(root: Path) -> None:
        put(root, rel, np.ascontiguousarray(original(root, rel)[cut]))
    return breakage


def label_2d(root: Path) -> None:
    put(root, LABEL, original(root, LABEL)[4], Geometry.identity((1.0, 1.0)))


def all_2d(root: Path) -> None:
    for path in [*(root / "imagesTr").iterdir(), *(root / "labelsTr").iterdir()]:
        write_image(read_image(path)[0][4], Geometry((1.0, 1.0), (10.0, -20.0), (1.0, 0.0, 0.0, 1.0)), path)


def itk_written(rel: str, array: np.ndarray, vector: bool) -> Callable[[Path], None]:
    def breakage(root: Path) -> None:
        sitk.WriteImage(sitk.GetImageFromArray(array, isVector=vector), str(root / rel))
    return breakage


def damaged(rel: str, damage: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def breakage(root: Path) -> None:
        path = root / rel
        path.write_bytes(damage(path.read_bytes()))
    return breakage


def truncate(data: bytes) -> bytes:
    # Never into the gzip header of a tiny file: the voxels are what is lost.
    return data[: max(len(data) // 2, len(data) - 16)]


def copied(source: str, target: str) -> Callable[[Path], None]:
    return lambda root: shutil.copy(root / source, root / target)


def removed(rel: str) -> Callable[[Path], None]:
    return lambda root: (root / rel).unlink()


def spec_edit(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def breakage(root: Path) -> None:
        spec = json.loads((root / "dataset.json").read_text())
        change(spec)
        (root / "dataset.json").write_text(json.dumps(spec))
    return breakage


def two_channels(then: Callable[[Path], None] | None = None) -> Callable[[Path], None]:
    """The base as a 2-channel dataset (channel 1 a copy of channel 0), then ``then``."""
    def breakage(root: Path) -> None:
        for image in sorted((root / "imagesTr").glob("*_0000.nii.gz")):
            shutil.copy(image, image.with_name(image.name.replace("_0000", "_0001")))
        spec_edit(lambda s: s.update(channel_names={"0": "CT", "1": "CT"}))(root)
        if then is not None:
            then(root)
    return breakage


def emptied(root: Path) -> None:
    for folder in ("imagesTr", "labelsTr"):
        shutil.rmtree(root / folder)
        (root / folder).mkdir()
    spec_edit(lambda s: s.update(numTraining=0))(root)


def set_spec_text(text: str | None) -> Callable[[Path], None]:
    def breakage(root: Path) -> None:
        (root / "dataset.json").unlink()
        if text is not None:
            (root / "dataset.json").write_text(text)
    return breakage


def without_key(key: str) -> Callable[[dict], None]:
    return lambda spec: spec.pop(key)


# name -> (breakage, texts every error report of it must contain)
DATASET_FAULTS: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    # label content
    "label_fractional_float": (label_fraction, (LABEL, "non-integer values (e.g. 0.5)")),
    "label_negative": (label_value(-1, np.int16), (LABEL, "label value(s) -1 not declared")),
    "label_huge_2_40": (label_value(2**40, np.int64), (LABEL, "label value(s) 1099511627776 not declared")),
    "label_undeclared_7": (label_value(7, np.uint8), (LABEL, "label value(s) 7 not declared")),
    "label_undeclared_5": (label_value(5, np.int32), (LABEL, "label value(s) 5 not declared")),
    "label_mask_0_255": (label_value(255, np.uint8), (LABEL, "255", "0/255")),
    "label_nan": (non_finite(LABEL, np.nan), (LABEL, "2 NaN")),
    # geometry of label and channels
    "label_spacing_mismatch": (geometry_of(LABEL, spacing=(2.0, 1.0, 1.5)), (LABEL, "spacing [2, 1, 1.5]")),
    "label_origin_mismatch": (geometry_of(LABEL, origin=(10.0, -20.0, 35.0)), (LABEL, "origin [10, -20, 35]")),
    "label_direction_mismatch": (geometry_of(LABEL, direction=(1.0, 0, 0, 0, 0, -1.0, 0, 1.0, 0)),
                                 (LABEL, "direction [1, 0, 0, 0, 0, -1, 0, 1, 0]")),
    "label_shape_mismatch": (reshaped(LABEL, np.s_[:, :, :15]), (LABEL, "shape 8x16x15")),
    "label_2d_next_to_3d_image": (label_2d, (LABEL, "label is 2D")),
    "channel_origin_mismatch": (two_channels(geometry_of(CHANNEL_1, origin=(10.0, -20.0, 31.0))),
                                (CHANNEL_1, "channel origin [10, -20, 31]")),
    "channel_shape_mismatch": (two_channels(reshaped(CHANNEL_1, np.s_[:7])), (CHANNEL_1, "channel shape 7x16x16")),
    # image content
    "image_nan": (non_finite(IMAGE, np.nan), (IMAGE, "2 NaN and 0 infinite voxel(s)")),
    "image_inf": (non_finite(IMAGE, np.inf), (IMAGE, "0 NaN and 2 infinite voxel(s)")),
    "image_4d": (itk_written(IMAGE, np.zeros((2, *SHAPE), np.float32), False), (IMAGE, "image is 4D")),
    "image_rgb": (itk_written(IMAGE, np.zeros((*SHAPE, 3), np.uint8), True), (IMAGE, "3 components per voxel")),
    "all_cases_2d": (all_2d, ("imagesTr/case_0_0000.nii.gz", "image is 2D (shape 16x16); AutoSeg takes 3D images")),
    # damaged files
    "image_truncated": (damaged(IMAGE, truncate), (IMAGE, "truncated")),
    "image_zero_bytes": (damaged(IMAGE, lambda _: b""), (IMAGE, "not a readable image")),
    "image_is_text": (damaged(IMAGE, lambda _: b"patient notes, not an image\n" * 20), (IMAGE, "not a readable image")),
    "label_truncated": (damaged(LABEL, truncate), (LABEL, "truncated")),
    "label_zero_bytes": (damaged(LABEL, lambda _: b""), (LABEL, "not a readable image")),
    # layout
    "channel_missing": (two_channels(removed(CHANNEL_1)), ("case 'case_1'", CHANNEL_1)),
    "channel_undeclared": (copied(IMAGE, CHANNEL_1), (CHANNEL_1, "channel 1 is not in channel_names")),
    "label_missing": (removed(LABEL), ("case 'case_1'", LABEL)),
    "label_orphan": (copied(LABEL, "labelsTr/case_9.nii.gz"), ("labelsTr/case_9.nii.gz", "label has no image")),
    "hidden_image": (copied(IMAGE, "imagesTr/._case_1_0000.nii.gz"), ("imagesTr/._case_1_0000.nii.gz", "hidden")),
    "hidden_label": (copied(LABEL, "labelsTr/.case_1.nii.gz"), ("labelsTr/.case_1.nii.gz", "hidden")),
    "stray_text_file": (lambda r: (r / "imagesTr/notes.txt").write_text("x"), ("imagesTr/notes.txt", "not an image")),
    "other_file_ending": (lambda r: write_image(original(r, IMAGE), GEOMETRY, r / "imagesTr/case_1_0000.nrrd"),
                          ("imagesTr/case_1_0000.nrrd", "differs from dataset.json file_ending")),
    "no_cases": (emptied, ("no training cases",)),
    # dataset.json
    "num_training_wrong": (spec_edit(lambda s: s.update(numTraining=5)), ("numTraining is 5", "3 training case(s)")),
    "dataset_json_missing": (set_spec_text(None), ("dataset.json", "not found")),
    "dataset_json_not_json": (set_spec_text('{"labels": '), ("dataset.json", "not valid JSON")),
    "dataset_json_without_labels": (spec_edit(without_key("labels")), ("dataset.json", "missing key 'labels'")),
    "dataset_json_without_channels": (spec_edit(without_key("channel_names")),
                                      ("dataset.json", "missing key 'channel_names'")),
    "dataset_json_without_ending": (spec_edit(without_key("file_ending")), ("dataset.json", "missing key 'file_ending'")),
    "dataset_json_label_gap": (spec_edit(lambda s: s.update(labels={"background": 0, "organ": 2})),
                               ("dataset.json", "consecutive from 0, found [0, 2]")),
    "dataset_json_png_ending": (spec_edit(lambda s: s.update(file_ending=".png")), ("dataset.json", "'.png'")),
    "dataset_json_num_training_text": (spec_edit(lambda s: s.update(numTraining="3")), ("dataset.json", "numTraining")),
}


# -- running a command -------------------------------------------------------------------------
@dataclass(repr=False)
class Outcome:
    code: int
    errors: list[str]  # messages of the "error" events
    stderr: str
    new_files: list[str] = field(default_factory=list)  # relative to the row's folder

    def __repr__(self) -> str:  # what a failed assertion shows
        return f"exit {self.code}; errors: {self.errors}; new files: {self.new_files}; stderr:\n{self.stderr[-3000:]}"


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def run(argv: list[str], capsys, watch: Path) -> Outcome:
    """``autoseg ARGV --events`` in this process; new files under ``watch`` are recorded."""
    before = files_under(watch)
    capsys.readouterr()
    try:
        code = main([*map(str, argv), "--events"])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    out, err = capsys.readouterr()
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    errors = [e["message"] for e in events if e["event"] == "error"]
    return Outcome(code, errors, err, sorted(files_under(watch) - before))


def assert_failed_cleanly(outcome: Outcome, code: int, texts, new_file_ok=lambda rel: False,
                          one_line: bool = True) -> None:
    assert outcome.code == code, outcome
    assert "Traceback" not in outcome.stderr, outcome
    if code == 2:
        assert "usage:" in outcome.stderr, outcome
        for text in texts:
            assert text in outcome.stderr, outcome
    else:
        assert outcome.errors, outcome
        assert not one_line or all("\n" not in message for message in outcome.errors), outcome
        assert not any(message.startswith("internal error") for message in outcome.errors), outcome
        reported = " | ".join(outcome.errors)
        for text in texts:
            assert text in reported, outcome
    left = [rel for rel in outcome.new_files if not new_file_ok(rel)]
    assert not left, f"a failed command left {left}\n{outcome}"


@pytest.fixture
def broken(base, tmp_path) -> Callable[[str], Path]:
    """Copy the base dataset into this test's folder and apply the named breakage."""
    def make(fault: str) -> Path:
        root = Path(shutil.copytree(base, tmp_path / NAME))
        DATASET_FAULTS[fault][0](root)
        return root
    return make


# -- controls: what the rows break is otherwise sound ----------------------------------------------
def test_the_base_dataset_passes_every_entry(base, tmp_path, capsys):
    root = Path(shutil.copytree(base, tmp_path / NAME))
    assert run(["verify", root, "-np", "1"], capsys, tmp_path).code == 0
    outcome = run(["plan-and-preprocess", root, "-np", "1", "-c", "3d_fullres"], capsys, tmp_path)
    assert outcome.code == 0 and not outcome.errors, outcome


def test_2d_images_saved_as_one_slice_volumes_plan_as_the_message_advises(tmp_path, capsys):
    cases = {f"case_{i}": box_case(shape=(1, 32, 32), box=((0, 1), (8, 24), (8, 24)), seed=i) for i in range(3)}
    root = write_dataset(tmp_path / NAME, cases, geometry=GEOMETRY)
    assert run(["verify", root, "-np", "1"], capsys, tmp_path).code == 0
    outcome = run(["plan-and-preprocess", root, "-np", "1"], capsys, tmp_path)
    assert outcome.code == 0 and f"{NAME}.autoseg/preprocessed/2d/case_0.json" in outcome.new_files, outcome


# -- verify and plan-and-preprocess over every broken dataset --------------------------------------
@pytest.mark.parametrize("fault", DATASET_FAULTS)
@pytest.mark.parametrize("command", ["verify", "plan-and-preprocess"])
def test_broken_dataset_is_refused_naming_the_file(broken, tmp_path, capsys, command, fault):
    root = broken(fault)
    extra = ["-c", "3d_fullres"] if command == "plan-and-preprocess" else []
    outcome = run([command, root, "-np", "1", *extra], capsys, tmp_path)
    assert_failed_cleanly(outcome, 1, DATASET_FAULTS[fault][1])


def test_plan_and_preprocess_rejects_everything_verify_rejects(base, tmp_path, capsys):
    """Same broken datasets through both commands: verify's every error is plan-and-preprocess' too, word for word."""
    verdicts, unsaid = {}, {}
    for fault, (breakage, _) in DATASET_FAULTS.items():
        root = Path(shutil.copytree(base, tmp_path / fault / NAME))
        breakage(root)
        verify = run(["verify", root, "-np", "1"], capsys, tmp_path / fault)
        plan = run(["plan-and-preprocess", root, "-np", "1", "-c", "3d_fullres"], capsys, tmp_path / fault)
        verdicts[fault] = (verify.code, plan.code)
        # One implementation of the checks: each problem verify names (all but its closing
        # count) is in plan-and-preprocess' error as verify words it.
        problems = [m for m in verify.errors if "verification found" not in m]
        unsaid[fault] = [m for m in problems if m not in " ".join(plan.errors)]
    assert all(v == 1 for v, _ in verdicts.values()), verdicts  # every dataset here is broken for verify
    accepted = [fault for fault, (v, p) in verdicts.items() if v != 0 and p == 0]
    assert not accepted, f"plan-and-preprocess accepted what verify rejects: {accepted}"
    unsaid = {fault: messages for fault, messages in unsaid.items() if messages}
    assert not unsaid, f"verify's words missing from plan-and-preprocess' error: {unsaid}"


def test_worker_processes_report_the_case_s_own_error(broken, tmp_path, capsys):
    # Two workers (-np 2): a NaN image used to read "a worker process died (out of memory?)".
    root = broken("image_nan")
    outcome = run(["plan", root, "-np", "2"], capsys, tmp_path)
    assert_failed_cleanly(outcome, 1, ["case 'case_1'", IMAGE, "2 NaN and 0 infinite voxel(s)"])
    assert "worker process" not in outcome.errors[-1]


def test_a_killed_fingerprint_worker_is_named_and_the_others_are_measured(broken, tmp_path, capsys, monkeypatch):
    from AutoSegLib import fingerprint

    real = fingerprint._measure_case

    def dies_on_case_1(job, *args):
        if job.case_id == "case_1":
            os.kill(os.getpid(), signal.SIGKILL)  # like the out-of-memory killer: no exception, no cleanup
        return real(job, *args)

    monkeypatch.setattr(fingerprint, "_measure_case", dies_on_case_1)  # workers are forked: they see it
    root = broken("image_nan")  # case_1 is also broken: the death, not a guess, is what gets reported
    outcome = run(["plan", root, "-np", "2"], capsys, tmp_path)
    assert_failed_cleanly(outcome, 1, ["1 of 3 case(s)", "case 'case_1': the worker process was killed by SIGKILL"])


def test_the_real_command_exits_1_without_a_traceback(broken, tmp_path):
    root = broken("label_undeclared_7")
    result = subprocess.run([sys.executable, "-m", "AutoSegLib", "plan-and-preprocess", str(root), "-np", "2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR: ") and LABEL in last and "label value(s) 7 not declared" in last
    assert not (tmp_path / f"{NAME}.autoseg" / "plans.json").exists()


# -- preprocess (planned before the dataset broke) --------------------------------------------------
@pytest.mark.parametrize("fault", ["label_undeclared_7", "label_fractional_float", "label_spacing_mismatch",
                                   "image_nan", "image_truncated", "channel_undeclared", "hidden_image",
                                   "num_training_wrong"])
def test_preprocess_checks_each_case_as_it_reads_it(broken, planned_work, tmp_path, capsys, fault):
    root = broken(fault)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(planned_work / "plans.json", work / "plans.json")
    outcome = run(["preprocess", root, "-w", work, "-c", "3d_fullres", "-np", "2"], capsys, tmp_path)
    # The other cases are preprocessed (by design); nothing of the broken one is.
    assert_failed_cleanly(outcome, 1, DATASET_FAULTS[fault][1], new_file_ok=lambda rel: "case_1" not in rel)


# -- commands, flags, missing and damaged files -----------------------------------------------------
@dataclass(frozen=True)
class Ctx:
    tmp: Path  # the row's folder; every file the command writes must land under it
    ds: Path  # a good copy of the base dataset
    work: Path  # an empty work folder
    planned: Path  # a work folder holding the base's plans.json, not preprocessed
    model: Path | None  # the trained model folder (rows with needs_model only)


def bad_file(ctx: Ctx, name: str, data: bytes | str) -> Path:
    path = ctx.tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def input_folder(ctx: Ctx, files: dict[str, Callable[[Path], None]]) -> Path:
    folder = ctx.tmp / "input"
    folder.mkdir(exist_ok=True)
    for name, write in files.items():
        write(folder / name)
    return folder


def good_image(path: Path) -> None:
    write_image(box_case(shape=SHAPE, box=((2, 6), (4, 12), (4, 12)))[0][0], GEOMETRY, path)


def image_of(array: np.ndarray, vector: bool = False) -> Callable[[Path], None]:
    return lambda path: sitk.WriteImage(sitk.GetImageFromArray(array, isVector=vector), str(path))


def nan_image(path: Path) -> None:
    array = box_case(shape=SHAPE)[0][0].astype(np.float32)
    array[0, 0, 0] = np.nan
    write_image(array, GEOMETRY, path)


def predictions(ctx: Ctx, damage: Callable[[Path], None] | None = None) -> Path:
    """A copy of the base's labels as a prediction folder, then damaged."""
    folder = Path(shutil.copytree(ctx.ds / "labelsTr", ctx.tmp / "pred"))
    if damage is not None:
        damage(folder)
    return folder


def under_a_file(ctx: Ctx, name: str) -> Path:
    """A path whose parent is a regular file: no one, not even root, can create it."""
    return bad_file(ctx, "occupied", "a file, not a folder") / name


def hidden_copy(ctx: Ctx) -> Path:
    shutil.copy(ctx.ds / IMAGE, ctx.ds / "imagesTr/._case_1_0000.nii.gz")
    return ctx.ds


PREDICT = ["predict", "-c", "3d_fullres", "-f", "all", "--no-tta", "--device", "cpu"]


@dataclass(frozen=True)
class Row:
    argv: Callable[[Ctx], list]
    code: int
    texts: tuple[str, ...]
    needs_model: bool = False
    xfail: str | None = None  # the file to fix, and why
    one_line: bool = True  # False only where predict_failure_is_one_line tracks it, so the rest is still checked


COMMAND_FAULTS: dict[str, Row] = {
    # usage errors: argparse, exit 2
    "unknown_command": Row(lambda c: ["frobnicate"], 2, ("invalid choice: 'frobnicate'",)),
    "verify_zero_processes": Row(lambda c: ["verify", c.ds, "-np", "0"], 2, ("-np/--num-processes", "at least 1")),
    "plan_unknown_architecture": Row(lambda c: ["plan", c.ds, "--architecture", "VNet"], 2, ("--architecture",)),
    "train_zero_epochs": Row(lambda c: ["train", c.ds, "3d_fullres", "0", "--epochs", "0"], 2, ("--epochs",)),
    "predict_unknown_configuration": Row(lambda c: ["predict", "-i", c.ds, "-o", c.tmp / "out", "-m", c.tmp,
                                                    "-c", "4d"], 2, ("-c/--configuration",)),
    "make_phantoms_unknown_kind": Row(lambda c: ["make-phantoms", c.tmp / "ph", "--kind", "pet"], 2, ("--kind",)),
    "make_phantoms_zero_cases": Row(lambda c: ["make-phantoms", c.tmp / "ph", "--cases", "0"], 2, ("--cases",)),
    # verify / plan / preprocess
    "verify_missing_folder": Row(lambda c: ["verify", c.tmp / "nowhere"], 1, ("nowhere", "dataset.json not found")),
    "plan_missing_folder": Row(lambda c: ["plan", c.tmp / "nowhere"], 1, ("nowhere", "dataset.json not found")),
    "plan_without_dataset": Row(lambda c: ["plan"], 1, ("DATASET", "--fingerprint")),
    "plan_gpu_memory_not_a_number": Row(lambda c: ["plan", c.ds, "-w", c.work, "--gpu-memory", "lots"], 2,
                                        ("--gpu-memory", "lots")),
    "plan_unwritable_work_folder": Row(lambda c: ["plan", c.ds, "-w", under_a_file(c, "work"), "-np", "1"], 1,
                                       ("occupied",)),
    "plan_fingerprint_missing": Row(lambda c: ["plan", "--fingerprint", c.tmp / "fp.json", "-o", c.tmp / "p.json",
                                               "--channels", "CT", "--num-labels", "1"], 1, ("fp.json",)),
    "plan_fingerprint_not_json": Row(lambda c: ["plan", "--fingerprint", bad_file(c, "fp.json", "{oops"),
                                                "-o", c.tmp / "p.json", "--channels", "CT", "--num-labels", "1"], 1,
                                     ("fp.json",)),
    "plan_fingerprint_without_keys": Row(lambda c: ["plan", "--fingerprint", bad_file(c, "fp.json", "{}"),
                                                    "-o", c.tmp / "p.json", "--channels", "CT", "--num-labels", "1"],
                                         1, ("fp.json", "spacings")),
    "plan_fingerprint_without_output": Row(lambda c: ["plan", "--fingerprint", c.planned / "dataset_fingerprint.json",
                                                      "--channels", "CT", "--num-labels", "1"], 1, ("-o/--output",)),
    "plan_fingerprint_wrong_channels": Row(lambda c: ["plan", "--fingerprint", c.planned / "dataset_fingerprint.json",
                                                      "-o", c.tmp / "p.json", "--channels", "CT,T2",
                                                      "--num-labels", "1"], 1, ("dataset_fingerprint.json", "1 channel")),
    "preprocess_without_plans": Row(lambda c: ["preprocess", c.ds, "-w", c.work], 1,
                                    ("plans.json", "run `autoseg plan DATASET` first")),
    "preprocess_unplanned_configuration": Row(lambda c: ["preprocess", c.ds, "-w", c.planned, "-c", "3d_lowres"], 1,
                                              ("3d_lowres", "not in the plans")),
    "preprocess_plans_not_json": Row(lambda c: ["preprocess", c.ds, "-w", bad_file(c, "w/plans.json", "{").parent], 1,
                                     ("plans.json",)),
    # train
    "train_without_plans": Row(lambda c: ["train", c.ds, "3d_fullres", "0", "-w", c.work], 1, ("plans.json",)),
    "train_unplanned_configuration": Row(lambda c: ["train", c.ds, "3d_lowres", "0", "-w", c.planned], 1,
                                         ("3d_lowres",)),
    "train_bad_fold": Row(lambda c: ["train", c.ds, "3d_fullres", "seven", "-w", c.planned], 1, ("fold", "'seven'")),
    "train_fold_beyond_the_cases": Row(lambda c: ["train", c.ds, "3d_fullres", "4", "-w", c.planned], 1,
                                       ("only 3 cases for 5 folds",)),
    "train_not_preprocessed": Row(lambda c: ["train", c.ds, "3d_fullres", "all", "-w", c.planned, "--epochs", "1",
                                             "--iterations-per-epoch", "1", "--num-workers", "0", "--device", "cpu",
                                             "--no-validation"], 1, ("preprocess",)),
    "train_dataset_with_a_hidden_image": Row(lambda c: ["train", hidden_copy(c), "3d_fullres", "all", "-w", c.planned],
                                             1, ("._case_1_0000.nii.gz", "hidden")),
    "train_missing_dataset": Row(lambda c: ["train", c.tmp / "nowhere", "3d_fullres", "0", "-w", c.planned], 1,
                                 ("nowhere",)),
    # predict
    "predict_missing_model": Row(lambda c: [*PREDICT, "-i", c.ds / "imagesTr", "-o", c.tmp / "out",
                                            "-m", c.tmp / "no_model"], 1, ("no_model",)),
    "predict_model_without_checkpoints": Row(lambda c: [*PREDICT, "-i", c.ds / "imagesTr", "-o", c.tmp / "out",
                                                        "-m", c.planned], 1, ("work", "not a model folder")),
    "predict_missing_input": Row(lambda c: [*PREDICT, "-i", c.tmp / "no_input", "-o", c.tmp / "out",
                                            "-m", c.model], 1, ("no_input",), needs_model=True),
    "predict_zero_byte_input": Row(lambda c: [*PREDICT, "-i", input_folder(c, {"a_0000.nii.gz": lambda p:
                                                                                  p.write_bytes(b"")}),
                                              "-o", c.tmp / "out", "-m", c.model], 1, ("a_0000.nii.gz",),
                                   needs_model=True),
    "predict_text_as_image": Row(lambda c: [*PREDICT, "-i", input_folder(c, {"a_0000.nii.gz": lambda p:
                                                                                p.write_text("not an image")}),
                                            "-o", c.tmp / "out", "-m", c.model], 1, ("a_0000.nii.gz",),
                                 needs_model=True),
    "predict_extra_channel": Row(lambda c: [*PREDICT, "-i", input_folder(c, {"a_0000.nii.gz": good_image,
                                                                             "a_0001.nii.gz": good_image}),
                                            "-o", c.tmp / "out", "-m", c.model], 1, ("case 'a'", "0001"),
                                 needs_model=True),
    "predict_nan_input": Row(lambda c: [*PREDICT, "-i", input_folder(c, {"a_0000.nii.gz": nan_image}),
                                        "-o", c.tmp / "out", "-m", c.model], 1, ("a_0000.nii.gz", "NaN"),
                             needs_model=True),
    "predict_rgb_input": Row(lambda c: [*PREDICT, "-i", input_folder(c, {"a_0000.nii.gz": image_of(
                                            np.zeros((*SHAPE, 3), np.uint8), vector=True)}),
                                        "-o", c.tmp / "out", "-m", c.model], 1, ("a_0000.nii.gz",),
                             needs_model=True),
    "predict_4d_input": Row(lambda c: [*PREDICT, "-i", input_folder(c, {"a_0000.nii.gz": image_of(
                                           np.zeros((2, *SHAPE), np.float32))}),
                                       "-o", c.tmp / "out", "-m", c.model], 1, ("a_0000.nii.gz",),
                            needs_model=True),
    "predict_2d_input": Row(lambda c: [*PREDICT, "-i", input_folder(c, {"a_0000.nii.gz": image_of(
                                           np.zeros(SHAPE[1:], np.float32))}),
                                       "-o", c.tmp / "out", "-m", c.model], 1, ("a_0000.nii.gz",),
                            needs_model=True),
    "predict_failure_is_one_line": Row(lambda c: [*PREDICT, "-i", input_folder(c, {"a_0000.nii.gz": lambda p:
                                                                                      p.write_bytes(b"")}),
                                                  "-o", c.tmp / "out", "-m", c.model], 1, ("a_0000.nii.gz",),
                                       needs_model=True),
    "predict_output_under_a_file": Row(lambda c: [*PREDICT, "-i", c.ds / "imagesTr", "-o", under_a_file(c, "out"),
                                                  "-m", c.model], 1, ("occupied",), needs_model=True),
    # evaluate
    "evaluate_missing_predictions": Row(lambda c: ["evaluate", c.tmp / "no_pred", c.ds / "labelsTr"], 1,
                                        ("no_pred",)),
    "evaluate_zero_byte_prediction": Row(lambda c: ["evaluate", predictions(c, lambda f: (
                                            f / "case_1.nii.gz").write_bytes(b"")), c.ds / "labelsTr"], 1,
                                         ("case_1.nii.gz",)),
    "evaluate_shape_mismatch": Row(lambda c: ["evaluate", predictions(c, lambda f: write_image(
                                       np.zeros((8, 16, 15), np.uint8), GEOMETRY, f / "case_1.nii.gz")),
                                   c.ds / "labelsTr"], 1, ("case_1",)),
    "evaluate_undeclared_prediction_value": Row(lambda c: ["evaluate", predictions(c, lambda f: write_image(
                                                    np.full(SHAPE, 7, np.uint8), GEOMETRY, f / "case_1.nii.gz")),
                                                c.ds / "labelsTr"], 1, ("case_1", "7")),
    "evaluate_output_under_a_file": Row(lambda c: ["evaluate", predictions(c), c.ds / "labelsTr", "-o",
                                                   under_a_file(c, "summary.json")], 1, ("occupied",)),
    "evaluate_labels_file_not_json": Row(lambda c: ["evaluate", predictions(c), c.ds / "labelsTr", "--labels",
                                                    bad_file(c, "labels.json", "[1, 2")], 1, ("labels.json",)),
    # make-phantoms
    "make_phantoms_into_a_full_folder": Row(lambda c: ["make-phantoms", c.ds, "--cases", "1"], 1, (NAME,)),
    "make_phantoms_size_out_of_range": Row(lambda c: ["make-phantoms", c.tmp / "ph", "--size", "9"], 1, ("size",)),
    "make_phantoms_under_a_file": Row(lambda c: ["make-phantoms", under_a_file(c, "ph"), "--cases", "1"], 1,
                                      ("occupied",)),
}


def _command_rows():
    for name, row in COMMAND_FAULTS.items():
        marks = [pytest.mark.xfail(reason=row.xfail, strict=False)] if row.xfail else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_command_rows()))
def test_command_fault_fails_cleanly(name, base, planned_work, request, tmp_path, capsys):
    row = COMMAND_FAULTS[name]
    model = request.getfixturevalue("model") if row.needs_model else None
    ds = Path(shutil.copytree(base, tmp_path / NAME))
    planned = Path(shutil.copytree(planned_work, tmp_path / "work"))
    work = tmp_path / "empty_work"
    work.mkdir()
    ctx = Ctx(tmp_path, ds, work, planned, model)
    outcome = run(row.argv(ctx), capsys, tmp_path)
    assert_failed_cleanly(outcome, row.code, row.texts, one_line=row.one_line)


def test_the_campaign_covers_at_least_40_kinds_of_bad_input():
    assert len(DATASET_FAULTS) + len(COMMAND_FAULTS) >= 40
